"""``kube.exec``: run a command in a pod's container, as ``kubectl exec`` does.

The pod is named (``pod``) or found by label ``selector`` in ``namespace`` (default: the
event target's). Without ``all`` one pod runs the command: the named one, or the first
Running match by name. With ``all: true`` every Running match runs it, ``concurrency`` at a
time, and the outputs list each pod. ``container`` may be left out for single-container
pods (or when the pod names a ``kubectl.kubernetes.io/default-container``).

stdout and stderr are captured up to ``max_output_bytes`` each (``truncated`` says when
more was printed). A non-zero exit code fails the step with the code and the end of
stderr, unless listed in ``allow_exit_codes``. ``timeout`` (seconds, never beyond the
step's own) bounds the command; when it expires the stream is closed, which does not
necessarily stop the process inside the container.

::

    - name: lock
      function: kube.exec
      with:
        selector: app=mongo
        container: mongod
        command: [mongosh, --quiet, --eval, "db.fsyncLock()"]
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING, Annotated, Any

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from functions.kube_client import api_client, api_errors, map_api_error, ws_client
from functions.kube_params import DNS_LABEL, Namespace, ObjectName, target_namespace
from functions.kube_stream import ExecFailed, run_exec
from functions.sdk import (
    Context,
    FunctionError,
    KubeRule,
    PermanentError,
    RetryableError,
    function,
)

if TYPE_CHECKING:
    from kubernetes_asyncio.client import V1Pod
    from kubernetes_asyncio.stream import WsApiClient

MiB = 1024 * 1024
_DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"
_STDERR_IN_ERRORS = 500  # characters of stderr quoted in a failure

RBAC = (
    KubeRule(api_groups=("",), resources=("pods",), verbs=("get", "list")),
    # WebSocket upgrades were authorised as "get" before Kubernetes 1.35, as "create" since.
    KubeRule(api_groups=("",), resources=("pods/exec",), verbs=("create", "get")),
)

ContainerName = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)]


class ExecParams(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    command: list[str] = Field(min_length=1)
    pod: ObjectName | None = None
    selector: str | None = Field(default=None, min_length=1, max_length=1024)
    namespace: Namespace | None = None
    container: ContainerName | None = None
    stdin: SecretStr | None = None  # may carry credentials: never logged or output
    max_output_bytes: int = Field(default=64 * 1024, ge=0, le=16 * MiB)
    allow_exit_codes: list[int] = Field(default_factory=list)
    timeout: float | None = Field(default=None, gt=0, le=24 * 3600)
    all_pods: bool = Field(default=False, alias="all")
    concurrency: int = Field(default=4, ge=1, le=64)
    # The freeze lease this exec undoes (``"{{ leases.lock }}"``): a post step naming it ends
    # that lease itself (docs/leases.md). Only recorded; the command does the undoing.
    lease: str = Field(default="", max_length=128)

    @model_validator(mode="after")
    def _one_way_to_choose(self) -> ExecParams:
        if (self.pod is None) == (self.selector is None):
            raise ValueError("give exactly one of 'pod' and 'selector'")
        if self.pod is not None and self.all_pods:
            raise ValueError("'all' needs a 'selector', not a 'pod'")
        return self


class PodExec(BaseModel):
    pod: str
    container: str
    exit_code: int
    stdout: str
    stderr: str
    truncated: bool  # stdout or stderr was cut at max_output_bytes


class ExecOutputs(BaseModel):
    namespace: str
    # The pod's results; left empty with ``all``, where ``pods`` holds each pod's.
    pod: str | None = None
    container: str | None = None
    exit_code: int | None = None
    stdout: str | None = None
    stderr: str | None = None
    truncated: bool = False  # any output was cut at max_output_bytes
    pods: list[PodExec]


@function("kube.exec", rbac=RBAC)
async def kube_exec(ctx: Context, p: ExecParams) -> ExecOutputs:
    """Run a command in a pod (by name or label selector), or in all matching pods."""
    namespace = target_namespace(ctx, p.namespace)
    pods = await _choose_pods(ctx, namespace, p)
    # One end for all pods: with more pods than ``concurrency`` the last ones start late,
    # and must not run past the step's timeout (a bare timeout instead of this error).
    end = time.monotonic() + _time_allowed(ctx, None)
    ws_api = await ws_client(ctx.kube)
    ctx.logger.info("kube.exec in %d pod(s) of namespace %s", len(pods), namespace)
    gate = asyncio.Semaphore(p.concurrency)

    async def one(pod: V1Pod) -> PodExec:
        async with gate:
            left = end - time.monotonic()
            if left <= 0:
                raise RetryableError(
                    f"Pod {namespace}/{pod.metadata.name}: no time left to exec before the "
                    "step's timeout (the other pods took it; raise concurrency or the timeout)"
                )
            return await _exec_in(ws_api, namespace, pod, p, min(p.timeout or math.inf, left))

    results = await asyncio.gather(*(one(pod) for pod in pods), return_exceptions=True)
    done = _successes_or_raise(results, len(pods))
    # One pod: its results at the top level too, so templates say outputs.lock.stdout.
    single = done[0].model_dump() if not p.all_pods else {}
    single.update(namespace=namespace, truncated=any(r.truncated for r in done), pods=done)
    return ExecOutputs(**single)


def _time_allowed(ctx: Context, wanted: float | None) -> float:
    remaining = ctx.remaining()
    # Expire a moment before the step does, so the user sees this clearer error.
    available = remaining - min(1.0, remaining * 0.05)
    seconds = min(wanted or math.inf, available)
    if seconds <= 0:
        raise RetryableError("kube.exec: no time left before the step's timeout")
    return seconds


def _running(pod: V1Pod) -> bool:
    return (
        pod.status is not None
        and pod.status.phase == "Running"
        and not (pod.metadata.deletion_timestamp)
    )


async def _choose_pods(ctx: Context, namespace: str, p: ExecParams) -> list[V1Pod]:
    from kubernetes_asyncio.client import CoreV1Api

    core = CoreV1Api(await api_client(ctx.kube))
    if p.pod is not None:
        with api_errors(f"Pod {namespace}/{p.pod}"):
            pod = await core.read_namespaced_pod(p.pod, namespace)
        if not _running(pod):
            phase = pod.status.phase if pod.status else "unknown"
            raise PermanentError(f"Pod {namespace}/{p.pod} is {phase}, not Running")
        return [pod]
    selector = p.selector or ""  # set: the params validator demands pod or selector
    with api_errors(f"pods matching {selector!r} in namespace {namespace}"):
        listed = await core.list_namespaced_pod(namespace, label_selector=selector)
    matching = sorted(listed.items, key=lambda pod: pod.metadata.name)
    running = [pod for pod in matching if _running(pod)]
    if not running:
        others = f" ({len(matching)} match but none is Running)" if matching else ""
        raise PermanentError(
            f"no Running pod in namespace {namespace} matches selector {selector!r}{others}"
        )
    return running if p.all_pods else running[:1]


def _container_of(pod: V1Pod, wanted: str | None) -> str:
    names: list[str] = [c.name for c in pod.spec.containers]
    where = f"Pod {pod.metadata.namespace}/{pod.metadata.name}"
    if wanted is not None:
        if wanted not in names:
            raise PermanentError(
                f"{where} has no container {wanted!r} (it has: {', '.join(names)})"
            )
        return wanted
    default = (pod.metadata.annotations or {}).get(_DEFAULT_CONTAINER)
    if default in names:
        return str(default)
    if len(names) == 1:
        return names[0]
    raise PermanentError(
        f"{where} has containers {', '.join(names)}; say which one with 'container'"
    )


async def _exec_in(
    ws_api: WsApiClient, namespace: str, pod: V1Pod, p: ExecParams, seconds: float
) -> PodExec:
    name = pod.metadata.name
    container = _container_of(pod, p.container)
    what = f"exec in Pod {namespace}/{name} (container {container})"
    stdin = p.stdin.get_secret_value().encode() if p.stdin is not None else None
    try:
        with api_errors(what):
            async with asyncio.timeout(seconds):
                try:
                    outcome = await run_exec(
                        ws_api,
                        namespace,
                        name,
                        container,
                        p.command,
                        stdin=stdin,
                        limit=p.max_output_bytes,
                    )
                except aiohttp.WSServerHandshakeError as exc:
                    raise _refused(exc, what, namespace) from None
    except TimeoutError:
        raise RetryableError(
            f"{what}: {p.command[0]!r} did not finish within {seconds:.3g}s "
            "(it may still be running in the container)"
        ) from None
    except ExecFailed as exc:
        error = RetryableError if exc.broken else PermanentError
        raise error(f"{what}: {exc}") from None
    if outcome.exit_code != 0 and outcome.exit_code not in p.allow_exit_codes:
        tail = outcome.stderr.tail_text().strip()[-_STDERR_IN_ERRORS:]
        said = f"; stderr ends: {tail}" if tail else " (no stderr)"
        raise PermanentError(f"{what}: {p.command[0]!r} exited with code {outcome.exit_code}{said}")
    return PodExec(
        pod=name,
        container=container,
        exit_code=outcome.exit_code,
        stdout=outcome.stdout.text(),
        stderr=outcome.stderr.text(),
        truncated=outcome.stdout.truncated or outcome.stderr.truncated,
    )


def _refused(exc: aiohttp.WSServerHandshakeError, what: str, namespace: str) -> FunctionError:
    """A refused WebSocket upgrade carries only its status code: say what it means."""
    if exc.status == 403:
        return PermanentError(
            f"{what}: forbidden by Kubernetes RBAC: may not create pods/exec in namespace "
            f"{namespace} (grant verbs create and get on pods/exec)"
        )
    if exc.status == 404:
        return PermanentError(f"{what}: the pod or its container no longer exists")
    if exc.status == 400:
        return PermanentError(
            f"{what}: refused by the API server (400 Bad Request): the container may not be running"
        )
    return map_api_error(exc.status, {}, what, exc.headers)


def _successes_or_raise(results: list[Any], total: int) -> list[PodExec]:
    """Every pod's result, or one error naming each pod that failed (permanent if any
    failure is)."""
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, Exception):
            raise result  # cancellation and the like go through untouched
    errors = [r for r in results if isinstance(r, Exception)]
    if not errors:
        return [r for r in results if isinstance(r, PodExec)]
    if len(errors) == 1 and total == 1:
        raise errors[0]
    message = f"kube.exec failed in {len(errors)} of {total} pods: " + "; ".join(
        str(e) for e in errors
    )
    if all(isinstance(e, RetryableError) for e in errors):
        raise RetryableError(message)
    raise PermanentError(message)
