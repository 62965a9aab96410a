"""A protocol-faithful fake Kubernetes API server for tests, driven by the real
kubernetes_asyncio client over HTTP.

``FakeCluster`` is the API server's state (:mod:`tests.kube_fake_store`) plus the
behaviours a test scripts; the HTTP side lives in :mod:`tests.kube_fake_http`, exec in
:mod:`tests.kube_fake_exec`, the Job and workload controllers in
:mod:`tests.kube_fake_controllers`. The ``kube_cluster``
fixture serves one per test on a free port::

    async def test_x(kube_cluster: RunningCluster) -> None:
        cluster = kube_cluster.cluster
        cluster.add_pod("db", "mongo-0", labels={"app": "mongo"})
        cluster.on_exec("mongo-0", lambda call: ExecResult(stdout="ok\\n"))
        cluster.deny("create", "pods/exec", namespace="db")
        ...  # call code using kube_cluster.kubeconfig / kube_cluster.kube_config
        assert cluster.requests_to(verb="create", resource="pods/exec")

What it models: metadata (uid, global resourceVersion, creationTimestamp, generation),
GET/LIST/WATCH/CREATE/PUT/PATCH/DELETE with ``Status`` errors, label and field
selectors, status and scale subresources (the main endpoint ignores ``status``), owner
references (delete cascades unless orphaned; ``batch/v1`` Jobs orphan by default, as in
Kubernetes), pod logs, exec over WebSocket, bearer-token authentication and RBAC denials.
Simplifications: no admission, defaulting only of the fields tests read, no list paging,
foreground deletion behaves like background, and core/v1 and events.k8s.io/v1 Events are
stored separately.
"""

from __future__ import annotations

import asyncio
import copy
import json
import secrets
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from multidict import MultiDict

from functions.sdk import KubeConfig
from tests import kube_fake_controllers as controllers
from tests.kube_fake_controllers import JobScript, Rollout
from tests.kube_fake_exec import PROTOCOLS as EXEC_PROTOCOLS
from tests.kube_fake_exec import ExecCall, ExecHandler, ExecResult
from tests.kube_fake_patch import merge_patch
from tests.kube_fake_resources import (
    Resource,
    Selector,
    find_resource,
    status_body,
)
from tests.kube_fake_store import Change, Store

__all__ = [
    "Change",
    "ExecCall",
    "ExecResult",
    "FakeCluster",
    "JobScript",
    "RecordedRequest",
    "Rollout",
    "RunningCluster",
    "kube_call",
    "kube_cluster",
]

