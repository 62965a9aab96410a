"""secret(name, key) from Kubernetes Secrets: the allow-list, what each failure says (never
the value), the cache, the redactor, and the chain with the environment."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dispatcher.kube import KubeAccess
from dispatcher.kube_secrets import ChainSecretResolver, KubeSecretResolver
from dispatcher.redaction import MASK, redactor
from dispatcher.secrets import EnvSecretResolver, SecretNotFoundError, SecretUnavailableError
from tests.kube_fake import FakeCluster, RunningCluster, write_exec_kubeconfig
from tests.secrets_registry import test_secret


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def add_secret(cluster: FakeCluster, namespace: str, name: str, data: dict[str, str]) -> None:
    if cluster.get("namespaces", None, namespace) is None:
        cluster.add_namespace(namespace)
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    cluster.add(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace},
            "type": "Opaque",
            "data": encoded,
        }
    )


Factory = Callable[..., KubeSecretResolver]


@pytest.fixture
def resolver(kube_access: KubeAccess) -> Factory:
    def make(allow: list[str], **options: Any) -> KubeSecretResolver:
        return KubeSecretResolver(kube_access, allow, **options)

    return make


async def missing(resolver: Any, name: str, key: str, namespace: str | None = "db") -> str:
    with pytest.raises(SecretNotFoundError) as caught:
        await resolver.get(name, key, namespace=namespace)
    return str(caught.value)


async def test_reads_an_allowed_secret_and_masks_it_from_then_on(
    kube_cluster: RunningCluster, resolver: Factory
) -> None:
    uri = test_secret("mongo uri")
    add_secret(kube_cluster.cluster, "db", "mongo-creds", {"uri": uri, "user": "backup"})
    value = await resolver(["mongo-creds"]).get("mongo-creds", "uri", namespace="db")
    assert value.get_secret_value() == uri
    assert redactor.redact(f"connecting to {uri}") == f"connecting to {MASK}"
    request = kube_cluster.cluster.requests_to(verb="get", resource="secrets")[0]
    assert (request.namespace, request.name) == ("db", "mongo-creds")


@pytest.mark.parametrize(
    ("pattern", "namespace", "name", "allowed"),
    [
        ("mongo-creds", "db", "mongo-creds", True),
        ("mongo-creds", "shop", "mongo-creds", True),  # a bare name: any namespace
        ("mongo-creds", "db", "mongo-creds-2", False),
        ("db/mongo-creds", "db", "mongo-creds", True),
        ("db/mongo-creds", "shop", "mongo-creds", False),
        ("mongo-*", "db", "mongo-admin", True),
        ("db/*", "db", "anything", True),
        ("db/*", "dbx", "anything", False),
        ("*/s3", "shop", "s3", True),
        ("team-?/pg", "team-a", "pg", True),
    ],
)
def test_allow_list_patterns(
    kube_access: KubeAccess, pattern: str, namespace: str, name: str, allowed: bool
) -> None:
    assert KubeSecretResolver(kube_access, [pattern]).allowed(namespace, name) is allowed


async def test_nothing_is_allowed_by_default_and_refusals_ask_nothing(
    kube_cluster: RunningCluster, resolver: Factory
) -> None:
    add_secret(kube_cluster.cluster, "db", "mongo-creds", {"uri": test_secret("uri")})
    message = await missing(resolver([]), "mongo-creds", "uri")
    assert message == (
        "Kubernetes Secret db/mongo-creds is not allowed (add it to kube_secret_allow)"
    )
    other_namespace = await missing(resolver(["shop/mongo-creds"]), "mongo-creds", "uri")
    assert "not allowed" in other_namespace
    bad_name = await missing(resolver(["*"]), "../../nodes", "x")
    assert bad_name == "Kubernetes Secret 'db/../../nodes': not a valid Secret name"
    no_namespace = await missing(resolver(["*"]), "mongo-creds", "uri", namespace=None)
    assert "no target namespace" in no_namespace
    assert kube_cluster.cluster.requests_to(resource="secrets") == []


async def test_failures_name_secret_and_key_never_the_value(
    kube_cluster: RunningCluster, resolver: Factory
) -> None:
    cluster = kube_cluster.cluster
    password = test_secret("mongo password")
    add_secret(cluster, "db", "mongo-creds", {"password": password, "username": "backup"})
    resolve = resolver(["*"])
    no_key = await missing(resolve, "mongo-creds", "uri")
    assert no_key == (
        "Kubernetes Secret db/mongo-creds has no key 'uri' (keys: password, username)"
    )
    assert password not in no_key
    assert await missing(resolve, "nope", "uri") == "Kubernetes Secret db/nope not found"

    add_secret(cluster, "locked", "creds", {"password": test_secret("locked")})
    cluster.deny("get", "secrets", namespace="locked")
    forbidden = await missing(resolve, "creds", "password", namespace="locked")
    assert forbidden.startswith("snaphook may not get Kubernetes Secret locked/creds (403")
    assert "snaphook rbac" in forbidden


async def test_answers_are_cached_for_the_ttl_and_rotation_is_seen(
    kube_cluster: RunningCluster, resolver: Factory
) -> None:
    cluster = kube_cluster.cluster
    first, second = test_secret("first"), test_secret("rotated")
    add_secret(cluster, "db", "creds", {"pw": first})
    clock = Clock()
    resolve = resolver(["creds"], ttl=10.0, clock=clock)
    values = await asyncio.gather(*(resolve.get("creds", "pw", namespace="db") for _ in range(20)))
    assert {v.get_secret_value() for v in values} == {first}
    assert len(cluster.requests_to(verb="get", resource="secrets")) == 1

    encoded = base64.b64encode(second.encode()).decode()
    cluster.update("secrets", "db", "creds", {"data": {"pw": encoded}})
    clock.now += 9.0
    assert (await resolve.get("creds", "pw", namespace="db")).get_secret_value() == first
    clock.now += 2.0
    assert (await resolve.get("creds", "pw", namespace="db")).get_secret_value() == second
    assert len(cluster.requests_to(verb="get", resource="secrets")) == 2

    # "Not found" is cached too: a hot loop of a misspelt name costs one request per TTL.
    for _ in range(5):
        await missing(resolve, "creds", "nope")
    assert len(cluster.requests_to(verb="get", resource="secrets")) == 2


async def test_chain_reads_the_environment_first_then_kubernetes(
    kube_cluster: RunningCluster, resolver: Factory
) -> None:
    in_env, in_cluster = test_secret("env"), test_secret("cluster")
    add_secret(kube_cluster.cluster, "db", "creds", {"pw": in_cluster, "other": in_cluster})
    env = EnvSecretResolver({"SNAPHOOK_SECRET_CREDS_PW": in_env})
    chain = ChainSecretResolver([env, resolver(["creds"])])
    assert (await chain.get("creds", "pw", namespace="db")).get_secret_value() == in_env
    assert (await chain.get("creds", "other", namespace="db")).get_secret_value() == in_cluster
    both_miss = await missing(chain, "creds", "nope")
    assert both_miss == (
        "secret creds/nope not found (set SNAPHOOK_SECRET_CREDS_NOPE); "
        "Kubernetes Secret db/creds has no key 'nope' (keys: other, pw)"
    )


async def test_an_outage_uses_the_value_read_before_for_a_while(
    kube_cluster: RunningCluster, resolver: Factory
) -> None:
    cluster = kube_cluster.cluster
    value = test_secret("outage")
    add_secret(cluster, "db", "creds", {"pw": value})
    clock = Clock()
    resolve = resolver(["creds"], ttl=10.0, stale_for=600.0, clock=clock)
    await resolve.get("creds", "pw", namespace="db")

    cluster.fail("get", "secrets", 503, times=100)
    clock.now += 300.0  # past the TTL, within stale_for: the API server is asked, fails
    assert (await resolve.get("creds", "pw", namespace="db")).get_secret_value() == value
    clock.now += 400.0  # too old to stand in: an outage, which the step's retry may outlast
    with pytest.raises(SecretUnavailableError) as caught:
        await resolve.get("creds", "pw", namespace="db")
    message = str(caught.value)
    assert caught.value.retryable
    assert message.startswith("Kubernetes Secret db/creds: ") and "503" in message
    assert len(cluster.requests_to(verb="get", resource="secrets")) == 3


async def test_an_expiring_exec_plugin_token_is_renewed(
    kube_cluster: RunningCluster, tmp_path: Path
) -> None:
    """A dispatcher outside the cluster (kubeconfig with an EKS/GKE-style exec plugin) keeps
    reading Secrets after its short-lived token expired and the plugin hands out another."""
    cluster = kube_cluster.cluster
    value = test_secret("exec-plugin secret")
    add_secret(cluster, "db", "creds", {"password": value})
    token_file = tmp_path / "token"
    token_file.write_text(cluster.token)
    kubeconfig = write_exec_kubeconfig(tmp_path / "kubeconfig", kube_cluster.url, token_file)
    access = KubeAccess(kubeconfig, "fake")
    await access.connect()
    clock = Clock()
    try:
        secrets = KubeSecretResolver(access, ["creds"], ttl=10.0, clock=clock)
        assert (await secrets.get("creds", "password", namespace="db")).get_secret_value() == value

        cluster.token = "rotated-" + cluster.token
        token_file.write_text(cluster.token)
        clock.now += 11.0  # past the cache's TTL: read again, with the new token
        assert (await secrets.get("creds", "password", namespace="db")).get_secret_value() == value
    finally:
        await access.close()
