"""Kubernetes API access for kube.* functions (and bindings/secrets that reuse it).

* :func:`api_client` / :func:`ws_client` — a kubernetes_asyncio ``ApiClient`` (REST) or
  ``WsApiClient`` (exec over WebSocket) for ``ctx.kube``: the kubeconfig file and context
  it names, or the pod's service account when it names none. Clients are cached per event
  loop and configuration (each holds an HTTP connection pool), and closed when the loop
  shuts down (``asyncio.run``, ``aiohttp.web.run_app`` and pytest all shut down async
  generators, which is the hook used) or by :func:`close_clients`.
* :func:`api_errors` — the one translation of API failures into the runner's policy:
  refusals (401, 403, 404, 422, AlreadyExists) are :class:`PermanentError`; conflicts,
  throttling (429 with ``Retry-After``), server errors and unreachable servers are
  :class:`RetryableError` (409 Conflict as its subclass :class:`Conflict`). Messages come
  from the API server's ``Status`` and never include request headers (the bearer token).
* :class:`KindInfo` / :class:`ObjectRef` — ``namespace/Kind/name`` targets resolved to
  their API (group, version, plural), with :func:`read_object` / :func:`patch_object`
  for kind-independent reads and patches.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp

from functions.sdk import EventInfo, FunctionError, KubeConfig, PermanentError, RetryableError

if TYPE_CHECKING:
    from kubernetes_asyncio.client import ApiClient, Configuration
    from kubernetes_asyncio.config.kube_config import KubeConfigLoader
    from kubernetes_asyncio.stream import WsApiClient

__all__ = [
    "JSON_PATCH",
    "MERGE_PATCH",
    "STRATEGIC_MERGE_PATCH",
    "Conflict",
    "KindInfo",
    "ObjectRef",
    "api_client",
    "api_errors",
    "close_clients",
    "event_target",
    "kind_info",
    "map_api_error",
    "parse_target",
    "patch_object",
    "read_object",
    "ws_client",
]

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"

# --- clients, one per (event loop, configuration) ---------------------------------------

_ClientKey = tuple[str | None, str | None, bool]  # kubeconfig, context, websocket?


@dataclass
class _LoopClients:
    clients: dict[_ClientKey, ApiClient] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    closer: AsyncIterator[None] | None = None


_per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClients] = (
    weakref.WeakKeyDictionary()
)


async def _close_at_loop_end(clients: dict[_ClientKey, ApiClient]) -> AsyncIterator[None]:
    """Parked at ``yield`` for the loop's lifetime: the loop closes it (and so the
    clients' sessions) in ``shutdown_asyncgens()``, before it closes itself."""
    try:
        yield
    finally:
        await _close_all(clients)


async def _close_all(clients: dict[_ClientKey, ApiClient]) -> None:
    while clients:
        _, client = clients.popitem()
        await client.close()


async def _loop_clients() -> _LoopClients:
    loop = asyncio.get_running_loop()
    entry = _per_loop.get(loop)
    if entry is None:
        entry = _per_loop[loop] = _LoopClients()
        closer = _close_at_loop_end(entry.clients)
        await anext(closer)  # registers it with the loop's async generator hooks
        entry.closer = closer
    return entry


async def _configuration(kube: KubeConfig) -> Configuration:
    from kubernetes_asyncio import client, config

    configuration = client.Configuration()
    try:
        if kube.kubeconfig is not None:
            loader = await config.load_kube_config(
                config_file=kube.kubeconfig,
                context=kube.context,
                client_configuration=configuration,
                persist_config=False,  # never write back to the operator's file
            )
            _renew_exec_credentials(loader, configuration)
        else:
            config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
    except (config.ConfigException, OSError) as exc:
        raise PermanentError(f"cannot configure Kubernetes access: {exc}") from None
    return configuration


def _renew_exec_credentials(loader: KubeConfigLoader, configuration: Configuration) -> None:
    """Keep a kubeconfig's exec-plugin token fresh (EKS and GKE ones last minutes to an
    hour; kubernetes_asyncio fetches one when loading and never again). Before each request
    the client calls this hook; the loader asks the plugin again only once the token it
    gave has expired. A plugin that gives no expiry is asked once, as before."""
    if not hasattr(loader, "exec_plugin_expiry"):
        return
    lock = asyncio.Lock()  # concurrent requests on an expired token run the plugin once

    async def renew(configuration: Configuration) -> None:
        async with lock:
            await loader.load_from_exec_plugin()
        configuration.api_key["BearerToken"] = loader.token

    configuration.refresh_api_key_hook = renew


