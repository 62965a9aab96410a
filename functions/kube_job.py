"""``kube.job``: run a container to completion as a batch/v1 Job and report how it went.

The Job is named after the attempt (``snaphook-<run>-<step>-<attempt>``, hashed down to 63
characters when longer), so an attempt that is re-run after a dispatcher restart finds its
Job (AlreadyExists) and adopts it rather than starting a second one. Its pods never restart
(``restartPolicy: Never``, ``backoffLimit`` 0 by default): retrying is the step's ``retry``
policy's job, with a fresh Job per attempt. ``activeDeadlineSeconds`` is what is left of
the step's timeout, so a Job outlives neither the step nor an abandoned dispatcher.

``secret_env`` refers to Secrets by name and key (``valueFrom.secretKeyRef``): the kubelet
injects the value, snaphook never reads it. The Job's log tail becomes the step's outputs
(and a failure's error message), so the job must not print secrets.
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import TYPE_CHECKING, Literal

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, model_validator

from functions.kube_client import api_client, api_errors
from functions.kube_params import DNS_SUBDOMAIN, Namespace, TextList, TextMap, target_namespace
from functions.kube_wait import WaitTimeout, poll_until
from functions.sdk import Context, KubeRule, PermanentError, function

if TYPE_CHECKING:  # kubernetes_asyncio is imported where used: it is slow to import
    from kubernetes_asyncio import client

NAME_LIMIT = 63  # a Job's name is also its pods' job-name label value
CONTAINER = "job"
MANAGED_BY = "app.kubernetes.io/managed-by"
RUN_ANNOTATION = "snaphook.io/run"
STEP_ANNOTATION = "snaphook.io/step"
MAX_LOGGED_PODS = 5  # a Job with backoffLimit N has up to N+1 pods; read the newest few
ERROR_TAIL = 2_000  # characters of log tail in a failed Job's error message

RBAC = (
    KubeRule(("batch",), ("jobs",), ("create", "get", "delete")),
    KubeRule(("",), ("pods",), ("list",)),
    KubeRule(("",), ("pods/log",), ("get",)),
)

_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


# --- params and outputs ------------------------------------------------------------------


class SecretRef(BaseModel):
    """One key of a Secret in the Job's namespace, injected by the kubelet."""

    model_config = ConfigDict(extra="forbid")

    secret: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)
    key: str = Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")
    optional: bool = False


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests: TextMap = Field(default_factory=dict)  # {cpu: 100m, memory: 128Mi}
    limits: TextMap = Field(default_factory=dict)


class JobParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(min_length=1, max_length=1024)
    command: TextList | None = None  # the image's entrypoint when unset
    args: TextList | None = None
    env: TextMap = Field(default_factory=dict)
    secret_env: dict[str, SecretRef] = Field(default_factory=dict)
    namespace: Namespace | None = None  # default: the event target's
    service_account: str | None = Field(default=None, max_length=253, pattern=DNS_SUBDOMAIN)
    resources: Resources | None = None
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    backoff_limit: int = Field(default=0, ge=0, le=100)
    ttl_seconds_after_finished: int | None = Field(default=3600, ge=0)
    delete: Literal["always", "on_success", "never"] = "on_success"
    log_lines: int = Field(default=100, ge=0, le=10_000)  # per pod, from the end
    log_bytes: int = Field(default=16_384, ge=0, le=1_048_576)  # per pod, from the end

    @model_validator(mode="after")
    def _env_names(self) -> JobParams:
        for name in [*self.env, *self.secret_env]:
            if not _ENV_NAME.match(name):
                raise ValueError(f"env: {name[:64]!r} is not a valid environment variable name")
        both = sorted(set(self.env) & set(self.secret_env))
        if both:
            raise ValueError(f"env and secret_env both set {', '.join(both)}")
        return self


class PodLog(BaseModel):
    pod: str
    phase: str | None = None
    exit_code: int | None = None
    logs: str = ""  # the tail: at most log_lines lines and log_bytes bytes
    truncated: bool = False  # older output was left out


class JobResult(BaseModel):
    job: str
    namespace: str
    succeeded: bool
    adopted: bool  # the attempt found its Job already created (a re-run after a restart)
    duration: float  # seconds, from the Job's start to its completion as far as known
    logs: str  # the log tail of the Job's newest pod
    pods: list[PodLog]
    deleted: bool


# --- the Job -----------------------------------------------------------------------------


def job_name(run_id: str, step: str, attempt: int) -> str:
    """``snaphook-<run>-<step>-<attempt>`` as a DNS label; a hash stands in for what had to
    be cut or rewritten, so distinct attempts never share a name."""
    raw = f"snaphook-{run_id}-{step}-{attempt}"
    clean = re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-")
    if clean == raw and len(raw) <= NAME_LIMIT:
        return raw
    digest = hashlib.sha256(raw.encode()).hexdigest()[:10]
    return f"{clean[: NAME_LIMIT - len(digest) - 1].rstrip('-')}-{digest}"


def _label_value(text: str) -> str:
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63]
    return value.strip("-_.")


