"""A protocol-faithful fake Kubernetes API server for tests, driven by the real
kubernetes_asyncio client over HTTP.

``FakeCluster`` is the in-memory API server state plus the behaviours a test scripts; the
HTTP side lives in :mod:`tests.kube_fake_http`, exec in :mod:`tests.kube_fake_exec`, the
Job and workload controllers in :mod:`tests.kube_fake_controllers`. The ``kube_cluster``
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
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from multidict import MultiDict

from functions.sdk import KubeConfig
from tests import kube_fake_controllers as controllers
from tests.kube_fake_controllers import JobScript, Rollout
from tests.kube_fake_exec import ExecCall, ExecHandler, ExecResult
from tests.kube_fake_patch import merge_patch
from tests.kube_fake_resources import (
    ApiError,
    Resource,
    Selector,
    already_exists,
    bad_request,
    conflict,
    find_resource,
    not_found,
    status_body,
)

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
_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # what generateName suffixes are made of


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


class FakeCluster:
    def __init__(self, token: str | None = None, user: str = SERVICE_ACCOUNT) -> None:
        self.token = token or secrets.token_urlsafe(24)
        self.user = user
        self.requests: list[RecordedRequest] = []
        self.execs: list[ExecCall] = []
        self._objects: dict[Resource, dict[tuple[str, str], dict[str, Any]]] = {}
        self._rv = 1000
        self._history: list[Change] = []
        self._oldest_rv = 0  # watches from before this get 410 Gone
        self.watchers: set[asyncio.Queue[Change | None]] = set()
        self._denials: list[tuple[str, str, str | None]] = []
        self._failures: list[list[Any]] = []
        self._exec_handlers: dict[tuple[str | None, str | None], ExecHandler] = {}
        self.job_scripts: list[tuple[str, JobScript | Callable[[dict[str, Any]], JobScript]]] = []
        self.rollouts: dict[tuple[str, str], Rollout] = {}
        self._logs: dict[tuple[str, str, str], str] = {}
        self._tasks: set[asyncio.Future[Any]] = set()
        self._pulse: asyncio.Event | None = None

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

    def compact(self) -> None:
        """Forget the watch history (as etcd compaction does): older resourceVersions 410."""
        self._oldest_rv = self._rv
        self._history.clear()

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

    # --- the store, as the API server and controllers use it -------------------------

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
        controllers.created(self, resource, obj)
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
        controllers.modified(self, resource, updated, current)
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