async def _client(kube: KubeConfig, websocket: bool) -> ApiClient:
    entry = await _loop_clients()
    key: _ClientKey = (kube.kubeconfig, kube.context, websocket)
    async with entry.lock:  # concurrent first calls share one client
        found = entry.clients.get(key)
        if found is None:
            from kubernetes_asyncio.client import ApiClient
            from kubernetes_asyncio.stream import WsApiClient

            configuration = await _configuration(kube)
            found = WsApiClient(configuration) if websocket else ApiClient(configuration)
            entry.clients[key] = found
        return found


async def api_client(kube: KubeConfig) -> ApiClient:
    """The REST client for ``kube``, shared by every step on this event loop."""
    return await _client(kube, websocket=False)


async def ws_client(kube: KubeConfig) -> WsApiClient:
    """The WebSocket client (exec, attach) for ``kube``, shared like :func:`api_client`."""
    from kubernetes_asyncio.stream import WsApiClient

    found = await _client(kube, websocket=True)
    assert isinstance(found, WsApiClient)
    return found


async def close_clients() -> None:
    """Close this loop's clients now (they would be closed when the loop shuts down)."""
    entry = _per_loop.get(asyncio.get_running_loop())
    if entry is not None:
        await _close_all(entry.clients)


# --- errors ------------------------------------------------------------------------------


class Conflict(RetryableError):
    """409 Conflict: the object changed since it was read (a stale resourceVersion).
    Retrying the whole read-decide-write fixes it; callers may catch it to do so at once."""


def _status_of(body: Any) -> dict[str, Any]:
    """The API server's ``Status`` from an error body, or {} when it sent something else."""
    try:
        status = json.loads(body) if isinstance(body, str | bytes) else body
    except ValueError:
        return {}
    return status if isinstance(status, dict) else {}


def _retry_after(headers: Any) -> float | None:
    try:
        return float(headers["Retry-After"]) if headers and "Retry-After" in headers else None
    except (TypeError, ValueError):
        return None


def map_api_error(
    code: int, status: dict[str, Any], what: str, headers: Any = None
) -> FunctionError:
    """The function error for an API answer ``code`` with ``Status`` body ``status``
    about ``what`` (``Pod db/mongo-0``, ``exec in Pod db/mongo-0``...)."""
    message = str(status.get("message") or "").strip()
    reason = str(status.get("reason") or "")
    said = f": {message}" if message else ""
    if code == 401:
        return PermanentError(
            f"{what}: the Kubernetes API server did not accept snaphook's credentials "
            "(401 Unauthorized)"
        )
    if code == 403:
        return PermanentError(f"{what}: forbidden by Kubernetes RBAC{said or ' (403)'}")
    if code == 404:
        return PermanentError(f"{what} not found")
    if code == 409 and reason == "AlreadyExists":
        return PermanentError(f"{what} already exists")
    if code == 409:
        return Conflict(f"{what}: conflict{said}")
    if code in (400, 422):
        return PermanentError(f"{what}: invalid request{said}")
    if code == 429:
        return RetryableError(
            f"{what}: throttled by the Kubernetes API server{said}", delay=_retry_after(headers)
        )
    if code >= 500 or code == 0:
        return RetryableError(f"{what}: Kubernetes API server error {code}{said}")
    return PermanentError(f"{what}: refused by the Kubernetes API server ({code}){said}")


@contextmanager
def api_errors(what: str) -> Iterator[None]:
    """Translate Kubernetes API failures inside the block into function errors."""
    from kubernetes_asyncio.client.exceptions import ApiException

    try:
        yield
    except ApiException as exc:
        raise map_api_error(exc.status or 0, _status_of(exc.body), what, exc.headers) from None
    except aiohttp.WSServerHandshakeError as exc:
        # A refused WebSocket upgrade carries only the HTTP status, no Status body.
        raise map_api_error(exc.status, {}, what, exc.headers) from None
    except TimeoutError:
        raise  # the caller's own deadline, not a connection failure
    except (aiohttp.ClientError, OSError) as exc:
        raise RetryableError(
            f"{what}: cannot reach the Kubernetes API server ({type(exc).__name__})"
        ) from None


# --- targets -----------------------------------------------------------------------------


