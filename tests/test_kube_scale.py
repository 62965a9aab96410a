"""kube.scale / kube.scale_restore against the fake API server, and as a freeze lease through
the dispatcher: whatever ends the lease, the replicas come back."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

import functions.kube  # noqa: F401  (registers kube.* in the default registry)
from functions.kube_scale import ORIGINAL
from functions.sdk import PermanentError, RetryableError
from tests.conftest import HarnessFactory
from tests.kube_fake import RunningCluster
from tests.kube_steps import call_kube


@pytest.fixture
def kube(kube_cluster: RunningCluster) -> RunningCluster:
    """Namespace ns with Deployment app at 3 replicas (the default event target)."""
    kube_cluster.cluster.add_workload("Deployment", "ns", "app", replicas=3)
    return kube_cluster


def replicas(kube: RunningCluster, name: str = "app", kind: str = "deployments") -> int:
    obj = kube.cluster.get(kind, "ns", name)
    assert obj is not None
    count: int = obj["spec"]["replicas"]
    return count


def annotations_of(kube: RunningCluster, name: str = "app", kind: str = "deployments") -> Any:
    obj = kube.cluster.get(kind, "ns", name)
    assert obj is not None
    return obj["metadata"].get("annotations") or {}


async def test_scales_the_target_down_and_restores_it(kube: RunningCluster) -> None:
    down = await call_kube(kube, "kube.scale", {"replicas": 0})

    assert down == {
        "kind": "Deployment",
        "namespace": "ns",
        "name": "app",
        "original_replicas": 3,
        "replicas": 0,
        "ready_replicas": 0,
        "changed": True,
    }
    assert replicas(kube) == 0
    assert annotations_of(kube) == {ORIGINAL: "3"}
    # The count went through the scale subresource, as a JSON merge patch.
    [scale] = kube.cluster.requests_to(verb="patch", resource="deployments/scale")
    assert scale.content_type == "application/merge-patch+json"
    assert scale.body == {"spec": {"replicas": 0}}
    # The original was recorded compare-and-set, before scaling.
    [record] = kube.cluster.requests_to(verb="patch", resource="deployments")
    assert record.body["metadata"]["annotations"] == {ORIGINAL: "3"}
    assert record.body["metadata"]["resourceVersion"]
    assert kube.cluster.requests.index(record) < kube.cluster.requests.index(scale)

    up = await call_kube(kube, "kube.scale_restore", {})

    assert up == {
        "kind": "Deployment",
        "namespace": "ns",
        "name": "app",
        "restored": True,
        "replicas": 3,
        "ready_replicas": 3,
    }
    assert replicas(kube) == 3
    assert annotations_of(kube) == {}  # the record is gone once restored
    obj = kube.cluster.get("deployments", "ns", "app")
    assert obj is not None and obj["status"]["readyReplicas"] == 3


async def test_a_repeated_scale_keeps_the_first_original(kube: RunningCluster) -> None:
    """A retried freeze sees its own 0; it must still report (and restore) 3."""
    await call_kube(kube, "kube.scale", {"replicas": 0})
    again = await call_kube(kube, "kube.scale", {"replicas": 0})

    assert again["original_replicas"] == 3
    assert again["changed"] is False
    assert annotations_of(kube) == {ORIGINAL: "3"}
    await call_kube(kube, "kube.scale_restore", {"replicas": ""})  # "" = not given
    assert replicas(kube) == 3


async def test_restore_takes_an_explicit_count(kube: RunningCluster) -> None:
    await call_kube(kube, "kube.scale", {"replicas": 1})
    out = await call_kube(kube, "kube.scale_restore", {"replicas": "5"})
    assert (out["replicas"], out["ready_replicas"]) == (5, 5)
    assert replicas(kube) == 5 and annotations_of(kube) == {}


async def test_restore_without_a_record_does_nothing(kube: RunningCluster) -> None:
    out = await call_kube(kube, "kube.scale_restore", {})
    assert out["restored"] is False and out["replicas"] is None
    assert not kube.cluster.requests_to(verb="patch")
    assert replicas(kube) == 3


async def test_scaling_to_zero_waits_until_the_pods_are_gone(kube: RunningCluster) -> None:
    """A terminating pod may still write: the freeze holds only once none is left."""
    kube.cluster.add_pod("ns", "app-1", labels={"app": "app"})
    kube.cluster.add_pod("ns", "other", labels={"app": "other"})

    with pytest.raises(RetryableError) as timed_out:
        await call_kube(kube, "kube.scale", {"replicas": 0}, timeout=2)

    assert re.search(
        r"timed out after [\d.]+s waiting for the pods of Deployment ns/app to stop "
        r"\(app-1 left\)",
        str(timed_out.value),
    )
    lists = kube.cluster.requests_to(verb="list", resource="pods")
    assert {r.query["labelSelector"] for r in lists} == {"app=app"}


async def test_scaling_to_zero_returns_once_the_pods_are_gone(kube: RunningCluster) -> None:
    kube.cluster.add_pod("ns", "app-1", labels={"app": "app"})

    async def kubelet() -> None:
        await kube.cluster.wait_until(lambda: replicas(kube) == 0)
        kube.cluster.remove("pods", "ns", "app-1")

    stopping = asyncio.create_task(kubelet())
    out = await call_kube(kube, "kube.scale", {"replicas": 0})
    await stopping
    assert out["replicas"] == 0
    assert kube.cluster.get("pods", "ns", "app-1") is None


async def test_a_statefulset_named_by_params(kube: RunningCluster) -> None:
    kube.cluster.add_workload("StatefulSet", "ns", "mongo", replicas=2)
    out = await call_kube(
        kube, "kube.scale", {"kind": "statefulset", "name": "mongo", "replicas": 0}
    )
    assert (out["kind"], out["original_replicas"]) == ("StatefulSet", 2)
    assert replicas(kube, "mongo", "statefulsets") == 0
    assert kube.cluster.requests_to(verb="patch", resource="statefulsets/scale")
    assert replicas(kube) == 3  # the event's target is untouched
    params = {"kind": "StatefulSet", "name": "mongo"}
    await call_kube(kube, "kube.scale_restore", params, subject="ns/Pod/mongo-0")
    assert replicas(kube, "mongo", "statefulsets") == 2


async def test_waiting_is_bounded_and_says_for_what(kube: RunningCluster) -> None:
    kube.cluster.set_rollout("ns", "app", max_ready=1)  # one pod never becomes ready
    with pytest.raises(RetryableError) as timed_out:
        await call_kube(kube, "kube.scale", {"replicas": 2}, timeout=2)
    assert re.search(
        r"timed out after [\d.]+s waiting for Deployment ns/app to have 2 ready replicas "
        r"\(2 replicas, 1 ready\)",
        str(timed_out.value),
    )


async def test_wait_false_returns_at_once(kube: RunningCluster) -> None:
    kube.cluster.set_rollout("ns", "app", delay=None)  # the controller never catches up
    out = await call_kube(kube, "kube.scale", {"replicas": 0, "wait": False}, timeout=2)
    assert out["replicas"] == 0 and replicas(kube) == 0


async def test_a_concurrent_change_is_read_again(kube: RunningCluster) -> None:
    kube.cluster.fail("patch", "deployments", 409)  # someone else wrote in between
    out = await call_kube(kube, "kube.scale", {"replicas": 0})
    assert out["original_replicas"] == 3
    patches = kube.cluster.requests_to(verb="patch", resource="deployments")
    assert [r.status for r in patches] == [409, 200]


@pytest.mark.parametrize(
    ("params", "subject", "problem"),
    [
        ({"replicas": 0}, "ns/Pod/app-0", "kube.scale works on Deployment and StatefulSet"),
        (
            {"replicas": 0, "kind": "Deployment"},
            "ns/Deployment/app",
            "kind Deployment needs a name",
        ),
        ({"replicas": -1}, "ns/Deployment/app", "replicas: Input should be greater than"),
        (
            {"replicas": 0, "name": "missing"},
            "ns/Deployment/app",
            "Deployment ns/missing not found",
        ),
        ({"replicas": 0}, "ns/Widget/app", "unknown Kubernetes kind 'Widget'"),
    ],
)
async def test_bad_targets_are_named(
    kube: RunningCluster, params: dict[str, Any], subject: str, problem: str
) -> None:
    with pytest.raises(PermanentError, match=re.escape(problem)):
        await call_kube(kube, "kube.scale", params, subject=subject)


async def test_forbidden_scale(kube: RunningCluster) -> None:
    kube.cluster.deny("patch", "deployments/scale", namespace="ns")
    with pytest.raises(PermanentError) as refused:
        await call_kube(kube, "kube.scale", {"replicas": 0})
    assert "forbidden by Kubernetes RBAC" in str(refused.value)
    assert 'cannot patch resource "deployments/scale"' in str(refused.value)


# --- as a freeze lease, through the dispatcher ----------------------------------------------

FREEZE = """
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: scale-freeze}
spec:
  params:
    fail_after_freeze: {type: boolean, default: false}
  actions:
    backup.pre:
      - name: freeze
        function: kube.scale
        with: {replicas: 0}
        timeout: 20s
        # The count to restore is on the Deployment: the release needs no outputs.
        lease: {ttl: 10m, release: kube.scale_restore}
      - name: check
        function: test.flaky  # fails its only attempt when asked to
        with: {failures: "{{ 1 if params.fail_after_freeze else 0 }}"}
        needs: [freeze]
    backup.post:
      - name: thaw
        function: kube.scale_restore
        with: {replicas: "{{ leases.freeze.outputs.original_replicas }}"}
        timeout: 20s