def build_job(ctx: Context, p: JobParams, name: str, namespace: str) -> client.V1Job:
    from kubernetes_asyncio import client

    env = [client.V1EnvVar(name=key, value=value) for key, value in p.env.items()]
    env += [
        client.V1EnvVar(
            name=key,
            value_from=client.V1EnvVarSource(
                secret_key_ref=client.V1SecretKeySelector(
                    name=ref.secret, key=ref.key, optional=ref.optional or None
                )
            ),
        )
        for key, ref in p.secret_env.items()
    ]
    resources = None
    if p.resources is not None:
        resources = client.V1ResourceRequirements(
            requests=p.resources.requests or None, limits=p.resources.limits or None
        )
    container = client.V1Container(
        name=CONTAINER,
        image=p.image,
        command=p.command,
        args=p.args,
        env=env or None,
        resources=resources,
        image_pull_policy=p.image_pull_policy,
    )
    labels = {MANAGED_BY: "snaphook", RUN_ANNOTATION: _label_value(ctx.run_id)}
    annotations = {RUN_ANNOTATION: ctx.run_id, STEP_ANNOTATION: ctx.step}
    pod = client.V1PodTemplateSpec(
        metadata=client.V1ObjectMeta(labels=labels, annotations=annotations),
        spec=client.V1PodSpec(
            containers=[container],
            restart_policy="Never",
            service_account_name=p.service_account,
        ),
    )
    return client.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=client.V1ObjectMeta(
            name=name, namespace=namespace, labels=labels, annotations=annotations
        ),
        spec=client.V1JobSpec(
            template=pod,
            backoff_limit=p.backoff_limit,
            # What is left of the step's timeout: the Job stops when the step gives up.
            active_deadline_seconds=max(1, int(ctx.remaining())),
            ttl_seconds_after_finished=p.ttl_seconds_after_finished,
        ),
    )


async def _create_or_adopt(
    ctx: Context, batch: client.BatchV1Api, body: client.V1Job
) -> tuple[client.V1Job, bool]:
    """(the Job, whether it existed already): an attempt re-run after a restart adopts the
    Job it created before instead of doing the work twice."""
    from kubernetes_asyncio.client.exceptions import ApiException

    namespace, name = body.metadata.namespace, body.metadata.name
    with api_errors(f"create Job {namespace}/{name}"):
        try:
            return await batch.create_namespaced_job(namespace, body), False
        except ApiException as exc:
            if exc.status != 409:
                raise
    with api_errors(f"Job {namespace}/{name}"):
        existing = await batch.read_namespaced_job(name, namespace)
    owner = (existing.metadata.annotations or {}).get(RUN_ANNOTATION)
    if owner != ctx.run_id:
        raise PermanentError(f"Job {namespace}/{name} exists and was not created by this run")
    ctx.logger.info(
        "adopting Job %s/%s, created by an earlier try of this attempt", namespace, name
    )
    return existing, True


def _terminal(job: client.V1Job) -> client.V1JobCondition | None:
    """The Job's Complete or Failed condition, once it has one."""
    for condition in (job.status.conditions if job.status else None) or []:
        if condition.type in ("Complete", "Failed") and condition.status == "True":
            return condition
    return None


async def _wait_finished(
    ctx: Context, batch: client.BatchV1Api, namespace: str, name: str
) -> tuple[client.V1Job, client.V1JobCondition]:
    last: client.V1Job | None = None

    async def check() -> tuple[client.V1Job, client.V1JobCondition] | None:
        nonlocal last
        with api_errors(f"Job {namespace}/{name}"):
            last = await batch.read_namespaced_job(name, namespace)
        condition = _terminal(last)
        return None if condition is None else (last, condition)

    def waiting_for() -> str:
        status = last.status if last is not None else None
        counts = ""
        if status is not None:
            counts = f" ({status.active or 0} active, {status.failed or 0} failed pods)"
        return f"Job {namespace}/{name} to finish{counts}"

    return await poll_until(ctx, check, waiting_for)


def _duration(job: client.V1Job, condition: client.V1JobCondition, observed: float) -> float:
    """From the Job's start to its end as the Job reports them, else as observed here."""
    status = job.status
    start = status.start_time if status is not None else None
    end = (status.completion_time if status is not None else None) or condition.last_transition_time
    if start is not None and end is not None and end >= start:
        return round((end - start).total_seconds(), 3)
    return round(observed, 3)


# --- logs ---------------------------------------------------------------------------------


def _tail(text: str, limit: int) -> tuple[str, bool]:
    """The last ``limit`` bytes of ``text`` (whole characters), and whether it was cut."""
    data = text.encode()
    if len(data) <= limit:
        return text, False
    return data[len(data) - limit :].decode(errors="ignore"), True


def _exit_code(pod: client.V1Pod) -> int | None:
    for status in (pod.status.container_statuses if pod.status else None) or []:
        terminated = status.state.terminated if status.state else None
        if status.name == CONTAINER and terminated is not None:
            return int(terminated.exit_code)
    return None


