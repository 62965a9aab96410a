"""kube.service_switch / kube.service_switch_revert against the fake API server, and as a
lease through the dispatcher."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

import functions.kube  # noqa: F401  (registers kube.* in the default registry)
from functions.kube_service import ORIGINAL
from functions.sdk import PermanentError, RetryableError
from tests.conftest import HarnessFactory, event_json
from tests.kube_fake import RunningCluster
from tests.kube_steps import call_kube

APP = {"app": "web", "tier": "frontend"}
MAINTENANCE = {"app": "maintenance"}


@pytest.fixture
def kube(kube_cluster: RunningCluster) -> RunningCluster:
    """Service ns/web selecting the app's pods."""
    kube_cluster.cluster.add(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "ns"},
            "spec": {"selector": APP, "ports": [{"port": 80, "targetPort": 8080}]},
        }
    )
    return kube_cluster


def service(kube: RunningCluster) -> dict[str, Any]:
    obj = kube.cluster.get("services", "ns", "web")
    assert obj is not None
    return obj


def selector(kube: RunningCluster) -> dict[str, str]:
    return dict(service(kube)["spec"]["selector"])


def recorded(kube: RunningCluster) -> str | None:
    value = (service(kube)["metadata"].get("annotations") or {}).get(ORIGINAL)
    return None if value is None else str(value)


async def test_switches_to_maintenance_and_back(kube: RunningCluster) -> None:
    params = {"service": "web", "selector": MAINTENANCE}
    out = await call_kube(kube, "kube.service_switch", params)

    assert out == {
        "service": "web",
        "namespace": "ns",
        "mode": "maintenance",
        "selector": MAINTENANCE,
        "original_selector": APP,
        "changed": True,
    }
    assert selector(kube) == MAINTENANCE
    assert json.loads(recorded(kube) or "") == APP
    # One merge patch: keys the new selector lacks are deleted with null; the
    # resourceVersion read makes it compare-and-set.
    [patch] = kube.cluster.requests_to(verb="patch", resource="services")
    assert patch.content_type == "application/merge-patch+json"
    assert patch.body["spec"] == {"selector": {"app": "maintenance", "tier": None}}
    assert patch.body["metadata"]["resourceVersion"]

    back = await call_kube(kube, "kube.service_switch_revert", {"service": "web"})

    assert back["selector"] == APP and back["changed"] is True
    assert selector(kube) == APP
    assert recorded(kube) is None


async def test_a_repeated_switch_keeps_the_real_original(kube: RunningCluster) -> None:
    params = {"service": "web", "selector": MAINTENANCE}
    await call_kube(kube, "kube.service_switch", params)
    again = await call_kube(kube, "kube.service_switch", params)

    assert again["original_selector"] == APP and again["changed"] is False
    await call_kube(kube, "kube.service_switch", {"service": "web", "mode": "restore"})
    assert selector(kube) == APP and recorded(kube) is None


async def test_restore_with_an_explicit_selector(kube: RunningCluster) -> None:
    """``selector`` as a template renders it: JSON text."""
    await call_kube(kube, "kube.service_switch", {"service": "web", "selector": MAINTENANCE})
    params = {"service": "web", "mode": "restore", "selector": json.dumps({"app": "web"})}
    out = await call_kube(kube, "kube.service_switch", params)
    assert out["selector"] == {"app": "web"}
    assert selector(kube) == {"app": "web"} and recorded(kube) is None


async def test_revert_with_nothing_recorded_changes_nothing(kube: RunningCluster) -> None:
    out = await call_kube(kube, "kube.service_switch_revert", {"service": "web", "selector": ""})
    assert out["changed"] is False and out["selector"] == APP
    assert not kube.cluster.requests_to(verb="patch")


async def test_a_concurrent_change_is_read_again(kube: RunningCluster) -> None:
    kube.cluster.fail("patch", "services", 409, times=2)
    out = await call_kube(kube, "kube.service_switch", {"service": "web", "selector": MAINTENANCE})
    assert out["original_selector"] == APP
    statuses = [r.status for r in kube.cluster.requests_to(verb="patch", resource="services")]
    assert statuses == [409, 409, 200]
    assert len(kube.cluster.requests_to(verb="get", resource="services")) == 3


async def test_a_service_that_keeps_changing_gives_up_retryably(kube: RunningCluster) -> None:
    kube.cluster.fail("patch", "services", 409, times=10)
    with pytest.raises(RetryableError, match="Service ns/web: conflict"):
        await call_kube(kube, "kube.service_switch", {"service": "web", "selector": MAINTENANCE})
    assert selector(kube) == APP


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"service": "web"}, "mode maintenance needs selector"),
        ({"service": "web", "selector": {"app": "bad value"}}, "selector.app"),
        ({"service": "web", "selector": "{oops"}, "not a JSON object"),
        ({"service": "Web", "selector": MAINTENANCE}, "service"),
        ({"service": "web", "selector": MAINTENANCE, "mode": "off"}, "mode"),
        ({"service": "nope", "selector": MAINTENANCE}, "Service ns/nope not found"),
    ],
)
async def test_bad_params_and_targets_are_named(
    kube: RunningCluster, params: dict[str, Any], problem: str
) -> None:
    with pytest.raises(PermanentError, match=re.escape(problem)):
        await call_kube(kube, "kube.service_switch", params)
    assert selector(kube) == APP


async def test_forbidden(kube: RunningCluster) -> None:
    kube.cluster.deny("patch", "services")
    with pytest.raises(PermanentError, match="forbidden by Kubernetes RBAC"):
        await call_kube(kube, "kube.service_switch", {"service": "web", "selector": MAINTENANCE})


CUTOVER = """
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: maintenance-page}
spec:
  actions:
    backup.pre:
      - name: cutover
        function: kube.service_switch
        with: {service: web, selector: {app: maintenance}}
        lease:
          ttl: 10m
          release: {function: kube.service_switch_revert, with: {service: web}}
      - name: check
        function: test.flaky
        needs: [cutover]
"""


async def test_a_failed_run_switches_back(kube: RunningCluster, harness: HarnessFactory) -> None:
    h = await harness({"maintenance-page": CUTOVER}, kubeconfig=kube.kubeconfig)
    resp = await h.send(event_json("backup.pre", backup_id="b-svc"), wait=10)
    run = await h.final((await resp.json())["run_id"])

    assert run["status"] == "failed"
    [lease] = run["leases"]
    assert (lease["status"], lease["released_by"]) == ("released", "run-failed")
    assert selector(kube) == APP and recorded(kube) is None
