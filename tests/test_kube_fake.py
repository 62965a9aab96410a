"""The fake Kubernetes API server behaves like the real one, as kubernetes_asyncio sees it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from tests.kube_fake import ExecResult, JobScript, RunningCluster, write_kubeconfig


@pytest.fixture
async def api(kube_cluster: RunningCluster) -> AsyncIterator[client.ApiClient]:
    configuration = client.Configuration()
    await config.load_kube_config(
        config_file=str(kube_cluster.kubeconfig),
        client_configuration=configuration,
        persist_config=False,
    )
    async with client.ApiClient(configuration) as api_client:
        yield api_client


def status_of(exc: ApiException) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(exc.body)
    return body


def pod(name: str, labels: dict[str, str] | None = None, containers: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"containers": [{"name": f"c{i}", "image": "busybox"} for i in range(containers)]},
    }


async def test_create_get_replace_delete_with_metadata(
    api: client.ApiClient, kube_cluster: RunningCluster
) -> None:
    v1 = client.CoreV1Api(api)
    kube_cluster.cluster.add_namespace("db")
    created = await v1.create_namespaced_pod("db", pod("p1", {"app": "x"}))
    assert created.metadata.uid and created.metadata.creation_timestamp
    assert created.metadata.namespace == "db" and created.metadata.generation == 1
    assert created.status.phase == "Pending"  # a controller, not the client, sets status
    first_rv = int(created.metadata.resource_version)

    with pytest.raises(ApiException) as exc:
        await v1.create_namespaced_pod("db", pod("p1"))
    assert exc.value.status == 409
    assert status_of(exc.value)["reason"] == "AlreadyExists"
    assert status_of(exc.value)["message"] == 'pods "p1" already exists'

    got = await v1.read_namespaced_pod("p1", "db")
    got.metadata.labels["tier"] = "db"
    replaced = await v1.replace_namespaced_pod("p1", "db", got)
    assert replaced.metadata.labels == {"app": "x", "tier": "db"}
    assert int(replaced.metadata.resource_version) > first_rv
    assert replaced.metadata.uid == created.metadata.uid

    got.metadata.labels["tier"] = "stale"  # still carries the old resourceVersion
    with pytest.raises(ApiException) as exc:
        await v1.replace_namespaced_pod("p1", "db", got)
    assert exc.value.status == 409 and status_of(exc.value)["reason"] == "Conflict"

    await v1.delete_namespaced_pod("p1", "db")
    with pytest.raises(ApiException) as exc:
        await v1.read_namespaced_pod("p1", "db")
    body = status_of(exc.value)
    assert exc.value.status == 404
    assert body["kind"] == "Status" and body["reason"] == "NotFound"
    assert body["message"] == 'pods "p1" not found'
    assert body["details"] == {"name": "p1", "kind": "pods"}


async def test_create_refusals_are_status_objects(
    api: client.ApiClient, kube_cluster: RunningCluster
) -> None:
    v1 = client.CoreV1Api(api)
    with pytest.raises(ApiException) as exc:
        await v1.create_namespaced_pod("nowhere", pod("p1"))
    assert exc.value.status == 404
    assert status_of(exc.value)["message"] == 'namespaces "nowhere" not found'

    with pytest.raises(ApiException) as exc:
        await v1.create_namespaced_pod("default", pod("Not_A_Name"))
    body = status_of(exc.value)
    assert exc.value.status == 422 and body["reason"] == "Invalid"
    assert body["details"]["causes"][0]["field"] == "metadata.name"

    generated = await v1.create_namespaced_pod(
        "default", {**pod(""), "metadata": {"generateName": "job-"}}
    )
    assert generated.metadata.name.startswith("job-") and len(generated.metadata.name) == 9


async def test_label_and_field_selectors(
    api: client.ApiClient, kube_cluster: RunningCluster
) -> None:
    cluster = kube_cluster.cluster
    cluster.add_pod("db", "a", labels={"app": "mongo", "role": "primary", "zone": "x"})
    cluster.add_pod("db", "b", labels={"app": "mongo", "role": "secondary", "zone": "y"})
    cluster.add_pod("db", "c", labels={"app": "mongo", "zone": "z"})
    cluster.add_pod("db", "d", labels={"app": "redis"})
    cluster.add_pod("other", "e", labels={"app": "mongo", "zone": "x"})
    v1 = client.CoreV1Api(api)

    async def names(selector: str = "", fields: str = "", namespace: str = "db") -> list[str]:
        listed = await v1.list_namespaced_pod(
            namespace, label_selector=selector, field_selector=fields
        )
        return [p.metadata.name for p in listed.items]

    assert await names("app=mongo,role!=secondary,zone in (x,z)") == ["a", "c"]
    assert await names("app==mongo,zone notin (x)") == ["b", "c"]
    assert await names("role") == ["a", "b"]
    assert await names("!role") == ["c", "d"]
    assert await names(fields="metadata.name=b") == ["b"]
    assert await names("app=mongo", fields="metadata.name!=a") == ["b", "c"]
    everywhere = await v1.list_pod_for_all_namespaces(label_selector="zone=x")
    assert [(p.metadata.namespace, p.metadata.name) for p in everywhere.items] == [
        ("db", "a"),
        ("other", "e"),
    ]
    namespaces = await v1.list_namespace(label_selector="kubernetes.io/metadata.name=db")
    assert [n.metadata.name for n in namespaces.items] == ["db"]

    for selector, fields in (("app in (x", ""), ("", "spec.bogus=1")):
        with pytest.raises(ApiException) as exc:
            await names(selector, fields)
        assert exc.value.status == 400 and status_of(exc.value)["reason"] == "BadRequest"


async def test_watch_from_a_resource_version(
    api: client.ApiClient, kube_cluster: RunningCluster
) -> None:
    cluster = kube_cluster.cluster
    cluster.add_pod("db", "old", labels={"app": "mongo"})
    v1 = client.CoreV1Api(api)
    listed = await v1.list_namespaced_pod("db", label_selector="app=mongo")
    seen: list[tuple[str, str, str]] = []

    async def follow() -> None:
        w = watch.Watch()
        async with w.stream(
            v1.list_namespaced_pod,
            "db",
            label_selector="app=mongo",
            resource_version=listed.metadata.resource_version,
            timeout_seconds=10,
        ) as stream:
            async for event in stream:
                obj = event["object"]
                seen.append((event["type"], obj.metadata.name, obj.metadata.labels.get("v", "")))
                if event["type"] == "DELETED":
                    w.stop()

    watcher = asyncio.create_task(follow())
    await cluster.wait_until(lambda: bool(cluster.watchers))
    await v1.create_namespaced_pod("db", pod("new", {"app": "mongo"}))
    await v1.patch_namespaced_pod("new", "db", {"metadata": {"labels": {"v": "2"}}})
    await v1.create_namespaced_pod("db", pod("other", {"app": "redis"}))  # not selected
    await v1.patch_namespaced_pod("old", "db", {"metadata": {"labels": {"app": "gone"}}})
    await asyncio.wait_for(watcher, 10)
    # "old" leaving the selection is a DELETED for this watcher, as the API server does.
    assert seen == [("ADDED", "new", ""), ("MODIFIED", "new", "2"), ("DELETED", "old", "")]


async def test_watch_without_version_lists_first_and_times_out(
    api: client.ApiClient, kube_cluster: RunningCluster
) -> None:
    kube_cluster.cluster.add_pod("db", "a")
    v1 = client.CoreV1Api(api)
    resp = await v1.list_namespaced_pod("db", watch=True, timeout_seconds=1, _preload_content=False)
    lines = (await resp.read()).decode().splitlines()  # ends when timeoutSeconds elapse
    assert [json.loads(line)["type"] for line in lines] == ["ADDED"]
    assert json.loads(lines[0])["object"]["kind"] == "Pod"


async def test_watch_from_a_compacted_version_is_gone(
    api: client.ApiClient, kube_cluster: RunningCluster
) -> None:
    kube_cluster.cluster.add_pod("db", "a")
    kube_cluster.cluster.compact()
    v1 = client.CoreV1Api(api)
    resp = await v1.list_namespaced_pod(
        "db", watch=True, resource_version="1", _preload_content=False
    )
    event = json.loads(await resp.read())
    assert event["type"] == "ERROR"
    assert event["object"]["code"] == 410 and event["object"]["reason"] == "Expired"


async def test_three_patch_types(api: client.ApiClient, kube_cluster: RunningCluster) -> None:
    cluster = kube_cluster.cluster
    cluster.add_workload("Deployment", "db", "web", replicas=2, labels={"a": "1", "b": "2"})
    apps = client.AppsV1Api(api)
    sidecar = {"name": "sidecar", "image": "envoy"}

    # A dict body is sent as a strategic merge patch: containers merge by name.
    patched = await apps.patch_namespaced_deployment(
        "web",
        "db",
        {
            "metadata": {"labels": {"b": None, "c": "3"}},
            "spec": {"template": {"spec": {"containers": [sidecar]}}},
            "status": {"replicas": 99},  # ignored: status is a subresource
        },
    )
    assert patched.metadata.labels == {"a": "1", "c": "3"}
    assert [c.name for c in patched.spec.template.spec.containers] == ["main", "sidecar"]
    assert patched.status.replicas == 2
    assert patched.metadata.generation == 2

    # A merge patch replaces lists.
    patched = await apps.patch_namespaced_deployment(
        "web",
        "db",
        {"spec": {"template": {"spec": {"containers": [sidecar]}}}},
        _content_type="application/merge-patch+json",
    )
    assert [c.name for c in patched.spec.template.spec.containers] == ["sidecar"]

    # A list body is sent as a JSON patch.
    patched = await apps.patch_namespaced_deployment(
        "web",
        "db",
        [
            {"op": "test", "path": "/metadata/labels/a", "value": "1"},
            {"op": "replace", "path": "/spec/replicas", "value": 3},
            {"op": "add", "path": "/metadata/annotations", "value": {"x/y": "z"}},
        ],
    )
    assert patched.spec.replicas == 3 and patched.metadata.annotations == {"x/y": "z"}
    with pytest.raises(ApiException) as exc:
        await apps.patch_namespaced_deployment(
            "web", "db", [{"op": "test", "path": "/metadata/labels/a", "value": "2"}]
        )
    assert exc.value.status == 422

    kinds = [r.content_type for r in cluster.requests_to(verb="patch")]
    assert kinds == [
        "application/strategic-merge-patch+json",
        "application/merge-patch+json",
        "application/json-patch+json",
        "application/json-patch+json",
    ]
    assert cluster.requests_to(verb="patch")[1].body == {
        "spec": {"template": {"spec": {"containers": [sidecar]}}}
    }

    with pytest.raises(ApiException) as exc:
        await apps.patch_namespaced_deployment(
            "web", "db", {"spec": {}}, _content_type="application/apply-patch+yaml"
        )
    assert exc.value.status == 415

    # A resourceVersion in a patch is a precondition.
    with pytest.raises(ApiException) as exc:
        await apps.patch_namespaced_deployment(
            "web", "db", {"metadata": {"resourceVersion": "1"}, "spec": {"replicas": 1}}
        )
    assert exc.value.status == 409 and status_of(exc.value)["reason"] == "Conflict"


async def test_noop_patch_keeps_the_resource_version(
    api: client.ApiClient, kube_cluster: RunningCluster
) -> None:
    kube_cluster.cluster.add_pod("db", "a", labels={"x": "1"})
    v1 = client.CoreV1Api(api)
    before = await v1.read_namespaced_pod("a", "db")
    after = await v1.patch_namespaced_pod("a", "db", {"metadata": {"labels": {"x": "1"}}})
    assert after.metadata.resource_version == before.metadata.resource_version


async def test_scale_subresource_and_rollout(
    api: client.ApiClient, kube_cluster: RunningCluster
) -> None:
    cluster = kube_cluster.cluster
    cluster.add_workload("StatefulSet", "db", "mongo", replicas=3)
    apps = client.AppsV1Api(api)
    scale = await apps.read_namespaced_stateful_set_scale("mongo", "db")
    assert (scale.kind, scale.api_version) == ("Scale", "autoscaling/v1")
    assert scale.spec.replicas == 3 and scale.status.selector == "app=mongo"

    await apps.patch_namespaced_stateful_set_scale("mongo", "db", {"spec": {"replicas": 0}})
    await cluster.wait_until(
        lambda: (cluster.get("statefulsets", "db", "mongo") or {})["status"]["replicas"] == 0
    )
    status = (await apps.read_namespaced_stateful_set("mongo", "db")).status
    assert status.replicas == 0 and status.ready_replicas is None  # omitempty, as real

    cluster.set_rollout("db", "mongo", delay=None)  # never becomes ready again
    body = client.V1Scale(metadata=client.V1ObjectMeta(name="mongo"), spec=client.V1ScaleSpec(2))
    await apps.replace_namespaced_stateful_set_scale("mongo", "db", body)
    sts = await apps.read_namespaced_stateful_set("mongo", "db")
    assert sts.spec.replicas == 2 and sts.status.replicas == 0

    with pytest.raises(ApiException) as exc:
        await apps.patch_namespaced_stateful_set_scale("mongo", "db", {"spec": {"replicas": -1}})
    assert exc.value.status == 422


async def test_unauthenticated_and_forbidden(
    api: client.ApiClient, kube_cluster: RunningCluster, tmp_path: Any
) -> None:
    cluster = kube_cluster.cluster
    cluster.add_pod("db", "mongo-0")
    cluster.deny("get", "pods", namespace="db")
    with pytest.raises(ApiException) as exc:
        await client.CoreV1Api(api).read_namespaced_pod("mongo-0", "db")
    body = status_of(exc.value)
    assert exc.value.status == 403 and body["reason"] == "Forbidden"
    assert body["message"] == (
        'pods "mongo-0" is forbidden: User "system:serviceaccount:snaphook:snaphook" cannot '
        'get resource "pods" in API group "" in the namespace "db"'
    )
    cluster.deny("patch", "deployments/scale")
    cluster.add_workload("Deployment", "db", "web")
    with pytest.raises(ApiException) as exc:
        await client.AppsV1Api(api).patch_namespaced_deployment_scale(
            "web", "db", {"spec": {"replicas": 0}}
        )
    assert status_of(exc.value)["message"].endswith(
        'cannot patch resource "deployments/scale" in API group "apps" in the namespace "db"'
    )

    wrong = write_kubeconfig(tmp_path / "wrong", kube_cluster.url, "not-the-token")
    configuration = client.Configuration()
    await config.load_kube_config(
        config_file=str(wrong), client_configuration=configuration, persist_config=False
    )
    async with client.ApiClient(configuration) as stranger:
        with pytest.raises(ApiException) as exc:
            await client.CoreV1Api(stranger).list_namespace()
    assert exc.value.status == 401 and status_of(exc.value)["reason"] == "Unauthorized"
    assert cluster.requests[-1].status == 401


async def test_job_controller_runs_pods_and_finishes(
    api: client.ApiClient, kube_cluster: RunningCluster
) -> None:
    cluster = kube_cluster.cluster
    cluster.add_namespace("db")
    cluster.on_job(JobScript(logs="dumped 3 collections\n", delay=0.0))
    cluster.on_job(JobScript(succeed=False, logs="boom\n"), name_prefix="bad-")
    batch = client.BatchV1Api(api)
    template = {
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "dump", "image": "mongo", "command": ["mongodump"]}],
        }
    }
    for name in ("good", "bad-1"):
        await batch.create_namespaced_job(
            "db", {"metadata": {"name": name}, "spec": {"template": template}}
        )

    def finished(name: str) -> bool:
        job = cluster.get("jobs", "db", name) or {}
        return any(c["status"] == "True" for c in job.get("status", {}).get("conditions", []))

    await cluster.wait_until(lambda: finished("good") and finished("bad-1"))
    good = await batch.read_namespaced_job("good", "db")
    assert [c.type for c in good.status.conditions] == ["SuccessCriteriaMet", "Complete"]
    assert good.status.succeeded == 1
    bad = await batch.read_namespaced_job("bad-1", "db")
    assert bad.status.conditions[-1].type == "Failed"
    assert bad.status.conditions[-1].reason == "BackoffLimitExceeded"

    v1 = client.CoreV1Api(api)
    pods = await v1.list_namespaced_pod("db", label_selector="batch.kubernetes.io/job-name=good")
    (job_pod,) = pods.items
    assert job_pod.metadata.labels["job-name"] == "good"
    assert job_pod.metadata.owner_references[0].uid == good.metadata.uid
    assert job_pod.status.phase == "Succeeded"
    assert job_pod.status.container_statuses[0].state.terminated.exit_code == 0
    assert await v1.read_namespaced_pod_log(job_pod.metadata.name, "db") == "dumped 3 collections\n"

    # batch/v1 orphans a Job's pods unless the delete says otherwise.
    await batch.delete_namespaced_job("bad-1", "db")
    assert cluster.items("pods", "db") and len(cluster.items("pods", "db")) == 2
    await batch.delete_namespaced_job("good", "db", propagation_policy="Background")
    assert [p["metadata"]["labels"]["job-name"] for p in cluster.items("pods", "db")] == ["bad-1"]
    deletes = cluster.requests_to(verb="delete", resource="jobs")
    assert [d.propagation_policy for d in deletes] == [None, "Background"]


async def test_job_that_never_finishes(api: client.ApiClient, kube_cluster: RunningCluster) -> None:
    cluster = kube_cluster.cluster
    cluster.on_job(JobScript(delay=None))
    job = {
        "metadata": {"name": "stuck"},
        "spec": {
            "template": {
                "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "i"}]}
            }
        },
    }
    await client.BatchV1Api(api).create_namespaced_job("default", job)
    await cluster.wait_until(
        lambda: (cluster.get("jobs", "default", "stuck") or {}).get("status", {}).get("active") == 1
    )
    status = (await client.BatchV1Api(api).read_namespaced_job("stuck", "default")).status
    assert status.active == 1 and not status.conditions


async def test_pod_logs(api: client.ApiClient, kube_cluster: RunningCluster) -> None:
    cluster = kube_cluster.cluster
    cluster.add_pod("db", "two", containers=["app", "sidecar"])
    cluster.set_logs("db", "two", "one\ntwo\nthree\n", container="app")
    v1 = client.CoreV1Api(api)
    assert await v1.read_namespaced_pod_log("two", "db", container="app", tail_lines=2) == (
        "two\nthree\n"
    )
    assert await v1.read_namespaced_pod_log("two", "db", container="app", limit_bytes=5) == (
        "one\nt"
    )
    with pytest.raises(ApiException) as exc:
        await v1.read_namespaced_pod_log("two", "db")
    assert exc.value.status == 400
    assert "a container name must be specified for pod two" in status_of(exc.value)["message"]
    with pytest.raises(ApiException) as exc:
        await v1.read_namespaced_pod_log("nope", "db")
    assert exc.value.status == 404


async def test_events_in_both_api_groups(
    api: client.ApiClient, kube_cluster: RunningCluster
) -> None:
    cluster = kube_cluster.cluster
    cluster.add_namespace("db")
    core = await client.CoreV1Api(api).create_namespaced_event(
        "db",
        {
            "metadata": {"generateName": "mongo."},
            "involvedObject": {"kind": "StatefulSet", "namespace": "db", "name": "mongo"},
            "reason": "BackupHookSucceeded",
            "message": "frozen",
            "type": "Normal",
        },
    )
    assert core.metadata.name.startswith("mongo.")
    listed = await client.CoreV1Api(api).list_namespaced_event(
        "db", field_selector="involvedObject.name=mongo,reason=BackupHookSucceeded"
    )
    assert [e.message for e in listed.items] == ["frozen"]
    await client.EventsV1Api(api).create_namespaced_event(
        "db",
        {
            "metadata": {"name": "e1"},
            "eventTime": "2024-01-01T00:00:00.000000Z",
            "regarding": {"kind": "StatefulSet", "namespace": "db", "name": "mongo"},
            "reason": "BackupHookFailed",
            "note": "could not freeze",
            "type": "Warning",
            "action": "Freeze",
            "reportingController": "snaphook.io/dispatcher",
            "reportingInstance": "snaphook-0",
        },
    )
    assert cluster.get("events.events.k8s.io", "db", "e1") is not None
    assert cluster.requests_to(verb="create", resource="events")[-1].path == (
        "/apis/events.k8s.io/v1/namespaces/db/events"
    )


async def test_injected_failures(api: client.ApiClient, kube_cluster: RunningCluster) -> None:
    cluster = kube_cluster.cluster
    cluster.fail("list", "pods", 429, retry_after=3)
    v1 = client.CoreV1Api(api)
    with pytest.raises(ApiException) as exc:
        await v1.list_namespaced_pod("default")
    assert exc.value.status == 429 and exc.value.headers["Retry-After"] == "3"
    assert (await v1.list_namespaced_pod("default")).items == []  # only once


async def test_exec_as_kubernetes_asyncio_does_it(kube_cluster: RunningCluster) -> None:
    from kubernetes_asyncio.stream import WsApiClient

    cluster = kube_cluster.cluster
    cluster.add_pod("db", "p")
    cluster.on_exec("p", lambda call: ExecResult(stdout="out ", stderr="err", exit_code=3))
    configuration = client.Configuration()
    await config.load_kube_config(
        config_file=str(kube_cluster.kubeconfig),
        client_configuration=configuration,
        persist_config=False,
    )
    async with WsApiClient(configuration) as ws_api:
        v1 = client.CoreV1Api(ws_api)
        command = ["sh", "-c", "exit 3"]
        # The library's own reader joins stdout and stderr.
        text = await v1.connect_get_namespaced_pod_exec(
            "p", "db", command=command, stdout=True, stderr=True
        )
        assert text == "out err"
        assert cluster.execs[0].protocol == "v4.channel.k8s.io"  # what it offers by default

        async with await v1.connect_get_namespaced_pod_exec(
            "p", "db", command=command, stdout=True, stderr=True, _preload_content=False
        ) as ws:
            frames = [msg.data async for msg in ws]
        assert frames[0] == b"\x01"  # an empty frame on stdout: the streams are ready
        (error,) = [f for f in frames if f[0] == 3]
        assert WsApiClient.parse_error_data(error[1:]) == 3
        assert json.loads(error[1:])["reason"] == "NonZeroExitCode"

        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            async with await v1.connect_get_namespaced_pod_exec(
                "gone", "db", command=command, stdout=True, _preload_content=False
            ):
                pass
        assert refused.value.status == 404
        assert cluster.requests[-1].status == 404
