"""kube.event against the fake API server, and as a finalizer recording each run's outcome."""

from __future__ import annotations

import re
from typing import Any

import pytest

import functions.kube  # noqa: F401  (registers kube.* in the default registry)
from functions.sdk import PermanentError
from tests.conftest import HarnessFactory, event_json
from tests.kube_fake import RunningCluster
from tests.kube_steps import call_kube

DONE = {"reason": "BackupHookSucceeded", "message": "froze and thawed app"}


@pytest.fixture
def kube(kube_cluster: RunningCluster) -> RunningCluster:
    kube_cluster.cluster.add_workload("Deployment", "ns", "app")
    return kube_cluster


def uid_of(kube: RunningCluster, resource: str, name: str) -> str:
    obj = kube.cluster.get(resource, "ns", name)
    assert obj is not None
    return str(obj["metadata"]["uid"])


async def test_records_a_core_event_on_the_target(kube: RunningCluster) -> None:
    out = await call_kube(kube, "kube.event", DONE, run_id="run-ev", step="report")

    [event] = kube.cluster.items("events", "ns")
    involved = event["involvedObject"]
    assert involved["apiVersion"] == "apps/v1"
    assert (involved["kind"], involved["namespace"], involved["name"]) == (
        "Deployment",
        "ns",
        "app",
    )
    assert involved["uid"] == uid_of(kube, "deployments", "app")  # kubectl describe matches it
    assert (event["reason"], event["message"], event["type"]) == (
        "BackupHookSucceeded",
        "froze and thawed app",
        "Normal",
    )
    assert event["source"] == {"component": "snaphook"}
    assert event["reportingComponent"] == "snaphook" and event["reportingInstance"]
    assert event["count"] == 1 and event["firstTimestamp"] and event["lastTimestamp"]
    assert event["metadata"]["name"].startswith("app.")
    assert event["metadata"]["annotations"]["snaphook.io/run"] == "run-ev"
    assert out == {
        "event": event["metadata"]["name"],
        "namespace": "ns",
        "api": "core",
        "kind": "Deployment",
        "name": "app",
        "uid": involved["uid"],
        "reason": "BackupHookSucceeded",
        "type": "Normal",
        "message": "froze and thawed app",
        "recorded": True,
    }


async def test_records_an_events_k8s_io_event(kube: RunningCluster) -> None:
    kube.cluster.add_pod("ns", "mongo-0")
    params = {
        **DONE,
        "api": "events.k8s.io",
        "type": "warning",
        "kind": "Pod",
        "name": "mongo-0",
    }
    out = await call_kube(kube, "kube.event", params, event_type="io.snaphook.backup.post")

    assert not kube.cluster.items("events", "ns")
    [event] = kube.cluster.items("events.events.k8s.io", "ns")
    assert event["regarding"]["kind"] == "Pod"
    assert event["regarding"]["uid"] == uid_of(kube, "pods", "mongo-0")
    assert (event["note"], event["type"]) == ("froze and thawed app", "Warning")
    assert event["action"] == "backup.post"  # the CloudEvent's type, by default
    assert event["reportingController"] == "snaphook.io/snaphook"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|\+00:00)", event["eventTime"])
    assert out["api"] == "events.k8s.io" and out["type"] == "Warning"


async def test_a_rerun_attempt_records_no_second_event(kube: RunningCluster) -> None:
    first = await call_kube(kube, "kube.event", DONE, run_id="run-1", step="s")
    again = await call_kube(kube, "kube.event", DONE, run_id="run-1", step="s")
    other = await call_kube(kube, "kube.event", DONE, run_id="run-1", step="s", attempt=2)

    assert (first["recorded"], again["recorded"], other["recorded"]) == (True, False, True)
    assert first["event"] == again["event"] != other["event"]
    assert len(kube.cluster.items("events", "ns")) == 2


