"""The ``snaphook.io/*`` annotations of every object of one resource type, kept in memory.

An :class:`AnnotationIndex` answers "what are the snaphook annotations of StatefulSet
db/mongo" without a request per event. It LISTs the resource type across all namespaces
once, then WATCHes it from the list's ``resourceVersion`` (metadata only, with bookmarks),
and applies every ADDED/MODIFIED/DELETED event to the index, so an annotation change is
seen as soon as the API server sends it. A watch that expires (``410 Gone``) or fails is
followed by a fresh LIST.

Until the first LIST is in, while the watch is broken for longer than ``ttl``, or when RBAC
forbids list/watch (the dispatcher may have ``get`` only), lookups GET the one object and
cache the answer, found or not, for ``ttl`` seconds; concurrent lookups of one object share
one GET. A forbidden watch is tried again every ``forbidden_retry`` seconds, in case RBAC
was fixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

from dispatcher.kube import METADATA, METADATA_LIST, KubeAccess, KubeError, Resource

log = logging.getLogger("snaphook.kube")

ANNOTATION_PREFIX = "snaphook.io/"
Annotations = Mapping[str, str]
Key = tuple[str | None, str]  # (namespace, name); no namespace for cluster-scoped kinds

_PAGE = "500"  # objects per LIST page
_MAX_CACHED = 10_000  # GET answers kept at most; expired ones are dropped first


class _Expired(Exception):
    """The watch's resourceVersion is too old (410 Gone): LIST again."""


def snaphook_annotations(metadata: Mapping[str, Any]) -> dict[str, str]:
    """The ``snaphook.io/*`` annotations of an object's metadata; others are not kept."""
    annotations = metadata.get("annotations") or {}
    if not isinstance(annotations, Mapping):
        return {}
    return {
        str(key): str(value)
        for key, value in annotations.items()
        if str(key).startswith(ANNOTATION_PREFIX)
    }


