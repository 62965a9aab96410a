"""``kube.scale`` / ``kube.scale_restore``: scale a Deployment or StatefulSet to N (through
its ``/scale`` subresource) and wait until it got there; put the replica count back later.

As a freeze lease, scaling to 0 stops the application writing, and the lease's release is
``kube.scale_restore``. The count to restore must survive whatever ends the lease: the post
event handled by another process, a scale step that failed (its outputs are never
recorded), the reaper after a restart. So before scaling, ``kube.scale`` writes it onto the
workload itself, as the annotation ``snaphook.io/original-replicas``; ``kube.scale_restore``
restores that (or ``replicas`` when given), waits until ready, and only then removes the
annotation. A retried or repeated scale finds the annotation and keeps it: the count it
reports is the one from before the first scale, never its own 0.

Ready means: ``status.observedGeneration`` caught up with the spec, and ``replicas`` and
``readyReplicas`` are N. Scaled to 0, it also waits until no pod of the workload is left,
terminating ones included: a pod in its grace period may still write.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field

from functions.kube_client import ObjectRef, api_client, api_errors, patch_object, read_object
from functions.kube_params import ObjectParams, object_ref
from functions.kube_patch import guarded, retry_conflicts
from functions.kube_wait import poll_until
from functions.sdk import Context, KubeRule, PermanentError, function

if TYPE_CHECKING:  # kubernetes_asyncio is imported where used: it is slow to import
    from kubernetes_asyncio.client import ApiClient

ORIGINAL = "snaphook.io/original-replicas"
SCALABLE = ("Deployment", "StatefulSet")

RBAC = (
    KubeRule(("apps",), ("deployments", "statefulsets"), ("get", "patch")),
    KubeRule(("apps",), ("deployments/scale", "statefulsets/scale"), ("patch",)),
    KubeRule(("",), ("pods",), ("list",)),
)


# --- params and outputs ------------------------------------------------------------------


def _optional_count(value: Any) -> Any:
    """A template that found no count renders ``""``: that means "not given"."""
    if isinstance(value, str) and not value.strip():
        return None
    return value


Count = Annotated[int, Field(ge=0, le=100_000)]


class WorkloadParams(ObjectParams):
    """A Deployment or StatefulSet, by default the event's target."""

    wait: bool = True  # wait until the workload is ready at its new count


class ScaleParams(WorkloadParams):
    replicas: Count


class RestoreParams(WorkloadParams):
    # The count to put back; default: the annotation kube.scale left on the workload.
    replicas: Annotated[Count | None, BeforeValidator(_optional_count)] = None


class ScaleResult(BaseModel):
    kind: str
    namespace: str
    name: str
    original_replicas: int  # before the first kube.scale: what kube.scale_restore puts back
    replicas: int
    ready_replicas: int
    changed: bool  # False: it already had that many replicas


class RestoreResult(BaseModel):
    kind: str
    namespace: str
    name: str
    restored: bool  # False: nothing recorded to restore (it was never scaled)
    replicas: int | None = None
    ready_replicas: int = 0


# --- reading the workload ----------------------------------------------------------------


def _annotations(obj: dict[str, Any]) -> dict[str, str]:
    return dict(obj.get("metadata", {}).get("annotations") or {})


def _recorded(obj: dict[str, Any], ref: ObjectRef) -> int | None:
    text = _annotations(obj).get(ORIGINAL)
    if text is None:
        return None
    if not text.strip().isdigit():
        raise PermanentError(f"{ref}: annotation {ORIGINAL}={text[:20]!r} is not a count")
    return int(text)


def _spec_replicas(obj: dict[str, Any]) -> int:
    replicas = obj.get("spec", {}).get("replicas")
    return 1 if replicas is None else int(replicas)  # the API server's default


def _progress(obj: dict[str, Any]) -> tuple[bool, int, int]:
    """(observedGeneration caught up, replicas, readyReplicas); zero counts are omitted."""
    status = obj.get("status") or {}
    generation = obj.get("metadata", {}).get("generation") or 0
    caught_up = (status.get("observedGeneration") or 0) >= generation
    return caught_up, int(status.get("replicas") or 0), int(status.get("readyReplicas") or 0)


