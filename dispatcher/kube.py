"""The dispatcher's own Kubernetes API access: one client, raw JSON requests and watches.

Annotation bindings, Kubernetes Secrets and TokenReview share this (the ``kube.*`` hook
functions have their own client in ``functions``). Requests go through kubernetes_asyncio's
``ApiClient`` (kubeconfig or in-cluster service account, token refresh, TLS) but read the
JSON themselves, for three reasons: only metadata is needed (the API server is asked for
``PartialObjectMetadata``), a watch line is parsed without building models, and a response
body is never handed to kubernetes_asyncio's debug logging (it holds Secret data).

:class:`KubeError` is what every failure becomes: ``status`` is the HTTP status the API
server answered with, ``None`` when it could not be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

from dispatcher.errors import ConfigError

if TYPE_CHECKING:
    # Imported where used otherwise: kubernetes_asyncio takes ~0.4 s to import, which every
    # `snaphook` command would pay although most deployments never talk to the API.
    from kubernetes_asyncio import client
    from kubernetes_asyncio.config.kube_config import KubeConfigLoader

    from dispatcher.settings import Settings

log = logging.getLogger("snaphook.kube")

JSON = "application/json"
# Metadata only, with plain JSON as the fallback for servers (and fakes) that ignore it.
METADATA = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"


@dataclass(frozen=True)
class Resource:
    """One Kubernetes resource type, enough to build its URLs and RBAC rules."""

    kind: str
    group: str  # "" for the core group
    version: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        """The collection (all namespaces when ``namespace`` is None) or one object."""
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace is not None:
            base += f"/namespaces/{quote(namespace, safe='')}"
        base += f"/{self.plural}"
        return base if name is None else f"{base}/{quote(name, safe='')}"


NAMESPACES = Resource("Namespace", "", "v1", "namespaces", namespaced=False)
SECRETS = Resource("Secret", "", "v1", "secrets")
# Kinds an event subject may name for annotation bindings, by lower-case kind.
WORKLOADS: dict[str, Resource] = {
    r.kind.lower(): r
    for r in (
        Resource("Deployment", "apps", "v1", "deployments"),
        Resource("StatefulSet", "apps", "v1", "statefulsets"),
        Resource("DaemonSet", "apps", "v1", "daemonsets"),
        Resource("ReplicaSet", "apps", "v1", "replicasets"),
        Resource("Pod", "", "v1", "pods"),
        Resource("Job", "batch", "v1", "jobs"),
        Resource("CronJob", "batch", "v1", "cronjobs"),
    )
}


def workload_kind(kind: str) -> str:
    """The canonical spelling of a workload kind (``statefulset`` → ``StatefulSet``)."""
    resource = WORKLOADS.get(kind.lower())
    if resource is None:
        known = ", ".join(r.kind for r in WORKLOADS.values())
        raise ValueError(f"unknown kind {kind!r} (known: {known}; Namespace is always looked up)")
    return resource.kind


class KubeError(Exception):
    """The API server refused a request (``status``) or could not be reached (``None``)."""

    def __init__(self, status: int | None, reason: str, message: str = "") -> None:
        super().__init__(f"{status} {reason}: {message}" if status else reason)
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def forbidden(self) -> bool:
        return self.status in (401, 403)

    @property
    def not_found(self) -> bool:
        return self.status == 404


async def api_client(
    kubeconfig: Path | None, context: str | None, *, what: str
) -> client.ApiClient:
    """A client for ``kubeconfig`` (and ``context``), else the pod's service account.

    ``what`` names the feature in the :class:`ConfigError` raised when neither works.
    """
    from kubernetes_asyncio import client, config

    configuration = client.Configuration()
    try:
        if kubeconfig is not None:
            loader = await config.load_kube_config(
                config_file=str(kubeconfig),
                context=context,
                client_configuration=configuration,
                persist_config=False,  # never write back to the operator's file
            )
            _renew_exec_credentials(loader, configuration)
        else:
            # The loader is untyped in kubernetes_asyncio; it fills ``configuration``.
            config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
    except (config.ConfigException, OSError, ValueError) as exc:
        hint = "" if kubeconfig is not None else " (not in a cluster? set kubeconfig)"
        raise ConfigError(f"{what}: cannot configure Kubernetes access: {exc}{hint}") from None
    return client.ApiClient(configuration)


def _renew_exec_credentials(loader: KubeConfigLoader, configuration: client.Configuration) -> None:
    """Keep a kubeconfig's exec-plugin token fresh (EKS and GKE ones last minutes to an
    hour; kubernetes_asyncio fetches one when loading and never again). Before each request
    the client calls this hook; the loader asks the plugin again only once the token it
    gave has expired. A plugin that gives no expiry is asked once, as before. (The same as
    functions.kube_client's, which the dispatcher may not import.)"""
    if not hasattr(loader, "exec_plugin_expiry"):
        return
    lock = asyncio.Lock()  # concurrent requests on an expired token run the plugin once

    async def renew(configuration: client.Configuration) -> None:
        async with lock:
            await loader.load_from_exec_plugin()
        configuration.api_key["BearerToken"] = loader.token

    configuration.refresh_api_key_hook = renew


class KubeAccess:
    """The dispatcher's one API client, connected at startup and closed at shutdown.

    Users register their own shutdown (stopping watches) with :meth:`on_close`; they run
    before the client closes.
    """

    def __init__(self, kubeconfig: Path | None, context: str | None) -> None:
        self._kubeconfig = kubeconfig
        self._context = context
        self._client: client.ApiClient | None = None
        self._closers: list[Callable[[], Awaitable[None]]] = []

    @classmethod
    def when_needed(cls, settings: Settings) -> KubeAccess | None:
        """Access for ``kube_bindings`` and ``kube_secrets``; ``None`` when both are off."""
        if not (settings.kube_bindings or settings.kube_secrets):
            return None
        return cls(settings.kubeconfig, settings.kube_context)

    async def connect(self) -> None:
        if self._client is None:
            self._client = await api_client(
                self._kubeconfig, self._context, what="kube_bindings/kube_secrets"
            )

    @property
    def client(self) -> client.ApiClient:
        if self._client is None:
            raise RuntimeError("KubeAccess used before connect()")
        return self._client

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        self._closers.append(closer)

    async def close(self) -> None:
        for closer in reversed(self._closers):
            await closer()
        self._closers.clear()
        if self._client is not None:
            api, self._client = self._client, None
            await api.close()

    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        """An aiohttp cleanup context: a bad kubeconfig fails startup, not the first event."""
        await self.connect()
        try:
            yield
        finally:
            await self.close()

    async def get(
        self,
        path: str,
        *,
        query: Iterable[tuple[str, str]] = (),
        accept: str = JSON,
        timeout: float = 10.0,
    ) -> dict[str, Any]:
        """GET ``path`` as a JSON object; :class:`KubeError` for anything else."""
        async with self._request(path, query, accept, aiohttp.ClientTimeout(total=timeout)) as (
            response
        ):
            try:
                body = await response.read()
                document = json.loads(body)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise KubeError(None, f"reading {path}: {type(exc).__name__}") from None
            except ValueError:
                raise KubeError(None, f"{path}: the answer is not JSON") from None
        if not isinstance(document, dict):
            raise KubeError(None, f"{path}: the answer is not a JSON object")
        return document

    @contextlib.asynccontextmanager
    async def watch(
        self,
        path: str,
        *,
        query: Iterable[tuple[str, str]] = (),
        accept: str = METADATA,
        read_timeout: float,
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """A ``?watch=1`` request, open once entered; iterate it for the events, one JSON
        object per line, until the server ends the stream. A connection silent for
        ``read_timeout`` s ends in :class:`KubeError`."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=read_timeout)
        async with self._request(path, [*query, ("watch", "1")], accept, timeout) as response:
            yield _events(response, path)

    @contextlib.asynccontextmanager
    async def _request(
        self,
        path: str,
        query: Iterable[tuple[str, str]],
        accept: str,
        timeout: aiohttp.ClientTimeout,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        try:
            # _preload_content=False: the raw aiohttp response, unread and unlogged.
            response: aiohttp.ClientResponse = await self.client.call_api(
                path,
                "GET",
                query_params=list(query),
                header_params={"Accept": accept},
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=timeout,
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise KubeError(
                None, f"the API server cannot be reached ({type(exc).__name__})"
            ) from None
        try:
            if response.status >= 300:
                raise await _error_of(response)
            yield response
        finally:
            response.release()


async def _error_of(response: aiohttp.ClientResponse) -> KubeError:
    """The API server's ``Status`` answer as a :class:`KubeError`."""
    message, reason = "", response.reason or ""
    try:
        status = json.loads(await response.read())
    except (ValueError, aiohttp.ClientError, OSError):
        status = None
    if isinstance(status, dict):
        message = str(status.get("message") or "")[:500]
        reason = str(status.get("reason") or reason)
    return KubeError(response.status, reason, message)


KUBE = web.AppKey("snaphook_kube", KubeAccess)


async def _events(response: aiohttp.ClientResponse, path: str) -> AsyncIterator[dict[str, Any]]:
    while True:
        try:
            line = await response.content.readline()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise KubeError(None, f"watching {path}: {type(exc).__name__}") from None
        if not line:
            return
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            raise KubeError(None, f"watching {path}: a line is not JSON") from None
        if isinstance(event, dict):
            yield event