SERVICE_ACCOUNT = "system:serviceaccount:snaphook:snaphook"
_REASONS = {
    409: "Conflict",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


@dataclass
class RecordedRequest:
    """One request as the API server saw it."""

    method: str
    path: str
    query: MultiDict[str]
    content_type: str
    body: Any  # the JSON body, parsed; None without one
    verb: str = ""  # get list watch create update patch delete (RBAC verbs)
    resource: str = ""  # plural[/subresource], e.g. "pods/exec", "deployments/scale"
    namespace: str | None = None
    name: str | None = None
    status: int = 0  # the HTTP status answered

    @property
    def propagation_policy(self) -> str | None:
        """A DELETE's propagationPolicy, from the query or a DeleteOptions body."""
        if "propagationPolicy" in self.query:
            return self.query["propagationPolicy"]
        if isinstance(self.body, dict):
            policy = self.body.get("propagationPolicy")
            return str(policy) if policy is not None else None
        return None


class FakeCluster(Store):
    """The API server's state plus the behaviours tests script."""

    def __init__(self, token: str | None = None, user: str = SERVICE_ACCOUNT) -> None:
        super().__init__()
        self.token = token or secrets.token_urlsafe(24)
        self.user = user
        self.requests: list[RecordedRequest] = []
        self.execs: list[ExecCall] = []
        self._denials: list[tuple[str, str, str | None]] = []
        self._failures: list[list[Any]] = []
        self._exec_handlers: dict[tuple[str | None, str | None], ExecHandler] = {}
        self.job_scripts: list[tuple[str, JobScript | Callable[[dict[str, Any]], JobScript]]] = []
        self.rollouts: dict[tuple[str, str], Rollout] = {}
        self._logs: dict[tuple[str, str, str], str] = {}
        # The exec subprotocols served, preferred first; drop v5 for a server before
        # Kubernetes 1.30, which cannot be told that stdin ended.
        self.exec_protocols: tuple[str, ...] = EXEC_PROTOCOLS

    # --- scripting: what tests set up -----------------------------------------------

    def deny(self, verb: str, resource: str, namespace: str | None = None) -> None:
        """Refuse ``verb`` on ``resource`` (``pods``, ``pods/exec``, ``deployments/scale``)
        with 403, in ``namespace`` or everywhere; ``*`` matches any verb."""
        self._denials.append((verb, resource, namespace))

    def fail(
        self,
        verb: str,
        resource: str,
        code: int,
        *,
        times: int = 1,
        retry_after: int | None = None,
        message: str = "injected failure",
    ) -> None:
        """Answer the next ``times`` matching requests with ``code`` (429, 500, 503, 409...)
        and a ``Status`` (``Retry-After`` header when given)."""
        self._failures.append([verb, resource, code, times, retry_after, message])

    def injected_failure(self, verb: str, resource: str) -> web.Response | None:
        for failure in self._failures:
            f_verb, f_resource, code, times, retry_after, message = failure
            if times > 0 and f_verb in ("*", verb) and f_resource == resource:
                failure[3] = times - 1
                reason = _REASONS.get(code, "InternalError")
                body = status_body(code, reason, message)
                headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
                return web.json_response(body, status=code, headers=headers)
        return None

    def is_denied(self, verb: str, resource: str, namespace: str | None) -> bool:
        return any(
            v in ("*", verb) and r == resource and ns in (None, namespace)
            for v, r, ns in self._denials
        )

    def on_exec(self, pod: str | None, handler: ExecHandler, namespace: str | None = None) -> None:
        """What a command exec'd in ``pod`` (any pod when None) does."""
        self._exec_handlers[(namespace, pod)] = handler

    def exec_handler(self, namespace: str, pod: str) -> ExecHandler | None:
        for key in ((namespace, pod), (None, pod), (namespace, None), (None, None)):
            if key in self._exec_handlers:
                return self._exec_handlers[key]
        return None

    def on_job(
        self,
        script: JobScript | Callable[[dict[str, Any]], JobScript],
        name_prefix: str = "",
    ) -> None:
        """How Jobs whose name starts with ``name_prefix`` run (latest match wins); a
        callable gets the created Job. Unscripted Jobs succeed at once with no logs."""
        self.job_scripts.append((name_prefix, script))

    def set_rollout(
        self,
        namespace: str,
        name: str,
        delay: float | None = 0.0,
        max_ready: int | None = None,
    ) -> None:
        """How workload ``name``'s status follows spec.replicas: after ``delay`` seconds,
        never when None; readyReplicas capped at ``max_ready``."""
        self.rollouts[(namespace, name)] = Rollout(delay, max_ready)

    def set_logs(self, namespace: str, pod: str, text: str, container: str | None = None) -> None:
        obj = self.get("pods", namespace, pod)
        if obj is None:
            raise KeyError(f"no pod {namespace}/{pod}")
        name = container or obj["spec"]["containers"][0]["name"]
        self._logs[(namespace, pod, name)] = text
        self.notify()

    def logs_of(self, namespace: str, pod: str, container: str) -> str:
        return self._logs.get((namespace, pod, container), "")

    # --- the store, as tests see it -------------------------------------------------

    def add(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Store ``obj`` (with kind and apiVersion) as if it had always been there: its
        status is kept and a missing Namespace is created."""
        resource = find_resource(obj["kind"], obj["apiVersion"].rpartition("/")[0])
        namespace = obj.get("metadata", {}).get("namespace")
        if resource.namespaced:
            namespace = namespace or "default"
            if self.get("namespaces", None, namespace) is None:
                self.add_namespace(namespace)
        return self.create_object(resource, obj, namespace, keep_status=True)

    def add_namespace(
        self,
        name: str,
        labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": name, "labels": {"kubernetes.io/metadata.name": name}}
        metadata["labels"].update(labels or {})
        if annotations:
            metadata["annotations"] = annotations
        return self.add(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": metadata,
                "status": {"phase": "Active"},
            }
        )

    def add_pod(
        self,
        namespace: str,
        name: str,
        labels: dict[str, str] | None = None,
        containers: Iterable[str] = ("main",),
        phase: str = "Running",
        annotations: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        names = list(containers)
        metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels or {}}
        if annotations:
            metadata["annotations"] = annotations
        return self.add(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": metadata,
                "spec": {"containers": [{"name": c, "image": f"{c}:latest"} for c in names]},
                "status": controllers.pod_status(phase, names),
            }
        )

    def add_workload(
        self,
        kind: str,
        namespace: str,
        name: str,
        replicas: int = 1,
        labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """A ready Deployment/StatefulSet/DaemonSet selecting ``app=<name>`` pods."""
        resource = find_resource(kind, "apps")
        selector = {"app": name}
        metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels or {}}
        if annotations:
            metadata["annotations"] = annotations
        spec: dict[str, Any] = {
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": selector},
                "spec": {"containers": [{"name": "main", "image": "main:latest"}]},
            },
        }
        if resource.scale:
            spec["replicas"] = replicas
        obj = {"apiVersion": "apps/v1", "kind": resource.kind, "metadata": metadata, "spec": spec}
        obj["status"] = controllers.workload_status(resource, replicas, replicas, generation=1)
        return self.add(obj)

    def get(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        r = find_resource(resource)
        found = self._bucket(r).get((namespace or "", name))
        return copy.deepcopy(found) if found is not None else None

    def items(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        r = find_resource(resource)
        return [copy.deepcopy(o) for o in self.select(r, namespace, Selector())]

    def update(
        self, resource: str, namespace: str | None, name: str, patch: dict[str, Any]
    ) -> dict[str, Any]:
        """Merge ``patch`` into the object (status included), as a controller would."""
        r = find_resource(resource)
        current = self.require(r, namespace, name)
        return self.replace_object(r, current, merge_patch(current, patch), part="all")

    def remove(self, resource: str, namespace: str | None, name: str) -> None:
        r = find_resource(resource)
        self.delete_object(r, namespace, name, "Background")

    def requests_to(
        self,
        verb: str | None = None,
        resource: str | None = None,
        namespace: str | None = None,
        name: str | None = None,
    ) -> list[RecordedRequest]:
        return [
            r
            for r in self.requests
            if verb in (None, r.verb)
            and resource in (None, r.resource)
            and namespace in (None, r.namespace)
            and name in (None, r.name)
        ]

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until ``predicate()`` holds, re-checking it at every store change, request
        and exec session change (no sleep loop)."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await self.changed().wait()

    # --- the controllers, reacting to writes ----------------------------------------

    def created(self, resource: Resource, obj: dict[str, Any]) -> None:
        controllers.created(self, resource, obj)

    def modified(self, resource: Resource, new: dict[str, Any], old: dict[str, Any]) -> None:
        controllers.modified(self, resource, new, old)


# --- serving it --------------------------------------------------------------------------


@dataclass
class RunningCluster:
    """A fake API server listening on 127.0.0.1."""

    cluster: FakeCluster
    url: str
    kubeconfig: Path

    @property
    def kube_config(self) -> KubeConfig:
        """What ``ctx.kube`` holds for functions talking to this server."""
        return KubeConfig(kubeconfig=str(self.kubeconfig), context="fake")


def write_kubeconfig(path: Path, server: str, token: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "snaphook", "user": {"token": token}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "snaphook"}}],
        "current-context": "fake",
    }
    path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    return path


def write_exec_kubeconfig(path: Path, server: str, token_file: Path) -> Path:
    """A kubeconfig whose user is an exec credential plugin (as for EKS or GKE) handing
    out the token in ``token_file``, with an expiry already past: every request that checks
    the expiry asks the plugin again, so a token rotated in the file is picked up."""
    plugin = path.with_suffix(".plugin.sh")
    credential = (
        '{"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential", '
        '"status": {"token": "%s", "expirationTimestamp": "2000-01-01T00:00:00Z"}}'
    )
    plugin.write_text(f"printf '{credential}' \"$(cat '{token_file}')\"\n", encoding="utf-8")
    user = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1beta1",
            "command": "/bin/sh",
            "args": [str(plugin)],
        }
    }
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "plugin", "user": user}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "plugin"}}],
        "current-context": "fake",
    }
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


@pytest.fixture
async def kube_cluster(tmp_path: Path) -> AsyncIterator[RunningCluster]:
    """A fresh fake Kubernetes API server per test (namespace ``default`` exists)."""
    from tests.kube_fake_http import build_app

    cluster = FakeCluster()
    cluster.add_namespace("default")
    runner = web.AppRunner(build_app(cluster), shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    url = f"http://127.0.0.1:{port}"
    kubeconfig = write_kubeconfig(tmp_path / "fake-kubeconfig", url, cluster.token)
    try:
        yield RunningCluster(cluster, url, kubeconfig)
    finally:
        await runner.cleanup()


@pytest.fixture
async def kube_access(kube_cluster: RunningCluster) -> AsyncIterator[Any]:
    """The dispatcher's ``KubeAccess``, connected to ``kube_cluster``."""
    from dispatcher.kube import KubeAccess

    kube = KubeAccess(kube_cluster.kubeconfig, "fake")
    await kube.connect()
    yield kube
    await kube.close()


@pytest.fixture
async def kube_call(kube_cluster: RunningCluster) -> AsyncIterator[Any]:
    """``call_function`` with ``ctx.kube`` pointing at ``kube_cluster`` (event subject
    ``ns/Deployment/app``; namespace ``ns`` exists)."""
    import aiohttp

    from dispatcher.app import load_functions
    from dispatcher.invokers.inprocess import InProcessInvoker
    from dispatcher.secrets import EnvSecretResolver
    from tests.conftest import FunctionCaller

    kube_cluster.cluster.add_namespace("ns")
    registry = load_functions([])
    async with aiohttp.ClientSession() as http:
        invoker = InProcessInvoker(
            registry, http, EnvSecretResolver(), kube=kube_cluster.kube_config
        )
        yield FunctionCaller(invoker)