@dataclass(frozen=True)
class KindInfo:
    """Where a kind is served: ``/apis/<group>/<version>/.../<plural>``."""

    kind: str
    group: str
    version: str
    plural: str
    namespaced: bool = True
    aliases: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else "/api/v1"
        if self.namespaced:
            base += f"/namespaces/{namespace}"
        parts = [base, self.plural, *(p for p in (name, sub) if p)]
        return "/".join(parts)


KINDS: tuple[KindInfo, ...] = (
    KindInfo("Deployment", "apps", "v1", "deployments", aliases=("deploy",)),
    KindInfo("StatefulSet", "apps", "v1", "statefulsets", aliases=("sts",)),
    KindInfo("DaemonSet", "apps", "v1", "daemonsets", aliases=("ds",)),
    KindInfo("ReplicaSet", "apps", "v1", "replicasets", aliases=("rs",)),
    KindInfo("Pod", "", "v1", "pods", aliases=("po",)),
    KindInfo("Service", "", "v1", "services", aliases=("svc",)),
    KindInfo("ConfigMap", "", "v1", "configmaps", aliases=("cm",)),
    KindInfo("Secret", "", "v1", "secrets"),
    KindInfo("PersistentVolumeClaim", "", "v1", "persistentvolumeclaims", aliases=("pvc",)),
    KindInfo("Namespace", "", "v1", "namespaces", namespaced=False, aliases=("ns",)),
    KindInfo("Job", "batch", "v1", "jobs"),
    KindInfo("CronJob", "batch", "v1", "cronjobs", aliases=("cj",)),
)


def kind_info(kind: str) -> KindInfo:
    """The API of ``kind`` (``StatefulSet``, ``statefulsets``, ``sts``, any case)."""
    wanted = kind.strip().lower()
    for info in KINDS:
        if wanted in (info.kind.lower(), info.plural, *info.aliases):
            return info
    known = ", ".join(k.kind for k in KINDS)
    raise PermanentError(f"unknown Kubernetes kind {kind!r} (known: {known})")


@dataclass(frozen=True)
class ObjectRef:
    """One object: ``namespace/Kind/name``."""

    namespace: str
    kind: KindInfo
    name: str

    def __str__(self) -> str:  # as messages name it: "StatefulSet db/mongo"
        return f"{self.kind.kind} {self.namespace}/{self.name}"

    @property
    def path(self) -> str:
        return self.kind.path(self.namespace, self.name)


def parse_target(text: str) -> ObjectRef:
    """``namespace/Kind/name`` (an event's subject) as an :class:`ObjectRef`."""
    parts = text.split("/")
    if len(parts) != 3 or not all(p.strip() for p in parts):
        raise PermanentError(f"target {text!r} is not 'namespace/Kind/name'")
    return ObjectRef(parts[0].strip(), kind_info(parts[1]), parts[2].strip())


def event_target(event: EventInfo) -> ObjectRef:
    """The event's target: ``data.target`` when present, else its subject."""
    target = event.data.get("target") if isinstance(event.data, dict) else None
    if isinstance(target, dict) and {"namespace", "kind", "name"} <= target.keys():
        return parse_target(f"{target['namespace']}/{target['kind']}/{target['name']}")
    return parse_target(event.subject)


# --- kind-independent access -------------------------------------------------------------


async def _call(
    api: ApiClient,
    method: str,
    path: str,
    what: str,
    body: Any = None,
    content_type: str = "application/json",
) -> dict[str, Any]:
    with api_errors(what):
        result = await api.call_api(
            path,
            method,
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            response_types_map={200: "object", 201: "object"},
            auth_settings=["BearerToken"],
            _return_http_data_only=True,
        )
    if not isinstance(result, dict):
        raise RetryableError(f"{what}: the Kubernetes API server answered with no object")
    return result


async def read_object(api: ApiClient, ref: ObjectRef, sub: str | None = None) -> dict[str, Any]:
    """GET the object (or its ``sub``resource, e.g. ``scale``) as plain JSON."""
    path = ref.kind.path(ref.namespace, ref.name, sub)
    return await _call(api, "GET", path, str(ref))


async def patch_object(
    api: ApiClient,
    ref: ObjectRef,
    patch: Any,
    *,
    content_type: str = MERGE_PATCH,
    sub: str | None = None,
) -> dict[str, Any]:
    """PATCH the object (or its ``sub``resource) and return what the server stored."""
    path = ref.kind.path(ref.namespace, ref.name, sub)
    return await _call(api, "PATCH", path, str(ref), patch, content_type)
