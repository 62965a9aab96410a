"""What the fake cluster does on its own: validation and defaulting on writes, the Job
controller (pods, logs, then success or failure after a scripted delay) and the workload
controller (status.replicas/readyReplicas follow spec.replicas after a scripted delay).

Simplifications: a Job runs ``JobScript.pods`` pods once, without retries, whatever its
backoffLimit; workloads do not create pods (tests add the pods they exec into).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from tests.kube_fake_resources import Resource, find_resource, invalid

if TYPE_CHECKING:
    from tests.kube_fake import FakeCluster

_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


@dataclass(frozen=True)
class JobScript:
    """How a created Job behaves."""

    succeed: bool = True
    delay: float | None = 0.0  # seconds until it finishes; None: runs forever
    logs: str = ""  # what each of its pods printed
    exit_code: int | None = None  # the pods' exit code (default 0, or 1 when failing)
    pods: int = 1


@dataclass(frozen=True)
class Rollout:
    """How a workload's status follows its spec.replicas."""

    delay: float | None = 0.0  # None: status never follows
    max_ready: int | None = None  # readyReplicas never exceeds this


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- validation and defaulting ----------------------------------------------------------


def validate(resource: Resource, obj: dict[str, Any]) -> None:
    """Raise a 422 ``Invalid`` Status for what the real API server would refuse."""
    meta = obj.get("metadata") or {}
    name = meta.get("name") or ""
    if not name:
        raise invalid(
            resource, "", "metadata.name", "Required value: name or generateName is required"
        )
    if len(name) > 253 or not _SUBDOMAIN.match(name):
        raise invalid(
            resource,
            name,
            "metadata.name",
            f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of lower '
            "case alphanumeric characters, '-' or '.', and must start and end with an "
            "alphanumeric character",
        )
    for key, value in (meta.get("labels") or {}).items():
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
            raise invalid(resource, name, f"metadata.labels.{key}", f'Invalid value: "{value}"')
    spec = obj.get("spec") or {}
    if resource.plural == "pods" and not spec.get("containers"):
        raise invalid(resource, name, "spec.containers", "Required value")
    if resource.plural == "jobs":
        template = (spec.get("template") or {}).get("spec") or {}
        if not template.get("containers"):
            raise invalid(resource, name, "spec.template.spec.containers", "Required value")
        if template.get("restartPolicy") not in ("Never", "OnFailure"):
            raise invalid(
                resource,
                name,
                "spec.template.spec.restartPolicy",
                f'Unsupported value: "{template.get("restartPolicy", "Always")}": '
                'supported values: "OnFailure", "Never"',
            )
    if resource.group == "apps" and not spec.get("selector"):
        raise invalid(resource, name, "spec.selector", "Required value")
    replicas = spec.get("replicas", 0)
    if not isinstance(replicas, int) or replicas < 0:
        raise invalid(
            resource,
            name,
            "spec.replicas",
            f"Invalid value: {replicas}: must be greater than or equal to 0",
        )


def default(resource: Resource, obj: dict[str, Any]) -> None:
    with_spec = resource.group in ("apps", "batch") or resource.plural in ("pods", "services")
    spec = obj.setdefault("spec", {}) if with_spec else {}
    if resource.scale:
        spec.setdefault("replicas", 1)
    if resource.plural == "jobs":
        for key, value in (("backoffLimit", 6), ("completions", 1), ("parallelism", 1)):
            spec.setdefault(key, value)
    if resource.plural == "services":
        spec.setdefault("type", "ClusterIP")


def initial_status(resource: Resource, obj: dict[str, Any]) -> dict[str, Any]:
    """The status a freshly created object has before any controller acts."""
    if resource.plural == "pods":
        return {"phase": "Pending"}
    if resource.plural == "namespaces":
        return {"phase": "Active"}
    if resource.plural == "services":
        return {"loadBalancer": {}}
    return {}


def pod_status(phase: str, containers: list[str], exit_code: int | None = None) -> dict[str, Any]:
    if phase == "Pending":
        return {"phase": "Pending"}
    if phase == "Running":
        state: dict[str, Any] = {"running": {"startedAt": _now()}}
    else:
        code = exit_code if exit_code is not None else (0 if phase == "Succeeded" else 1)
        reason = "Completed" if code == 0 else "Error"
        state = {"terminated": {"exitCode": code, "reason": reason, "finishedAt": _now()}}
    ready = phase == "Running"
    return {
        "phase": phase,
        "podIP": "10.1.0.7",
        "conditions": [{"type": "Ready", "status": str(ready)}],
        "containerStatuses": [
            {
                "name": name,
                "image": f"{name}:latest",
                "imageID": "",
                "ready": ready,
                "restartCount": 0,
                "started": ready,
                "state": state,
            }
            for name in containers
        ],
    }


def workload_status(
    resource: Resource, replicas: int, ready: int, generation: int
) -> dict[str, Any]:
    """A workload's status; zero counts are left out, as the API (omitempty) does, except
    a StatefulSet's ``replicas``."""
    counts = {
        "replicas": replicas,
        "updatedReplicas": replicas,
        "readyReplicas": ready,
        "availableReplicas": ready,
    }
    if resource.plural == "statefulsets":
        counts["currentReplicas"] = replicas
    status: dict[str, Any] = {"observedGeneration": generation}
    status.update({k: v for k, v in counts.items() if v})
    if resource.plural == "statefulsets":
        status["replicas"] = replicas
    return status