class AnnotationIndex:
    def __init__(
        self,
        access: KubeAccess,
        resource: Resource,
        *,
        ttl: float,
        watch: bool = True,
        clock: Callable[[], float] = time.monotonic,
        request_timeout: float = 10.0,
        forbidden_retry: float = 300.0,
    ) -> None:
        self.resource = resource
        self._access = access
        self._ttl = ttl
        self._watch_enabled = watch
        self._clock = clock
        self._request_timeout = request_timeout
        self._forbidden_retry = forbidden_retry
        self._objects: dict[Key, dict[str, str]] = {}
        self._listed = False
        self._broken_since: float | None = None
        self._cache: dict[Key, tuple[float, dict[str, str] | None]] = {}
        self._inflight: dict[Key, asyncio.Future[dict[str, str] | None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._synced = asyncio.Event()

    @property
    def synced(self) -> bool:
        """Lookups are answered from the watched index (no request)."""
        broken = self._broken_since
        return self._listed and (broken is None or self._clock() - broken < self._ttl)

    def start(self) -> None:
        """Start the LIST+WATCH in the background (once; not when watching is off)."""
        if self._watch_enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"snaphook-watch-{self.resource.plural}"
            )

    async def wait_synced(self) -> None:
        """Until the first LIST is in and the WATCH is open (forever when watching is off
        or forbidden)."""
        await self._synced.wait()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for future in self._inflight.values():
            future.cancel()

    async def lookup(self, namespace: str | None, name: str) -> Annotations | None:
        """The object's snaphook annotations, ``None`` if it does not exist.

        Raises :class:`KubeError` when the API server cannot tell (unreachable, refused).
        """
        self.start()
        key: Key = (namespace if self.resource.namespaced else None, name)
        if self.synced:
            return self._objects.get(key)
        return await self._cached(key)

    # -- GET with a TTL cache -----------------------------------------------------------------

    async def _cached(self, key: Key) -> Annotations | None:
        entry = self._cache.get(key)
        if entry is not None and entry[0] > self._clock():
            return entry[1]
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._fetch(key))
            self._inflight[key] = future
            future.add_done_callback(lambda done: self._settled(key, done))
        # shield: one caller giving up (its request timed out) must not cancel the others'.
        return await asyncio.shield(future)

    def _settled(self, key: Key, future: asyncio.Future[dict[str, str] | None]) -> None:
        self._inflight.pop(key, None)
        if not future.cancelled():
            future.exception()  # retrieved: every waiter may have gone

    async def _fetch(self, key: Key) -> dict[str, str] | None:
        namespace, name = key
        try:
            document = await self._access.get(
                self.resource.path(namespace, name),
                accept=METADATA,
                timeout=self._request_timeout,
            )
            found: dict[str, str] | None = snaphook_annotations(document.get("metadata") or {})
        except KubeError as exc:
            if not exc.not_found:
                raise
            found = None
        self._remember(key, found)
        return found

    def _remember(self, key: Key, found: dict[str, str] | None) -> None:
        now = self._clock()
        if len(self._cache) >= _MAX_CACHED:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            if len(self._cache) >= _MAX_CACHED:
                self._cache.clear()
        self._cache[key] = (now + self._ttl, found)

    # -- LIST + WATCH ---------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = 1.0
        while True:
            try:
                version = await self._list()
                delay = 1.0
                while True:
                    version = await self._watch(version)
            except _Expired:
                continue  # a fresh LIST at once: the index itself is still good
            except KubeError as exc:
                self._broken()
                if exc.forbidden:
                    log.warning(
                        "cannot watch %s, reading them one by one (cached %gs); grant list "
                        "and watch (snaphook rbac) to avoid a request per object",
                        self.resource.plural,
                        self._ttl,
                        extra={"status": exc.status, "reason": exc.reason},
                    )
                    await asyncio.sleep(self._forbidden_retry)
                    continue
                log.warning(
                    "watch of %s failed, listing again in %gs",
                    self.resource.plural,
                    delay,
                    extra={"status": exc.status, "reason": exc.reason},
                )
            except Exception:
                # A bug, or an answer no API server should give (an event line over the
                # client's limit): a dead watch would leave the index answering stale, as
                # if synced, until a restart. Count it as broken and list again.
                self._broken()
                log.exception(
                    "watch of %s stopped unexpectedly, listing again in %gs",
                    self.resource.plural,
                    delay,
                )
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, 30.0)

    def _broken(self) -> None:
        if self._broken_since is None:
            self._broken_since = self._clock()

    async def _list(self) -> str:
        objects: dict[Key, dict[str, str]] = {}
        query = [("limit", _PAGE)]
        while True:
            page = await self._access.get(
                self.resource.path(),
                query=query,
                accept=METADATA_LIST,
                timeout=max(self._request_timeout, 60.0),
            )
            for item in page.get("items") or []:
                metadata = (item.get("metadata") or {}) if isinstance(item, dict) else {}
                if isinstance(metadata, dict) and metadata.get("name"):
                    objects[self._key_of(metadata)] = snaphook_annotations(metadata)
            list_meta = page.get("metadata") or {}
            token = list_meta.get("continue")
            if not token:
                break
            query = [("limit", _PAGE), ("continue", str(token))]
        self._objects = objects
        self._listed = True
        self._broken_since = None
        self._cache.clear()  # the index answers from now on
        return str(list_meta.get("resourceVersion") or "")

    async def _watch(self, version: str) -> str:
        """Apply watch events until the server ends the stream; the last version seen."""
        # Servers end a watch after timeoutSeconds; spread the reconnects like client-go.
        timeout = random.randint(300, 600)
        query = [("allowWatchBookmarks", "true"), ("timeoutSeconds", str(timeout))]
        if version:
            query.append(("resourceVersion", version))
        async with self._access.watch(
            self.resource.path(), query=query, read_timeout=timeout + 30.0
        ) as events:
            self._synced.set()  # listed and watching: nothing is missed from here on
            async for event in events:
                version = self._apply(event) or version
        return version

    def _apply(self, event: Mapping[str, Any]) -> str | None:
        kind, obj = event.get("type"), event.get("object")
        if not isinstance(obj, Mapping):
            return None
        if kind == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise _Expired
            raise KubeError(
                code if isinstance(code, int) else None,
                str(obj.get("reason") or "watch error"),
                str(obj.get("message") or ""),
            )
        metadata = obj.get("metadata") or {}
        if not isinstance(metadata, Mapping):
            return None
        if kind in ("ADDED", "MODIFIED") and metadata.get("name"):
            self._objects[self._key_of(metadata)] = snaphook_annotations(metadata)
        elif kind == "DELETED" and metadata.get("name"):
            self._objects.pop(self._key_of(metadata), None)
        version = metadata.get("resourceVersion")
        return str(version) if version else None

    def _key_of(self, metadata: Mapping[str, Any]) -> Key:
        namespace = metadata.get("namespace") if self.resource.namespaced else None
        return (str(namespace) if namespace else None, str(metadata["name"]))
