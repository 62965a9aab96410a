"""``kube.event``: record a Kubernetes Event on the event's target (or a named object), so
``kubectl describe`` and every event-based tool show what snaphook did to it.

The Event refers to the object by kind, name, namespace and uid (read from the object, as
``kubectl describe`` matches on it). ``api: core`` writes a core/v1 Event (``source`` and
``reportingComponent`` snaphook, ``count`` 1); ``api: events.k8s.io`` an events.k8s.io/v1
one (``reportingController`` snaphook.io/snaphook, ``action``, ``note``). The Event's name
is derived from the run, step and attempt, so an attempt re-run after a restart finds its
Event already there (AlreadyExists) instead of recording it twice.

As a ``when: always`` step (a finalizer) it records each run's outcome; ``run.failed``,
``run.reason`` and ``outcome`` are in the template scope (see docs/kube-functions.md).
"""

from __future__ import annotations

import hashlib
import socket
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field

from functions.kube_client import ObjectRef, api_client, api_errors, read_object
from functions.kube_params import ObjectParams, object_ref
from functions.sdk import Context, KubeRule, function

if TYPE_CHECKING:  # kubernetes_asyncio is imported where used: it is slow to import
    from kubernetes_asyncio.client import ApiClient

COMPONENT = "snaphook"
CONTROLLER = "snaphook.io/snaphook"
MESSAGE_BYTES = 1024  # events.k8s.io's limit for a note; core Events are cut alike

# Reading the object (its uid) needs get on its kind; recording needs create on events.
# Not Secrets or ConfigMaps: get on them would let snaphook read every one's data.
RBAC = (
    KubeRule(("",), ("events",), ("create",)),
    KubeRule(("events.k8s.io",), ("events",), ("create",)),
    KubeRule(("apps",), ("deployments", "statefulsets", "daemonsets", "replicasets"), ("get",)),
    KubeRule(("",), ("pods", "services", "persistentvolumeclaims"), ("get",)),
    KubeRule(("batch",), ("jobs", "cronjobs"), ("get",)),
)
# The kinds an Event may be about: those RBAC lets it read.
EVENT_KINDS = (
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "Pod",
    "Service",
    "PersistentVolumeClaim",
    "Job",
    "CronJob",
)


def _event_type(value: Any) -> Any:
    return value.strip().capitalize() if isinstance(value, str) else value


class EventParams(ObjectParams):
    reason: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z][A-Za-z0-9]*$")
    message: str = Field(min_length=1, max_length=32_768)  # cut to 1 KiB when recorded
    type: Annotated[Literal["Normal", "Warning"], BeforeValidator(_event_type)] = "Normal"
    api: Literal["core", "events.k8s.io"] = "core"
    action: str | None = Field(default=None, max_length=128)  # events.k8s.io; default: event type


class EventResult(BaseModel):
    event: str  # the Event's name
    namespace: str
    api: Literal["core", "events.k8s.io"]
    kind: str  # of the object it is about
    name: str
    uid: str
    reason: str
    type: str
    message: str  # as recorded (cut to 1 KiB)
    recorded: bool  # False: this attempt's Event existed already (a re-run)


def _cut(message: str) -> str:
    data = message.encode()
    if len(data) <= MESSAGE_BYTES:
        return message
    return data[: MESSAGE_BYTES - 3].decode(errors="ignore") + "..."


def event_name(ref: ObjectRef, ctx: Context) -> str:
    """``<object>.<hash of run, step, attempt>``: unique per attempt, the same when re-run."""
    digest = hashlib.sha256(f"{ctx.run_id}/{ctx.step}/{ctx.attempt}".encode()).hexdigest()[:16]
    return f"{ref.name[: 253 - len(digest) - 1].rstrip('-.')}.{digest}"


def _action(ctx: Context, p: EventParams) -> str:
    """What was done: ``backup.pre`` for an ``io.snaphook.backup.pre`` event by default."""
    return p.action or ctx.event.type.removeprefix("io.snaphook.")[:128] or "hook"


async def _create(api: ApiClient, ref: ObjectRef, body: Any, p: EventParams) -> bool:
    """Create the Event; False when it exists already (this attempt recorded it before)."""
    from kubernetes_asyncio import client
    from kubernetes_asyncio.client.exceptions import ApiException

    with api_errors(f"record an Event on {ref}"):
        try:
            if p.api == "core":
                await client.CoreV1Api(api).create_namespaced_event(ref.namespace, body)
            else:
                await client.EventsV1Api(api).create_namespaced_event(ref.namespace, body)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
    return True


def _body(ctx: Context, p: EventParams, ref: ObjectRef, obj: dict[str, Any]) -> Any:
    from kubernetes_asyncio import client

    meta = obj.get("metadata", {})
    regarding = client.V1ObjectReference(
        api_version=ref.kind.api_version,
        kind=ref.kind.kind,
        name=ref.name,
        namespace=ref.namespace,
        uid=meta.get("uid"),
        resource_version=meta.get("resourceVersion"),
    )
    metadata = client.V1ObjectMeta(
        name=event_name(ref, ctx),
        namespace=ref.namespace,
        annotations={"snaphook.io/run": ctx.run_id, "snaphook.io/step": ctx.step},
    )
    now = datetime.now(UTC)
    # isoformat() drops the fraction at microsecond 0, but a MicroTime must carry six digits.
    now = now.replace(microsecond=now.microsecond or 1)
    instance = socket.gethostname()[:128]
    if p.api == "core":
        return client.CoreV1Event(
            metadata=metadata,
            involved_object=regarding,
            reason=p.reason,
            message=_cut(p.message),
            type=p.type,
            source=client.V1EventSource(component=COMPONENT),
            reporting_component=COMPONENT,
            reporting_instance=instance,
            first_timestamp=now,
            last_timestamp=now,
            count=1,
        )
    return client.EventsV1Event(
        metadata=metadata,
        regarding=regarding,
        reason=p.reason,
        note=_cut(p.message),
        type=p.type,
        action=_action(ctx, p),
        event_time=now,
        reporting_controller=CONTROLLER,
        reporting_instance=instance,
    )


@function("kube.event", rbac=RBAC)
async def event(ctx: Context, p: EventParams) -> EventResult:
    """Record a Kubernetes Event (``reason``, ``message``, ``type``) on the target object."""
    ref = object_ref(ctx, p, what="kube.event", allowed=EVENT_KINDS)
    api = await api_client(ctx.kube)
    obj = await read_object(api, ref)
    body = _body(ctx, p, ref, obj)
    recorded = await _create(api, ref, body, p)
    ctx.logger.info("recorded %s Event %s on %s", p.type, p.reason, ref)
    return EventResult(
        event=body.metadata.name,
        namespace=ref.namespace,
        api=p.api,
        kind=ref.kind.kind,
        name=ref.name,
        uid=str(obj.get("metadata", {}).get("uid", "")),
        reason=p.reason,
        type=p.type,
        message=_cut(p.message),
        recorded=recorded,
    )
