"""kube.annotate against the fake API server."""

from __future__ import annotations

import re
from typing import Any

import pytest

from functions.sdk import PermanentError
from tests.kube_fake import RunningCluster
from tests.kube_steps import call_kube


@pytest.fixture
def kube(kube_cluster: RunningCluster) -> RunningCluster:
    kube_cluster.cluster.add_workload(
        "Deployment", "ns", "app", annotations={"old": "x", "keep": "y"}, labels={"tier": "web"}
    )
    return kube_cluster


def metadata(kube: RunningCluster, resource: str, namespace: str | None, name: str) -> Any:
    obj = kube.cluster.get(resource, namespace, name)
    assert obj is not None
    return obj["metadata"]


async def test_sets_and_removes_on_the_target(kube: RunningCluster) -> None:
    params = {
        "annotations": {"snaphook.io/last-backup": "b-42", "old": None, "count": 3},
        "labels": {"snaphook.io/frozen": True, "tier": None},
    }
    out = await call_kube(kube, "kube.annotate", params)

    meta = metadata(kube, "deployments", "ns", "app")
    assert meta["annotations"] == {"keep": "y", "snaphook.io/last-backup": "b-42", "count": "3"}
    assert meta["labels"] == {"snaphook.io/frozen": "true"}
    [patch] = kube.cluster.requests_to(verb="patch", resource="deployments")
    assert patch.content_type == "application/merge-patch+json"
    assert patch.body == {
        "metadata": {
            "annotations": {"snaphook.io/last-backup": "b-42", "old": None, "count": "3"},
            "labels": {"snaphook.io/frozen": "true", "tier": None},
        }
    }
    assert out["set"] == ["count", "snaphook.io/frozen", "snaphook.io/last-backup"]
    assert out["removed"] == ["old", "tier"]
    assert (out["kind"], out["namespace"], out["name"]) == ("Deployment", "ns", "app")
    assert out["resource_version"] == meta["resourceVersion"]


async def test_a_named_object_and_a_namespace(kube: RunningCluster) -> None:
    kube.cluster.add_pod("ns", "app-0")
    await call_kube(
        kube, "kube.annotate", {"kind": "Pod", "name": "app-0", "annotations": {"a": "1"}}
    )
    assert metadata(kube, "pods", "ns", "app-0")["annotations"] == {"a": "1"}

    params = {"kind": "Namespace", "name": "ns", "labels": {"backup": "running"}}
    await call_kube(kube, "kube.annotate", params)
    assert metadata(kube, "namespaces", None, "ns")["labels"]["backup"] == "running"
    [patch] = kube.cluster.requests_to(verb="patch", resource="namespaces")
    assert patch.path == "/api/v1/namespaces/ns"


async def test_a_templated_mapping(kube: RunningCluster) -> None:
    await call_kube(kube, "kube.annotate", {"annotations": '{"b": "2", "old": null}'})
    assert metadata(kube, "deployments", "ns", "app")["annotations"] == {"keep": "y", "b": "2"}


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({}, "give annotations or labels"),
        ({"labels": {"tier": "not valid!"}}, "labels.tier"),
        ({"annotations": {"bad key/with/slashes": "1"}}, "annotations.bad key/with/slashes"),
        ({"annotations": {"a": "x" * 300_000}}, "the API server takes at most 256 KiB"),
        ({"annotations": {"a": "1"}, "name": "gone"}, "Deployment ns/gone not found"),
        ({"annotations": {"a": "1"}, "kind": "Widget", "name": "w"}, "unknown Kubernetes kind"),
    ],
)
async def test_bad_params_and_targets_are_named(
    kube: RunningCluster, params: dict[str, Any], problem: str
) -> None:
    with pytest.raises(PermanentError, match=re.escape(problem)):
        await call_kube(kube, "kube.annotate", params)


async def test_never_patches_secrets(kube: RunningCluster) -> None:
    # patch on secrets would let snaphook rewrite every Secret's data: not granted.
    kube.cluster.add(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": "ns"}}
    )
    params = {"annotations": {"a": "1"}, "kind": "Secret", "name": "s"}
    with pytest.raises(PermanentError, match=r"kube\.annotate works on Deployment, .* not Secret"):
        await call_kube(kube, "kube.annotate", params)
    assert not kube.cluster.requests_to(resource="secrets")


def test_patches_only_kinds_its_rbac_grants_patch_on() -> None:
    from functions.kube_annotate import ANNOTATABLE, RBAC
    from functions.kube_client import kind_info

    granted = {
        (g, r)
        for rule in RBAC
        if "patch" in rule.verbs
        for g in rule.api_groups
        for r in rule.resources
    }
    assert {(kind_info(k).group, kind_info(k).plural) for k in ANNOTATABLE} == granted
    assert ("", "secrets") not in granted


async def test_forbidden(kube: RunningCluster) -> None:
    kube.cluster.deny("patch", "deployments")
    with pytest.raises(PermanentError, match="Deployment ns/app: forbidden by Kubernetes RBAC"):
        await call_kube(kube, "kube.annotate", {"annotations": {"a": "1"}})
