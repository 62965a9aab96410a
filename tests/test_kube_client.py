"""functions.kube_client: cached clients, one error mapping, target resolution."""

from __future__ import annotations

import asyncio
import io
import logging
from pathlib import Path

import pytest
from kubernetes_asyncio import client

from dispatcher.logs import configure_logging
from functions.kube_client import (
    Conflict,
    ObjectRef,
    api_client,
    api_errors,
    close_clients,
    event_target,
    kind_info,
    parse_target,
    patch_object,
    read_object,
    ws_client,
)
from functions.sdk import EventInfo, KubeConfig, PermanentError, RetryableError
from tests.kube_fake import RunningCluster, write_exec_kubeconfig


async def test_one_client_per_loop_and_config(kube_cluster: RunningCluster) -> None:
    kube = kube_cluster.kube_config
    first, second = await asyncio.gather(api_client(kube), api_client(kube))
    assert first is second
    assert await ws_client(kube) is not first
    listed = await client.CoreV1Api(first).list_namespace()
    assert [n.metadata.name for n in listed.items] == ["default"]


async def test_clients_close_when_their_loop_ends(kube_cluster: RunningCluster) -> None:
    kube = kube_cluster.kube_config

    async def use() -> client.ApiClient:
        api = await api_client(kube)
        await client.CoreV1Api(api).list_namespace()
        return api

    # Another loop (asyncio.run in a thread) ends while its client is cached: the session
    # is closed at the loop's shutdown, so no "Unclosed client session" warning follows.
    other = await asyncio.to_thread(asyncio.run, use())
    assert other.rest_client.pool_manager.closed
    mine = await api_client(kube)
    assert mine is not other
    await close_clients()
    assert mine.rest_client.pool_manager.closed
    assert await api_client(kube) is not mine


async def test_bad_kubeconfig_is_a_clear_permanent_error(tmp_path: object) -> None:
    with pytest.raises(PermanentError, match="cannot configure Kubernetes access"):
        await api_client(KubeConfig(kubeconfig="/nonexistent/kubeconfig"))


async def test_errors_map_to_the_runner_policy(kube_cluster: RunningCluster) -> None:
    cluster = kube_cluster.cluster
    cluster.add_workload("StatefulSet", "db", "mongo")
    api = await api_client(kube_cluster.kube_config)
    sts = parse_target("db/StatefulSet/mongo")

    with pytest.raises(PermanentError) as missing:
        await read_object(api, parse_target("db/Deployment/nope"))
    assert str(missing.value) == "Deployment db/nope not found"

    cluster.deny("patch", "statefulsets", namespace="db")
    with pytest.raises(PermanentError) as refused:
        await patch_object(api, sts, {"metadata": {"labels": {"x": "y"}}})
    message = str(refused.value)
    assert message.startswith("StatefulSet db/mongo: forbidden by Kubernetes RBAC: ")
    assert 'cannot patch resource "statefulsets" in API group "apps" in the namespace "db"' in (
        message
    )

    cluster.fail("get", "statefulsets", 429, retry_after=7)
    with pytest.raises(RetryableError) as throttled:
        await read_object(api, sts)
    assert throttled.value.delay == 7.0

    cluster.fail("get", "statefulsets", 503)
    with pytest.raises(RetryableError, match="Kubernetes API server error 503"):
        await read_object(api, sts)

    cluster.fail("get", "statefulsets", 409)
    with pytest.raises(Conflict, match="conflict"):
        await read_object(api, sts)

    with pytest.raises(PermanentError, match="invalid request"):
        await patch_object(api, sts, {"spec": {"replicas": -1}}, sub="scale")

    assert (await read_object(api, sts, sub="scale"))["spec"]["replicas"] == 1
    for text in (str(missing.value), message):
        assert cluster.token not in text


async def test_unreachable_server_is_retryable(
    kube_cluster: RunningCluster, tmp_path: object
) -> None:
    from pathlib import Path

    from tests.conftest import free_port
    from tests.kube_fake import write_kubeconfig

    path = write_kubeconfig(
        Path(str(tmp_path)) / "gone", f"http://127.0.0.1:{free_port()}", "token"
    )
    api = await api_client(KubeConfig(kubeconfig=str(path)))
    unreachable = pytest.raises(RetryableError, match="cannot reach the Kubernetes API server")
    with unreachable, api_errors("Pod db/x"):
        await client.CoreV1Api(api).read_namespaced_pod("x", "db")


def test_targets_resolve_to_their_api() -> None:
    ref = parse_target("db/sts/mongo")
    assert ref == ObjectRef("db", kind_info("StatefulSet"), "mongo")
    assert str(ref) == "StatefulSet db/mongo"
    assert ref.path == "/apis/apps/v1/namespaces/db/statefulsets/mongo"
    assert kind_info("pods").path("db", "p", "exec") == "/api/v1/namespaces/db/pods/p/exec"
    assert kind_info("Namespace").path(None, "db") == "/api/v1/namespaces/db"
    with pytest.raises(PermanentError, match="unknown Kubernetes kind 'Widget'"):
        parse_target("db/Widget/x")
    with pytest.raises(PermanentError, match="is not 'namespace/Kind/name'"):
        parse_target("db/mongo")
    event = EventInfo(
        id="1",
        source="s",
        type="t",
        subject="ignored/Deployment/x",
        data={"target": {"namespace": "db", "kind": "Deployment", "name": "web"}},
    )
    assert str(event_target(event)) == "Deployment db/web"


async def test_debug_logging_shows_no_api_response_bodies(kube_cluster: RunningCluster) -> None:
    # kubernetes_asyncio logs every response body at debug: Secret data, pod logs, env.
    marker = "s3cr3t-in-a-configmap"
    kube_cluster.cluster.add(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "app", "namespace": "default"},
            "data": {"password": marker},
        }
    )
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    out = io.StringIO()
    configure_logging("debug", stream=out)
    try:
        api = await api_client(kube_cluster.kube_config)
        ref = ObjectRef("default", kind_info("ConfigMap"), "app")
        assert (await read_object(api, ref))["data"] == {"password": marker}
        logging.getLogger("snaphook.test").debug("debug lines are written")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    assert "debug lines are written" in out.getvalue()
    assert marker not in out.getvalue()


async def test_an_expiring_exec_plugin_token_is_renewed(
    kube_cluster: RunningCluster, tmp_path: Path
) -> None:
    """Out of the cluster, kubeconfigs for EKS/GKE get short-lived tokens from an exec
    plugin: a long-running process must ask again once the token expired."""
    cluster = kube_cluster.cluster
    token_file = tmp_path / "token"
    token_file.write_text(cluster.token)
    path = write_exec_kubeconfig(tmp_path / "kubeconfig", kube_cluster.url, token_file)
    kube = KubeConfig(kubeconfig=str(path), context="fake")
    ref = ObjectRef("default", kind_info("Namespace"), "default")
    api = await api_client(kube)
    assert (await read_object(api, ref))["metadata"]["name"] == "default"

    cluster.token = "rotated-" + cluster.token  # the old token expired; the plugin has a new one
    token_file.write_text(cluster.token)
    assert await api_client(kube) is api  # still the cached client, with a fresh token
    assert (await read_object(api, ref))["metadata"]["name"] == "default"
