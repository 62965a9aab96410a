"""``secret(name, key)`` from Kubernetes Secrets in the target's namespace.

:class:`KubeSecretResolver` GETs Secret ``name`` in the namespace of the event's target and
returns key ``key``, base64-decoded, as a ``SecretStr``. Only Secrets that
``kube_secret_allow`` lists may be read — ``name`` (any namespace), ``namespace/name``, or
fnmatch globs of either (``mongo-*``, ``shop/*``); nothing is allowed by default, so turning
``kube_secrets`` on exposes nothing until the operator names what blueprints may read.
Answers (values, or "not found") are cached for ``ttl`` seconds, so hot events do not GET
the Secret every time; a rotated value is seen within ``ttl``. While the API server cannot be
reached (or answers 5xx), a value read within ``stale_for`` (an hour) is used rather than
failing, say, the unlock of a frozen database.

Each value is registered with the redactor when it is handed out (a function may call
``ctx.secrets.get`` itself, without the template path that registers it too), never
logged, and never part of an error message: errors name the Secret, the key and the
reason (not allowed, not found, forbidden, key missing, API unreachable).

:func:`secret_resolver` chains the resolvers: the environment first (``SNAPHOOK_SECRET_*``,
set by the operator for the dispatcher's own pod, like config bindings it is explicit
operator intent), then Kubernetes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import fnmatch
import logging
import re
import time
from collections.abc import Callable, Sequence

from pydantic import SecretStr

from dispatcher.kube import SECRETS, KubeAccess, KubeError
from dispatcher.redaction import redactor
from dispatcher.secrets import EnvSecretResolver, SecretNotFoundError, SecretUnavailableError
from dispatcher.settings import Settings
from functions.sdk import SecretResolver

__all__ = ["ChainSecretResolver", "KubeSecretResolver", "secret_resolver"]

log = logging.getLogger("snaphook.kube")

_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_MAX_CACHED = 1_000


class KubeSecretResolver:
    """A :class:`functions.sdk.SecretResolver` reading Kubernetes Secrets (module docstring)."""

    def __init__(
        self,
        access: KubeAccess,
        allow: Sequence[str],
        *,
        ttl: float = 10.0,
        stale_for: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
        request_timeout: float = 10.0,
    ) -> None:
        self._access = access
        self._allow = list(allow)
        self._ttl = ttl
        self._stale_for = max(stale_for, ttl)
        self._clock = clock
        self._request_timeout = request_timeout
        # (namespace, name) → (when read, the decoded data, or the error message)
        self._cache: dict[tuple[str, str], tuple[float, dict[str, SecretStr] | str]] = {}
        self._inflight: dict[tuple[str, str], asyncio.Future[dict[str, SecretStr] | str]] = {}

    def allowed(self, namespace: str, name: str) -> bool:
        """Whether ``kube_secret_allow`` lets blueprints read Secret ``namespace/name``."""
        return any(_allows(pattern, namespace, name) for pattern in self._allow)

    async def get(self, name: str, key: str, *, namespace: str | None = None) -> SecretStr:
        where = f"{namespace}/{name}" if namespace else name
        if not namespace:
            raise SecretNotFoundError(
                f"Kubernetes Secret {name}: no target namespace to read it from"
            )
        if not (_DNS_NAME.fullmatch(name) and _DNS_NAME.fullmatch(namespace)):
            raise SecretNotFoundError(f"Kubernetes Secret {where!r}: not a valid Secret name")
        if not self.allowed(namespace, name):
            raise SecretNotFoundError(
                f"Kubernetes Secret {where} is not allowed (add it to kube_secret_allow)"
            )
        data = await self._data(namespace, name)
        if isinstance(data, str):
            raise SecretNotFoundError(data)
        value = data.get(key)
        if value is None:
            keys = ", ".join(sorted(data)) or "none"
            raise SecretNotFoundError(
                f"Kubernetes Secret {where} has no key {key!r} (keys: {keys})"
            )
        # Masked from now on, whoever asked (a template, or a function calling ctx.secrets).
        redactor.add(value)
        return value

    async def _data(self, namespace: str, name: str) -> dict[str, SecretStr] | str:
        cache_key = (namespace, name)
        entry = self._cache.get(cache_key)
        if entry is not None and entry[0] + self._ttl > self._clock():
            return entry[1]
        future = self._inflight.get(cache_key)
        if future is None:
            future = asyncio.ensure_future(self._fetch(namespace, name))
            self._inflight[cache_key] = future
            future.add_done_callback(lambda done: self._settled(cache_key, done))
        return await asyncio.shield(future)

    def _settled(
        self, cache_key: tuple[str, str], future: asyncio.Future[dict[str, SecretStr] | str]
    ) -> None:
        self._inflight.pop(cache_key, None)
        if not future.cancelled():
            future.exception()  # retrieved: every waiter may have gone

    async def _fetch(self, namespace: str, name: str) -> dict[str, SecretStr] | str:
        where = f"{namespace}/{name}"
        try:
            document = await self._access.get(
                SECRETS.path(namespace, name), timeout=self._request_timeout
            )
        except KubeError as exc:
            if exc.not_found:
                return self._remember(namespace, name, f"Kubernetes Secret {where} not found")
            if exc.forbidden:
                return self._remember(
                    namespace,
                    name,
                    f"snaphook may not get Kubernetes Secret {where} "
                    f"({exc.status} {exc.reason}; see snaphook rbac)",
                )
            stale = self._stale(namespace, name)
            if stale is not None:
                log.warning(
                    "Kubernetes Secret %s cannot be read (%s); using the value read before",
                    where,
                    exc.reason,
                )
                return stale
            # Not cached, and retryable: the step's next attempt asks again.
            raise SecretUnavailableError(
                f"Kubernetes Secret {where}: {exc.reason}"
                + (f" ({exc.status})" if exc.status else "")
            ) from None
        return self._remember(namespace, name, _decoded(document, where))

    def _stale(self, namespace: str, name: str) -> dict[str, SecretStr] | None:
        """A value read within ``stale_for``: better than failing an unlock while the API
        server is briefly away (the Secret was not deleted: that is a 404, not an outage)."""
        entry = self._cache.get((namespace, name))
        if entry is None or not isinstance(entry[1], dict):
            return None
        return entry[1] if entry[0] + self._stale_for > self._clock() else None

    def _remember(
        self, namespace: str, name: str, data: dict[str, SecretStr] | str
    ) -> dict[str, SecretStr] | str:
        now = self._clock()
        if len(self._cache) >= _MAX_CACHED:
            self._cache = {k: v for k, v in self._cache.items() if v[0] + self._stale_for > now}
            if len(self._cache) >= _MAX_CACHED:
                self._cache.clear()
        self._cache[(namespace, name)] = (now, data)
        return data


def _allows(pattern: str, namespace: str, name: str) -> bool:
    if "/" in pattern:
        ns_pattern, name_pattern = pattern.split("/", 1)
        return fnmatch.fnmatchcase(namespace, ns_pattern) and fnmatch.fnmatchcase(
            name, name_pattern
        )
    return fnmatch.fnmatchcase(name, pattern)


def _decoded(document: dict[str, object], where: str) -> dict[str, SecretStr] | str:
    """A Secret's ``data``, base64-decoded to text."""
    data = document.get("data") or {}
    if not isinstance(data, dict):
        return f"Kubernetes Secret {where}: data is not a mapping"
    decoded: dict[str, SecretStr] = {}
    for key, encoded in data.items():
        try:
            plain = base64.b64decode(str(encoded), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            # Only the key is named: the value (or a part of it) must not leak.
            return f"Kubernetes Secret {where}: key {key!r} is not base64 of UTF-8 text"
        decoded[str(key)] = SecretStr(plain)
    return decoded


class ChainSecretResolver:
    """Asks each resolver in turn; a :class:`SecretNotFoundError` passes to the next, and
    when every one misses, the error lists each one's reason."""

    def __init__(self, resolvers: Sequence[SecretResolver]) -> None:
        self._resolvers = list(resolvers)

    async def get(self, name: str, key: str, *, namespace: str | None = None) -> SecretStr:
        misses: list[str] = []
        for resolver in self._resolvers:
            try:
                return await resolver.get(name, key, namespace=namespace)
            except SecretNotFoundError as exc:
                misses.append(exc.message)
        raise SecretNotFoundError("; ".join(misses) or f"secret {name}/{key} not found")


def secret_resolver(settings: Settings, access: KubeAccess | None) -> SecretResolver:
    """The environment, then (with ``kube_secrets``) Kubernetes Secrets."""
    env = EnvSecretResolver()
    if not settings.kube_secrets or access is None:
        return env
    kube = KubeSecretResolver(access, settings.kube_secret_allow, ttl=settings.kube_cache_ttl)
    return ChainSecretResolver([env, kube])