def _selector(scale: dict[str, Any], obj: dict[str, Any]) -> str | None:
    """The workload's pod selector: the string ``/scale`` reports, else matchLabels."""
    selector = (scale.get("status") or {}).get("selector")
    if selector:
        return str(selector)
    labels = ((obj.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or None


# --- waiting -----------------------------------------------------------------------------


async def _wait_ready(ctx: Context, api: ApiClient, ref: ObjectRef, replicas: int) -> int:
    """Wait until ``ref`` runs ``replicas`` ready pods; the ready count reached."""
    last: dict[str, Any] = {}

    async def check() -> int | None:
        nonlocal last
        last = await read_object(api, ref)
        caught_up, current, ready = _progress(last)
        return ready if caught_up and current == ready == replicas else None

    def waiting_for() -> str:
        caught_up, current, ready = _progress(last)
        seen = f"{current} replicas, {ready} ready"
        if not caught_up:
            seen += ", the change not observed yet"
        return f"{ref} to have {replicas} ready replicas ({seen})"

    return await poll_until(ctx, check, waiting_for)


async def _wait_no_pods(ctx: Context, api: ApiClient, ref: ObjectRef, selector: str) -> None:
    from kubernetes_asyncio import client

    core = client.CoreV1Api(api)
    left: list[str] = []

    async def check() -> bool | None:
        nonlocal left
        with api_errors(f"list the pods of {ref}"):
            pods = await core.list_namespaced_pod(ref.namespace, label_selector=selector)
        left = sorted(pod.metadata.name for pod in pods.items)
        return True if not left else None

    def waiting_for() -> str:
        return f"the pods of {ref} to stop ({', '.join(left[:5])} left)"

    await poll_until(ctx, check, waiting_for)


async def _scale_and_wait(
    ctx: Context, api: ApiClient, ref: ObjectRef, replicas: int, wait: bool
) -> int:
    """Set ``replicas`` through ``/scale``; unless told not to, wait until ready (and, at 0,
    until no pod is left); the ready count."""
    scale = await patch_object(api, ref, {"spec": {"replicas": replicas}}, sub="scale")
    if not wait:
        return 0
    ready = await _wait_ready(ctx, api, ref, replicas)
    if replicas == 0:
        selector = _selector(scale, await read_object(api, ref))
        if selector:
            await _wait_no_pods(ctx, api, ref, selector)
    return ready


# --- the functions -----------------------------------------------------------------------


@function("kube.scale", rbac=RBAC)
async def scale(ctx: Context, p: ScaleParams) -> ScaleResult:
    """Scale a Deployment/StatefulSet (default: the target) to ``replicas`` and wait until
    ready; the count before is kept on the workload and in ``original_replicas``."""
    ref = object_ref(ctx, p, what="kube.scale", allowed=SCALABLE)
    api = await api_client(ctx.kube)
    original, before = await retry_conflicts(lambda: _record_original(api, ref))
    ready = await _scale_and_wait(ctx, api, ref, p.replicas, p.wait)
    ctx.logger.info("scaled %s to %d (originally %d)", ref, p.replicas, original)
    return ScaleResult(
        kind=ref.kind.kind,
        namespace=ref.namespace,
        name=ref.name,
        original_replicas=original,
        replicas=p.replicas,
        ready_replicas=ready,
        changed=before != p.replicas,
    )


async def _record_original(api: ApiClient, ref: ObjectRef) -> tuple[int, int]:
    """(the count before the first scale, the count now). The first is the annotation an
    earlier scale left (not restored yet), or else the count now, written down as that
    annotation, compare-and-set: scaled by someone meanwhile, this is tried again."""
    obj = await read_object(api, ref)
    current = _spec_replicas(obj)
    recorded = _recorded(obj, ref)
    if recorded is not None:
        return recorded, current
    patch = {"metadata": {"annotations": {ORIGINAL: str(current)}}}
    await patch_object(api, ref, guarded(obj, patch))
    return current, current


@function("kube.scale_restore", rbac=RBAC)
async def scale_restore(ctx: Context, p: RestoreParams) -> RestoreResult:
    """Put back the replica count ``kube.scale`` recorded (or ``replicas``), wait until
    ready, then drop the record. With nothing recorded and no ``replicas``, do nothing."""
    ref = object_ref(ctx, p, what="kube.scale_restore", allowed=SCALABLE)
    api = await api_client(ctx.kube)
    recorded = _recorded(await read_object(api, ref), ref)
    replicas = p.replicas if p.replicas is not None else recorded
    result = RestoreResult(
        kind=ref.kind.kind, namespace=ref.namespace, name=ref.name, restored=False
    )
    if replicas is None:
        ctx.logger.info("%s: no replica count recorded, nothing to restore", ref)
        return result
    ready = await _scale_and_wait(ctx, api, ref, replicas, p.wait)
    if recorded is not None:
        # Only now: a restore that failed or timed out above is retried with the record.
        await patch_object(api, ref, {"metadata": {"annotations": {ORIGINAL: None}}})
    ctx.logger.info("restored %s to %d replicas", ref, replicas)
    return result.model_copy(
        update={"restored": True, "replicas": replicas, "ready_replicas": ready}
    )