def _started(pod: client.V1Pod) -> tuple[str, str]:
    created = pod.metadata.creation_timestamp
    return (created.isoformat() if created else "", pod.metadata.name)


async def _pod_logs(
    ctx: Context, core: client.CoreV1Api, job: client.V1Job, p: JobParams
) -> list[PodLog]:
    """The log tails of the Job's newest pods, oldest first. The Job has finished: pods or
    logs that cannot be read (the pod never started or was evicted, the API server is busy)
    cost a warning, never the step, whose retry would run the Job a second time."""
    namespace, name = job.metadata.namespace, job.metadata.name
    # The controller-uid label, not job-name: a Job of the same name from before is not ours.
    selector = f"controller-uid={job.metadata.uid}"
    try:
        listed = await core.list_namespaced_pod(namespace, label_selector=selector)
    except _request_failures() as exc:
        ctx.logger.warning("cannot list the pods of Job %s/%s: %s", namespace, name, _reason(exc))
        return []
    logs = []
    for pod in sorted(listed.items, key=_started)[-MAX_LOGGED_PODS:]:
        entry = PodLog(
            pod=pod.metadata.name,
            phase=pod.status.phase if pod.status else None,
            exit_code=_exit_code(pod),
        )
        if p.log_lines and p.log_bytes:
            try:
                text = await core.read_namespaced_pod_log(
                    entry.pod, namespace, container=CONTAINER, tail_lines=p.log_lines
                )
            except _request_failures() as exc:
                ctx.logger.warning(
                    "cannot read the log of pod %s/%s: %s", namespace, entry.pod, _reason(exc)
                )
            else:
                entry.logs, entry.truncated = _tail(str(text), p.log_bytes)
        logs.append(entry)
    return logs


def _request_failures() -> tuple[type[Exception], ...]:
    """What reading logs or deleting may fail with: an API answer or a connection error."""
    from kubernetes_asyncio.client.exceptions import ApiException

    return (ApiException, aiohttp.ClientError, OSError)


def _reason(exc: Exception) -> str:
    """What went wrong, without the response body or headers an ApiException prints."""
    from kubernetes_asyncio.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        return f"{exc.status} {exc.reason}"
    return type(exc).__name__


# --- cleanup ------------------------------------------------------------------------------


async def _delete(ctx: Context, batch: client.BatchV1Api, namespace: str, name: str) -> bool:
    """Delete the Job and, in the background, its pods. A failure costs only a warning:
    ``ttlSecondsAfterFinished`` removes the Job later anyway."""
    from kubernetes_asyncio.client.exceptions import ApiException

    try:
        await batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
    except _request_failures() as exc:
        if isinstance(exc, ApiException) and exc.status == 404:
            return True
        ctx.logger.warning("cannot delete Job %s/%s: %s", namespace, name, _reason(exc))
        return False
    return True


# --- the function -------------------------------------------------------------------------


@function("kube.job", rbac=RBAC)
async def job(ctx: Context, p: JobParams) -> JobResult:
    """Run a container as a Job (default: in the target's namespace), wait until it
    finishes, and return its log tail; a failed Job fails the step with that tail."""
    from kubernetes_asyncio import client

    namespace = target_namespace(ctx, p.namespace)
    name = job_name(ctx.run_id, ctx.step, ctx.attempt)
    api = await api_client(ctx.kube)
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    started = time.monotonic()
    created, adopted = await _create_or_adopt(ctx, batch, build_job(ctx, p, name, namespace))
    try:
        finished, condition = await _wait_finished(ctx, batch, namespace, name)
    except WaitTimeout:
        # The step gives up on it: a Job left running would compete with a retry.
        if p.delete != "never":
            await _delete(ctx, batch, namespace, name)
        raise
    succeeded = condition.type == "Complete"
    pods = await _pod_logs(ctx, core, created, p)
    deleted = p.delete == "always" or (p.delete == "on_success" and succeeded)
    if deleted:
        deleted = await _delete(ctx, batch, namespace, name)
    if not succeeded:
        raise PermanentError(_failure(namespace, name, condition, pods))
    ctx.logger.info("Job %s/%s succeeded", namespace, name)
    return JobResult(
        job=name,
        namespace=namespace,
        succeeded=True,
        adopted=adopted,
        duration=_duration(finished, condition, time.monotonic() - started),
        logs=pods[-1].logs if pods else "",
        pods=pods,
        deleted=deleted,
    )


def _failure(
    namespace: str, name: str, condition: client.V1JobCondition, pods: list[PodLog]
) -> str:
    why = condition.reason or "Failed"
    if condition.message:
        why += f": {condition.message}"
    failed = [pod for pod in pods if pod.exit_code not in (None, 0)] or pods
    if not failed:
        return f"Job {namespace}/{name} failed ({why}); no pod logs"
    last = failed[-1]
    code = f", exit code {last.exit_code}" if last.exit_code is not None else ""
    tail, _ = _tail(last.logs, ERROR_TAIL)
    return f"Job {namespace}/{name} failed ({why}); pod {last.pod}{code}; log tail:\n{tail}"