# --- reacting to writes -----------------------------------------------------------------


def created(cluster: FakeCluster, resource: Resource, obj: dict[str, Any]) -> None:
    if resource.plural == "jobs":
        cluster.spawn(_run_job(cluster, obj))
    elif resource.scale and not obj.get("status"):
        _schedule_rollout(cluster, resource, obj)


def modified(
    cluster: FakeCluster, resource: Resource, new: dict[str, Any], old: dict[str, Any]
) -> None:
    if resource.scale and new["spec"].get("replicas") != old["spec"].get("replicas"):
        _schedule_rollout(cluster, resource, new)


def _schedule_rollout(cluster: FakeCluster, resource: Resource, obj: dict[str, Any]) -> None:
    meta = obj["metadata"]
    rollout = cluster.rollouts.get((meta["namespace"], meta["name"]), Rollout())
    if rollout.delay is not None:
        cluster.spawn(_roll_out(cluster, resource, meta["namespace"], meta["name"], rollout))


async def _roll_out(
    cluster: FakeCluster, resource: Resource, namespace: str, name: str, rollout: Rollout
) -> None:
    await asyncio.sleep(rollout.delay or 0.0)  # the scripted controller latency
    current = cluster.lookup(resource, namespace, name)
    if current is None:
        return
    wanted = current["spec"].get("replicas", 1)
    ready = wanted if rollout.max_ready is None else min(wanted, rollout.max_ready)
    status = workload_status(resource, wanted, ready, current["metadata"].get("generation", 1))
    cluster.replace_object(resource, current, {"status": status}, part="status")


def _script_for(cluster: FakeCluster, job: dict[str, Any]) -> JobScript:
    name = job["metadata"]["name"]
    for prefix, script in reversed(cluster.job_scripts):
        if name.startswith(prefix):
            return script if isinstance(script, JobScript) else script(job)
    return JobScript()


async def _run_job(cluster: FakeCluster, job: dict[str, Any]) -> None:
    jobs, pods = find_resource("jobs"), find_resource("pods")
    script = _script_for(cluster, job)
    namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
    started = _now()
    made = [_make_job_pod(cluster, job) for _ in range(script.pods)]
    for made_pod in made:
        if script.logs:
            cluster.set_logs(namespace, made_pod, script.logs)
    _set_job_status(cluster, namespace, name, {"startTime": started, "active": len(made)})
    if script.delay is None:
        return
    await asyncio.sleep(script.delay)  # the scripted run time
    phase = "Succeeded" if script.succeed else "Failed"
    for pod_name in made:
        pod = cluster.lookup(pods, namespace, pod_name)
        if pod is not None:
            containers = [c["name"] for c in pod["spec"]["containers"]]
            status = pod_status(phase, containers, script.exit_code)
            cluster.replace_object(pods, pod, {"status": status}, part="status")
    if cluster.lookup(jobs, namespace, name) is None:
        return
    _set_job_status(cluster, namespace, name, _final_job_status(script, started, len(made)))


def _final_job_status(script: JobScript, started: str, pods: int) -> dict[str, Any]:
    finished = _now()
    if script.succeed:
        conditions = [
            {"type": "SuccessCriteriaMet", "status": "True", "lastTransitionTime": finished},
            {"type": "Complete", "status": "True", "lastTransitionTime": finished},
        ]
        return {
            "startTime": started,
            "completionTime": finished,
            "succeeded": pods,
            "conditions": conditions,
        }
    failure = {
        "reason": "BackoffLimitExceeded",
        "message": "Job has reached the specified backoff limit",
        "lastTransitionTime": finished,
    }
    return {
        "startTime": started,
        "failed": pods,
        "conditions": [
            {"type": "FailureTarget", "status": "True", **failure},
            {"type": "Failed", "status": "True", **failure},
        ],
    }


def _set_job_status(
    cluster: FakeCluster, namespace: str, name: str, status: dict[str, Any]
) -> None:
    jobs = find_resource("jobs")
    current = cluster.lookup(jobs, namespace, name)
    if current is not None:
        cluster.replace_object(jobs, current, {"status": status}, part="status")


def _make_job_pod(cluster: FakeCluster, job: dict[str, Any]) -> str:
    meta = job["metadata"]
    template = job["spec"]["template"]
    labels = dict((template.get("metadata") or {}).get("labels") or {})
    labels.update(
        {
            "job-name": meta["name"],
            "batch.kubernetes.io/job-name": meta["name"],
            "controller-uid": meta["uid"],
            "batch.kubernetes.io/controller-uid": meta["uid"],
        }
    )
    containers = [c["name"] for c in template["spec"]["containers"]]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": f"{meta['name']}-",
            "namespace": meta["namespace"],
            "labels": labels,
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": template["spec"],
        "status": pod_status("Running", containers),
    }
    created_pod = cluster.create_object(
        find_resource("pods"), pod, meta["namespace"], keep_status=True
    )
    name: str = created_pod["metadata"]["name"]
    return name


JobBehaviour = JobScript | Callable[[dict[str, Any]], JobScript]