async def test_long_messages_are_cut(kube: RunningCluster) -> None:
    out = await call_kube(kube, "kube.event", {**DONE, "message": "x" * 5000})
    [event] = kube.cluster.items("events", "ns")
    assert len(event["message"]) == 1024 and event["message"].endswith("...")
    assert out["message"] == event["message"]


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"message": "m"}, "reason: Field required"),
        ({"reason": "Backup done", "message": "m"}, "reason: String should match pattern"),
        ({"reason": "R", "message": "m", "type": "Error"}, "type: Input should be 'Normal'"),
        ({"reason": "R", "message": ""}, "message: String should have at least 1 character"),
        ({"reason": "R", "message": "m", "name": "gone"}, "Deployment ns/gone not found"),
        ({"reason": "R", "message": "m", "kind": "Namespace", "name": "ns"}, "not Namespace"),
    ],
)
async def test_bad_params_and_targets_are_named(
    kube: RunningCluster, params: dict[str, Any], problem: str
) -> None:
    with pytest.raises(PermanentError, match=re.escape(problem)):
        await call_kube(kube, "kube.event", params)
    assert not kube.cluster.items("events", "ns")


@pytest.mark.parametrize("kind", ["Secret", "ConfigMap"])
async def test_never_reads_secrets_or_configmaps(kube: RunningCluster, kind: str) -> None:
    # Reading one for its uid would need get on every Secret (ConfigMap): not granted.
    kube.cluster.add(
        {"apiVersion": "v1", "kind": kind, "metadata": {"name": "c", "namespace": "ns"}}
    )
    with pytest.raises(PermanentError, match=rf"kube\.event works on Deployment, .* not {kind}"):
        await call_kube(kube, "kube.event", {**DONE, "kind": kind, "name": "c"})
    assert not kube.cluster.requests_to(resource=f"{kind.lower()}s")


def test_reads_only_kinds_its_rbac_grants_get_on() -> None:
    from functions.kube_client import kind_info
    from functions.kube_event import EVENT_KINDS, RBAC

    granted = {
        (g, r)
        for rule in RBAC
        if "get" in rule.verbs
        for g in rule.api_groups
        for r in rule.resources
    }
    assert {(kind_info(k).group, kind_info(k).plural) for k in EVENT_KINDS} == granted


async def test_forbidden(kube: RunningCluster) -> None:
    kube.cluster.deny("create", "events", namespace="ns")
    with pytest.raises(PermanentError) as refused:
        await call_kube(kube, "kube.event", DONE)
    assert "record an Event on Deployment ns/app: forbidden by Kubernetes RBAC" in str(
        refused.value
    )


# --- as a finalizer -----------------------------------------------------------------------

REPORTED = """
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: reported}
spec:
  params:
    fail: {type: boolean, default: false}
  actions:
    backup.pre:
      - name: work
        function: test.flaky
        with: {failures: "{{ 1 if params.fail else 0 }}"}
      - name: record
        function: kube.event
        when: always
        with:
          reason: "{{ 'PreHookFailed' if run.failed else 'PreHookSucceeded' }}"
          type: "{{ 'Warning' if run.failed else 'Normal' }}"
          message: >-
            snaphook {{ run.type }} for backup {{ backup.name }}:
            {{ 'failed (' ~ run.failed_steps | join(', ') ~ ')' if run.failed else 'done' }}
"""


@pytest.mark.parametrize("fail", [False, True])
async def test_a_finalizer_records_each_outcome(
    kube: RunningCluster, harness: HarnessFactory, fail: bool
) -> None:
    h = await harness({"reported": REPORTED}, kubeconfig=kube.kubeconfig)
    event = event_json("backup.pre", backup_id=f"b-{fail}")
    event["data"]["params"] = {"fail": fail}
    resp = await h.send(event, wait=10)
    run = await h.final((await resp.json())["run_id"])

    assert run["status"] == ("failed" if fail else "succeeded")
    [recorded] = kube.cluster.items("events", "ns")
    assert recorded["involvedObject"]["uid"] == uid_of(kube, "deployments", "app")
    if fail:
        assert (recorded["type"], recorded["reason"]) == ("Warning", "PreHookFailed")
        assert (
            recorded["message"]
            == "snaphook io.snaphook.backup.pre for backup nightly: failed (work)"
        )
    else:
        assert (recorded["type"], recorded["reason"]) == ("Normal", "PreHookSucceeded")
        assert recorded["message"] == "snaphook io.snaphook.backup.pre for backup nightly: done"
