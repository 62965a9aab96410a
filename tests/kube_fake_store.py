"""The fake API server's object store: objects by resource, a global resourceVersion,
the watch history, and the write semantics every writer shares (the HTTP side, the
controllers and tests' seeding helpers): defaulting, validation, metadata, owner-reference
cascades. :class:`tests.kube_fake.FakeCluster` adds what tests script on top of it.
"""

from __future__ import annotations

import asyncio
import copy
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tests import kube_fake_controllers as controllers
from tests.kube_fake_resources import (
    ApiError,
    Resource,
    Selector,
    already_exists,
    bad_request,
    conflict,
    find_resource,
    not_found,
)

_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # what generateName suffixes are made of


@dataclass(frozen=True)
class Change:
    """One entry of the watch history."""

    rv: int
    type: str  # ADDED MODIFIED DELETED
    resource: Resource
    obj: dict[str, Any]
    old: dict[str, Any] | None


def now_timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Store:
    def __init__(self) -> None:
        self._objects: dict[Resource, dict[tuple[str, str], dict[str, Any]]] = {}
        self._rv = 1000
        self._history: list[Change] = []
        self._oldest_rv = 0  # watches from before this get 410 Gone
        self.watchers: set[asyncio.Queue[Change | None]] = set()
        self._tasks: set[asyncio.Future[Any]] = set()
        self._pulse: asyncio.Event | None = None

    def created(self, resource: Resource, obj: dict[str, Any]) -> None:
        """Called after every create (controllers react here)."""

    def modified(self, resource: Resource, new: dict[str, Any], old: dict[str, Any]) -> None:
        """Called after every effective update."""

    def compact(self) -> None:
        """Forget the watch history (as etcd compaction does): older resourceVersions 410."""
        self._oldest_rv = self._rv
        self._history.clear()

    def _bucket(self, resource: Resource) -> dict[tuple[str, str], dict[str, Any]]:
        return self._objects.setdefault(resource, {})

    def changed(self) -> asyncio.Event:
        """Set at the next change of the store (a new event each time)."""
        if self._pulse is None:
            self._pulse = asyncio.Event()
        return self._pulse

    def notify(self) -> None:
        """Wake ``wait_until`` callers (store changes, exec sessions ending)."""
        if self._pulse is not None:
            self._pulse.set()
            self._pulse = None

    @property
    def resource_version(self) -> int:
        return self._rv

    def add_watcher(self, queue: asyncio.Queue[Change | None]) -> None:
        self.watchers.add(queue)
        self.notify()

    def history_since(self, rv: int) -> list[Change]:
        if rv < self._oldest_rv:
            raise ApiError(410, "Expired", f"too old resource version: {rv} ({self._oldest_rv})")
        return [c for c in self._history if c.rv > rv]

    def lookup(self, resource: Resource, namespace: str | None, name: str) -> dict[str, Any] | None:
        return self._bucket(resource).get((namespace or "", name))

    def require(self, resource: Resource, namespace: str | None, name: str) -> dict[str, Any]:
        found = self.lookup(resource, namespace, name)
        if found is None:
            raise not_found(resource, name)
        return found

    def select(
        self, resource: Resource, namespace: str | None, selector: Selector
    ) -> list[dict[str, Any]]:
        bucket = self._bucket(resource)
        return [
            bucket[key]
            for key in sorted(bucket)
            if namespace in (None, key[0]) and selector.matches(bucket[key])
        ]

    def _emit(
        self, kind: str, resource: Resource, obj: dict[str, Any], old: dict[str, Any] | None
    ) -> None:
        change = Change(int(obj["metadata"]["resourceVersion"]), kind, resource, obj, old)
        self._history.append(change)
        for queue in self.watchers:
            queue.put_nowait(change)
        self.notify()

    def _bump(self) -> str:
        self._rv += 1
        return str(self._rv)

    def create_object(
        self,
        resource: Resource,
        body: dict[str, Any],
        namespace: str | None,
        *,
        keep_status: bool = False,
    ) -> dict[str, Any]:
        obj = copy.deepcopy(body)
        obj["apiVersion"], obj["kind"] = resource.api_version, resource.kind
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            suffix = "".join(secrets.choice(_NAME_CHARS) for _ in range(5))
            meta["name"] = f"{meta['generateName']}{suffix}"
        name = meta.get("name") or ""
        controllers.validate(resource, obj)
        if resource.namespaced:
            if meta.get("namespace", namespace) != namespace:
                raise bad_request(
                    "the namespace of the provided object does not match the namespace sent "
                    "on the request"
                )
            meta["namespace"] = namespace
            if self.lookup(find_resource("namespaces"), None, namespace or "") is None:
                raise not_found(find_resource("namespaces"), namespace or "")
        if self.lookup(resource, namespace, name) is not None:
            raise already_exists(resource, name)
        meta.update(
            uid=str(uuid.uuid4()), resourceVersion=self._bump(), creationTimestamp=now_timestamp()
        )
        for transient in ("deletionTimestamp", "selfLink"):
            meta.pop(transient, None)
        if resource.generation:
            meta["generation"] = 1
        if resource.status and not keep_status:
            obj["status"] = controllers.initial_status(resource, obj)
        controllers.default(resource, obj)
        self._bucket(resource)[(namespace or "", name)] = obj
        self._emit("ADDED", resource, copy.deepcopy(obj), None)
        self.created(resource, obj)
        return copy.deepcopy(obj)

    def replace_object(
        self,
        resource: Resource,
        current: dict[str, Any],
        new: dict[str, Any],
        *,
        part: str = "main",  # "main": status is ignored; "status": only status; "all"
    ) -> dict[str, Any]:
        name = current["metadata"]["name"]
        wanted_rv = (new.get("metadata") or {}).get("resourceVersion")
        if wanted_rv and wanted_rv != current["metadata"]["resourceVersion"]:
            raise conflict(resource, name)
        if part == "status":
            updated = copy.deepcopy(current)
            updated["status"] = copy.deepcopy(new.get("status") or {})
        else:
            updated = copy.deepcopy(new)
            if resource.status and part == "main":
                updated["status"] = copy.deepcopy(current.get("status") or {})
        updated["apiVersion"], updated["kind"] = resource.api_version, resource.kind
        meta = updated.setdefault("metadata", {})
        for key in ("name", "namespace", "uid", "creationTimestamp", "generation"):
            if key in current["metadata"]:
                meta[key] = current["metadata"][key]
        if part != "status":
            controllers.validate(resource, updated)
        meta["resourceVersion"] = current["metadata"]["resourceVersion"]
        if updated == current:
            return copy.deepcopy(current)  # a no-op write does not bump resourceVersion
        if resource.generation and updated.get("spec") != current.get("spec"):
            meta["generation"] = current["metadata"].get("generation", 1) + 1
        meta["resourceVersion"] = self._bump()
        self._bucket(resource)[(current["metadata"].get("namespace", ""), name)] = updated
        self._emit("MODIFIED", resource, copy.deepcopy(updated), copy.deepcopy(current))
        self.modified(resource, updated, current)
        return copy.deepcopy(updated)

    def delete_object(
        self, resource: Resource, namespace: str | None, name: str, policy: str | None
    ) -> dict[str, Any]:
        obj = self.require(resource, namespace, name)
        del self._bucket(resource)[(namespace or "", name)]
        gone = copy.deepcopy(obj)
        gone["metadata"]["resourceVersion"] = self._bump()
        self._emit("DELETED", resource, copy.deepcopy(gone), obj)
        if policy is None and resource.group == "batch":
            policy = "Orphan"  # batch/v1 Jobs orphan their pods unless told otherwise
        if policy != "Orphan":
            self._delete_dependents(obj["metadata"]["uid"])
        return gone

    def _delete_dependents(self, owner_uid: str) -> None:
        for resource, bucket in list(self._objects.items()):
            for (ns, name), obj in list(bucket.items()):
                owners = obj["metadata"].get("ownerReferences") or []
                if any(o.get("uid") == owner_uid for o in owners):
                    self.delete_object(resource, ns or None, name, "Background")

    # --- background work (controllers, exec sessions) --------------------------------

    def spawn(self, work: Any) -> None:
        self.track(asyncio.get_running_loop().create_task(work))

    def track(self, task: asyncio.Future[Any]) -> None:
        """Cancel ``task`` when the server shuts down, if it is still running."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shutdown(self) -> None:
        for queue in self.watchers:
            queue.put_nowait(None)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