"""


@pytest.fixture
async def freezer(kube: RunningCluster, harness: HarnessFactory) -> Any:
    return await harness({"scale-freeze": FREEZE}, kubeconfig=kube.kubeconfig, kube_context="fake")


async def test_freeze_then_post_event_restores(kube: RunningCluster, freezer: Any) -> None:
    pre = await freezer.emit("backup.pre", backup_id="b-post", wait=10)
    assert pre["allowed"] is True, pre
    assert replicas(kube) == 0

    post = await freezer.emit("backup.post", backup_id="b-post", wait=10)
    run = await freezer.final(post["run_id"])

    assert run["status"] == "succeeded", run
    [thaw] = run["steps"]
    assert thaw["outputs"]["replicas"] == 3
    assert replicas(kube) == 3 and annotations_of(kube) == {}
    pre_run = await freezer.final(pre["run_id"])
    [lease] = pre_run["leases"]
    assert lease["status"] == "released"
    assert lease["released_by"].startswith("step:")


async def test_a_failed_pre_run_restores(kube: RunningCluster, freezer: Any) -> None:
    resp = await freezer.send(_event("b-fail", {"fail_after_freeze": True}), wait=10)
    body = await resp.json()
    run = await freezer.final(body["run_id"])

    assert run["status"] == "failed"
    [lease] = run["leases"]
    assert (lease["status"], lease["released_by"]) == ("released", "run-failed")
    assert lease["release_outputs"]["replicas"] == 3
    assert replicas(kube) == 3 and annotations_of(kube) == {}


async def test_a_freeze_that_failed_half_way_is_undone(kube: RunningCluster, freezer: Any) -> None:
    """The scale step fails after scaling (it may not watch the pods go): no outputs are
    recorded, yet the release restores the count kube.scale wrote on the Deployment."""
    kube.cluster.add_pod("ns", "app-1", labels={"app": "app"})
    kube.cluster.deny("list", "pods", namespace="ns")

    body = await freezer.emit("backup.pre", backup_id="b-half", wait=10)
    run = await freezer.final(body["run_id"])

    assert run["status"] == "failed"
    freeze = next(s for s in run["steps"] if s["name"] == "freeze")
    assert freeze["status"] == "failed" and "forbidden" in freeze["error"]
    [lease] = run["leases"]
    assert (lease["status"], lease["released_by"]) == ("released", "step-failed")
    assert replicas(kube) == 3 and annotations_of(kube) == {}


def _event(backup_id: str, params: dict[str, Any]) -> dict[str, Any]:
    from tests.conftest import event_json

    event = event_json("backup.pre", backup_id=backup_id)
    event["data"]["params"] = params
    return event


# --- the shipped example: hooks/kube-cold-backup.yaml ---------------------------------------

COLD = Path(__file__).resolve().parent.parent / "hooks" / "kube-cold-backup.yaml"


async def test_the_cold_backup_example(kube: RunningCluster, harness: HarnessFactory) -> None:
    kube.cluster.add_workload("StatefulSet", "ns", "db", replicas=2)
    app = {"app": "db"}
    kube.cluster.add(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "db", "namespace": "ns"},
            "spec": {"selector": app, "ports": [{"port": 5432}]},
        }
    )
    bindings = [{"blueprint": "kube-cold-backup", "params": {"service": "db"}}]
    h = await harness(
        {"kube-cold-backup": COLD.read_text()}, bindings=bindings, kubeconfig=kube.kubeconfig
    )

    def state() -> tuple[int, dict[str, str]]:
        sts, svc = (
            kube.cluster.get("statefulsets", "ns", "db"),
            kube.cluster.get("services", "ns", "db"),
        )
        assert sts is not None and svc is not None
        return sts["spec"]["replicas"], svc["spec"]["selector"]

    pre = await h.emit("backup.pre", subject="ns/StatefulSet/db", backup_id="cold", wait=10)
    assert pre["allowed"] is True, pre
    assert state() == (0, {"app": "maintenance-page"})

    post = await h.emit("backup.post", subject="ns/StatefulSet/db", backup_id="cold", wait=10)
    run = await h.final(post["run_id"])

    assert run["status"] == "succeeded", run
    assert state() == (2, app)
    [event] = kube.cluster.items("events", "ns")
    assert (event["reason"], event["type"]) == ("ColdBackupDone", "Normal")
    assert event["message"] == "backup nightly: succeeded; running again"
    assert event["involvedObject"]["kind"] == "StatefulSet"
    leases = (await h.final(pre["run_id"]))["leases"]
    assert sorted(lease["released_by"].split(":")[0] for lease in leases) == ["step", "step"]
