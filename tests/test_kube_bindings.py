"""Annotation bindings against the fake API server: what binds, what is refused and how,
how often the API server is asked, and how soon a change is seen."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from dispatcher.bindings import Binding
from dispatcher.blueprint_loader import load_blueprints
from dispatcher.blueprints import BlueprintSet
from dispatcher.errors import EventError
from dispatcher.events import HookEvent, hook_event_from
from dispatcher.kube import KubeAccess
from dispatcher.kube_bindings import KubeBindingResolver
from tests.conftest import free_port, write_blueprints
from tests.hookfns import Recorder, fresh
from tests.kube_fake import FakeCluster, RunningCluster, write_kubeconfig

BLUEPRINTS = {
    "mongo": """\
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: mongo}
spec:
  params:
    container: {type: string, default: mongod}
    port: {type: integer, default: 27017}
    verbose: {type: boolean, default: false}
    tags: {type: array, default: []}
  actions:
    backup.pre:
      - {name: lock, function: test.effect}
""",
    "generic": """\
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: generic}
spec:
  params:
    bucket: {type: string, default: ""}
  actions:
    backup.pre:
      - {name: note, function: test.effect}
""",
}
KINDS = ("Deployment", "StatefulSet", "DaemonSet")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def event(subject: str) -> HookEvent:
    attributes = {
        "id": uuid.uuid4().hex,
        "source": "test",
        "type": "io.snaphook.backup.pre",
        "subject": subject,
    }
    return hook_event_from(attributes, {"backup": {"name": "nightly", "id": "b1"}})


@pytest.fixture
def blueprints(tmp_path: Path) -> BlueprintSet:
    write_blueprints(tmp_path / "hooks", BLUEPRINTS)
    return load_blueprints(tmp_path / "hooks", fresh(Recorder()))


Factory = Callable[..., KubeBindingResolver]


@pytest.fixture
async def resolver(kube_access: KubeAccess, blueprints: BlueprintSet) -> AsyncIterator[Factory]:
    made: list[KubeBindingResolver] = []

    def make(**options: Any) -> KubeBindingResolver:
        options.setdefault("kinds", KINDS)
        made.append(KubeBindingResolver(kube_access, blueprints=lambda: blueprints, **options))
        return made[-1]

    yield make
    for made_resolver in made:
        await made_resolver.close()


def statefulset(cluster: FakeCluster, annotations: dict[str, str], ns: str = "db") -> None:
    if cluster.get("namespaces", None, ns) is None:
        cluster.add_namespace(ns)
    cluster.add_workload("StatefulSet", ns, "mongo", annotations=annotations)


async def refused(resolver: KubeBindingResolver, subject: str) -> EventError:
    with pytest.raises(EventError) as caught:
        await resolver.resolve(event(subject))
    return caught.value


# -- what binds -------------------------------------------------------------------------------


async def test_workload_annotations_bind_with_typed_params(
    kube_cluster: RunningCluster, resolver: Factory
) -> None:
    statefulset(
        kube_cluster.cluster,
        {
            "snaphook.io/blueprint": "mongo",
            "snaphook.io/param.container": "db",
            "snaphook.io/param.port": "27018",
            "snaphook.io/param.verbose": "true",
            "snaphook.io/param.tags": '["a", "b"]',
            "snaphook.io/failure-policy": "ignore",
            "snaphook.io/timeout": "45s",
            "other.io/ignored": "x",
        },
    )
    binding = await resolver().resolve(event("db/StatefulSet/mongo"))
    assert binding == Binding(
        blueprint="mongo",
        failure_policy="ignore",
        timeout=45.0,
        params={"container": "db", "port": 27018, "verbose": True, "tags": ["a", "b"]},
        origin="annotation snaphook.io/blueprint on StatefulSet db/mongo",
    )


async def test_namespace_annotation_binds_every_workload_in_it(
    kube_cluster: RunningCluster, resolver: Factory
) -> None:
    cluster = kube_cluster.cluster
    cluster.add_namespace(
        "shop",
        annotations={
            "snaphook.io/blueprint": "generic",
            "snaphook.io/param.bucket": "s3://backups",
            "snaphook.io/timeout": "2m",
        },
    )
    cluster.add_workload("Deployment", "shop", "web")
    binding = await resolver().resolve(event("shop/deployment/web"))  # kind: any case
    assert binding is not None
    assert (binding.blueprint, binding.params, binding.timeout) == (
        "generic",
        {"bucket": "s3://backups"},
        120.0,
    )
    assert binding.origin == "annotation snaphook.io/blueprint on Namespace shop"
    namespace_itself = await resolver().resolve(event("shop/Namespace/shop"))
    assert namespace_itself is not None and namespace_itself.blueprint == "generic"


async def test_workload_wins_and_namespace_params_follow_their_blueprint(
    kube_cluster: RunningCluster, resolver: Factory
) -> None:
    cluster = kube_cluster.cluster
    cluster.add_namespace(
        "db",
        annotations={
            "snaphook.io/blueprint": "generic",
            "snaphook.io/param.bucket": "s3://ns",  # for generic: not passed to mongo
            "snaphook.io/failure-policy": "ignore",  # not blueprint-specific: inherited
        },
    )
    statefulset(cluster, {"snaphook.io/blueprint": "mongo", "snaphook.io/param.port": "1"})
    binding = await resolver().resolve(event("db/StatefulSet/mongo"))
    assert binding is not None
    assert (binding.blueprint, binding.params, binding.failure_policy) == (
        "mongo",
        {"port": 1},
        "ignore",
    )

    # Params on a Namespace without a blueprint of its own apply to all its workloads,
    # and the workload's own value wins.
    cluster.add_namespace("team", annotations={"snaphook.io/param.port": "2"})
    cluster.add_workload(
        "StatefulSet",
        "team",
        "a",
        annotations={"snaphook.io/blueprint": "mongo", "snaphook.io/param.verbose": "false"},
    )
    cluster.add_workload(
        "StatefulSet",
        "team",
        "b",
        annotations={"snaphook.io/blueprint": "mongo", "snaphook.io/param.port": "3"},
    )
    a = await resolver().resolve(event("team/StatefulSet/a"))
    b = await resolver().resolve(event("team/StatefulSet/b"))
    assert a is not None and a.params == {"port": 2, "verbose": False}
    assert b is not None and b.params == {"port": 3}


async def test_unannotated_workload_is_not_bound(
    kube_cluster: RunningCluster, resolver: Factory
) -> None:
    statefulset(kube_cluster.cluster, {"snaphook.io/param.port": "1"})  # params, no blueprint
    assert await resolver().resolve(event("db/StatefulSet/mongo")) is None


# -- what is refused -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        (
            {"snaphook.io/failure-policy": "sometimes"},
            "StatefulSet db/mongo: annotation snaphook.io/failure-policy: 'sometimes' "
            "is not 'fail' or 'ignore'",
        ),
        (
            {"snaphook.io/timeout": "soon"},
            "StatefulSet db/mongo: annotation snaphook.io/timeout: 'soon' is not a "
            "positive duration",
        ),
        ({"snaphook.io/timeout": "0s"}, "snaphook.io/timeout: '0s' is not a positive"),
        (
            {"snaphook.io/param.port": "many"},
            "StatefulSet db/mongo: annotation snaphook.io/param.port: 'many' is not valid: "
            "param 'port' must be an integer",
        ),
        (
            {"snaphook.io/param.colour": "red"},
            "annotation snaphook.io/param.colour: 'red' sets a param blueprint 'mongo' does "
            "not declare (params: container, port, tags, verbose)",
        ),
    ],
)
async def test_bad_annotations_are_422_naming_object_and_annotation(
    kube_cluster: RunningCluster,
    resolver: Factory,
    annotations: dict[str, str],
    expected: str,
) -> None:
    statefulset(kube_cluster.cluster, {"snaphook.io/blueprint": "mongo", **annotations})
    error = await refused(resolver(), "db/StatefulSet/mongo")
    assert error.status == 422
    assert expected in error.detail


async def test_bad_namespace_annotation_names_the_namespace(
    kube_cluster: RunningCluster, resolver: Factory
) -> None:
    kube_cluster.cluster.add_namespace("db", annotations={"snaphook.io/failure-policy": "x"})
    statefulset(kube_cluster.cluster, {"snaphook.io/blueprint": "mongo"})
    error = await refused(resolver(), "db/StatefulSet/mongo")
    assert error.status == 422
    assert error.detail.startswith("Namespace db: annotation snaphook.io/failure-policy: 'x'")


async def test_missing_objects_and_unknown_kinds_are_422(
    kube_cluster: RunningCluster, resolver: Factory
) -> None:
    kube_cluster.cluster.add_namespace("db")
    resolve = resolver()
    missing = await refused(resolve, "db/StatefulSet/nope")
    assert (missing.status, missing.detail) == (
        422,
        "StatefulSet db/nope (subject db/StatefulSet/nope) does not exist",
    )
    no_namespace = await refused(resolve, "gone/Namespace/gone")
    assert (no_namespace.status, no_namespace.detail) == (
        422,
        "Namespace gone (subject gone/Namespace/gone) does not exist",
    )
    unknown = await refused(resolve, "db/VirtualMachine/vm")
    assert unknown.status == 422
    assert "kind 'VirtualMachine' is not looked up" in unknown.detail
    assert "Deployment, StatefulSet, DaemonSet, Namespace" in unknown.detail
    not_enabled = await refused(resolve, "db/Pod/mongo-0")  # known, not in kinds
    assert not_enabled.status == 422 and "kube_binding_kinds" in not_enabled.detail


async def test_api_server_down_is_503_with_retry_after(
    tmp_path: Path, blueprints: BlueprintSet
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    access = KubeAccess(write_kubeconfig(tmp_path / "kubeconfig", nowhere, "token"), "fake")
    await access.connect()
    resolver = KubeBindingResolver(access, kinds=KINDS, blueprints=lambda: blueprints)
    try:
        error = await refused(resolver, "db/StatefulSet/mongo")
    finally:
        await resolver.close()
        await access.close()
    assert error.status == 503
    assert error.headers == {"Retry-After": "5"}
    assert "cannot be reached" in error.detail and "retry later" in error.detail


async def test_forbidden_get_is_503_naming_rbac(
    kube_cluster: RunningCluster, resolver: Factory
) -> None:
    statefulset(kube_cluster.cluster, {"snaphook.io/blueprint": "mongo"})
    kube_cluster.cluster.deny("*", "statefulsets")
    error = await refused(resolver(watch=False), "db/StatefulSet/mongo")
    assert error.status == 503
    assert "snaphook may not get StatefulSet db/mongo (403" in error.detail
    assert "snaphook rbac" in error.detail


# -- how often the API server is asked ----------------------------------------------------


async def test_hot_events_cost_no_requests_once_the_watch_is_warm(
    kube_cluster: RunningCluster, resolver: Factory
) -> None:
    cluster = kube_cluster.cluster
    statefulset(cluster, {"snaphook.io/blueprint": "mongo"})
    resolve = resolver()
    await resolve.warm()
    before = len(cluster.requests)
    for _ in range(50):
        binding = await resolve.resolve(event("db/StatefulSet/mongo"))
        assert binding is not None and binding.blueprint == "mongo"
    assert cluster.requests[before:] == []
    lists = cluster.requests_to(verb="list", resource="statefulsets")
    watches = cluster.requests_to(verb="watch", resource="statefulsets")
    assert len(lists) == 1 and len(watches) == 1
    assert lists[0].namespace is None  # one watch for the whole cluster


async def test_cold_burst_shares_one_get_per_object(
    kube_cluster: RunningCluster, resolver: Factory
) -> None:
    cluster = kube_cluster.cluster
    statefulset(cluster, {"snaphook.io/blueprint": "mongo"})
    resolve = resolver(watch=False)
    results = await asyncio.gather(
        *(resolve.resolve(event("db/StatefulSet/mongo")) for _ in range(20))
    )
    assert {r.blueprint for r in results if r is not None} == {"mongo"}
    assert len(cluster.requests_to(verb="get", resource="statefulsets", name="mongo")) == 1
    assert len(cluster.requests_to(verb="get", resource="namespaces", name="db")) == 1


async def test_without_watch_answers_are_cached_for_the_ttl(
    kube_cluster: RunningCluster, resolver: Factory
) -> None:
    cluster = kube_cluster.cluster
    statefulset(cluster, {"snaphook.io/blueprint": "mongo"})
    clock = Clock()
    resolve = resolver(watch=False, ttl=10.0, clock=clock)
    for _ in range(10):
        await resolve.resolve(event("db/StatefulSet/mongo"))
    gets = cluster.requests_to(verb="get", resource="statefulsets")
    assert len(gets) == 1
    assert cluster.requests_to(verb="watch") == []

    _annotate(cluster, "db", "mongo", {"snaphook.io/blueprint": "generic"})
    clock.now += 9.0
    still = await resolve.resolve(event("db/StatefulSet/mongo"))
    assert still is not None and still.blueprint == "mongo"  # cached
    clock.now += 2.0
    changed = await resolve.resolve(event("db/StatefulSet/mongo"))
    assert changed is not None and changed.blueprint == "generic"
    assert len(cluster.requests_to(verb="get", resource="statefulsets")) == 2


async def test_forbidden_watch_falls_back_to_cached_gets(
    kube_cluster: RunningCluster, resolver: Factory
) -> None:
    cluster = kube_cluster.cluster
    statefulset(cluster, {"snaphook.io/blueprint": "mongo"})
    cluster.deny("list", "statefulsets")
    cluster.deny("watch", "statefulsets")
    resolve = resolver()
    for _ in range(10):
        binding = await resolve.resolve(event("db/StatefulSet/mongo"))
        assert binding is not None and binding.blueprint == "mongo"
    assert len(cluster.requests_to(verb="get", resource="statefulsets")) == 1


# -- how soon a change is seen ------------------------------------------------------------


def _annotate(cluster: FakeCluster, ns: str, name: str, annotations: dict[str, str]) -> None:
    cluster.update("statefulsets", ns, name, {"metadata": {"annotations": annotations}})


async def _until(resolve: KubeBindingResolver, subject: str, blueprint: str | None) -> None:
    """Poll (no requests: the index answers) until the binding names ``blueprint``."""
    async with asyncio.timeout(5):
        while True:
            binding = await resolve.resolve(event(subject))
            if (binding.blueprint if binding else None) == blueprint:
                return
            await asyncio.sleep(0.01)


async def test_watch_sees_annotation_changes_and_deletions(
    kube_cluster: RunningCluster, resolver: Factory
) -> None:
    cluster = kube_cluster.cluster
    statefulset(cluster, {"snaphook.io/blueprint": "mongo"})
    resolve = resolver()
    await resolve.warm()
    before = len(cluster.requests)

    _annotate(cluster, "db", "mongo", {"snaphook.io/blueprint": "generic"})
    await _until(resolve, "db/StatefulSet/mongo", "generic")
    _annotate(cluster, "db", "mongo", {"snaphook.io/blueprint": None})  # type: ignore[dict-item]
    await _until(resolve, "db/StatefulSet/mongo", None)
    cluster.update(
        "namespaces", None, "db", {"metadata": {"annotations": {"snaphook.io/blueprint": "mongo"}}}
    )
    await _until(resolve, "db/StatefulSet/mongo", "mongo")
    cluster.remove("statefulsets", "db", "mongo")
    async with asyncio.timeout(5):
        while True:
            try:
                await resolve.resolve(event("db/StatefulSet/mongo"))
            except EventError as exc:
                assert "does not exist" in exc.detail
                break
            await asyncio.sleep(0.01)
    assert cluster.requests[before:] == []  # all of it came through the open watches


async def test_expired_watch_lists_again(kube_cluster: RunningCluster, resolver: Factory) -> None:
    cluster = kube_cluster.cluster
    statefulset(cluster, {"snaphook.io/blueprint": "mongo"})
    resolve = resolver()
    await resolve.warm()
    # History moves on without a StatefulSet event (the watch's version falls behind),
    # is compacted, and the API server ends the watches, as on a restart.
    cluster.add_pod("db", "other-0")
    cluster.compact()
    for queue in list(cluster.watchers):
        queue.put_nowait(None)
    _annotate(cluster, "db", "mongo", {"snaphook.io/blueprint": "generic"})
    await _until(resolve, "db/StatefulSet/mongo", "generic")
    # Renewing the watch from its old resourceVersion got 410 Gone: listed again.
    assert len(cluster.requests_to(verb="list", resource="statefulsets")) == 2


async def test_a_watch_that_breaks_unexpectedly_lists_again(
    kube_cluster: RunningCluster, resolver: Factory
) -> None:
    """Whatever ends a watch, the index lists again rather than answer stale forever."""
    cluster = kube_cluster.cluster
    statefulset(cluster, {"snaphook.io/blueprint": "mongo"})
    resolve = resolver()
    await resolve.warm()
    # A watch event longer than the client reads as one line (a 5 MB annotation: etcd's
    # default request limit keeps real objects smaller, but nothing may stop the watch).
    cluster.add_workload("StatefulSet", "db", "huge", annotations={"big": "x" * 5_000_000})
    _annotate(cluster, "db", "mongo", {"snaphook.io/blueprint": "generic"})
    await _until(resolve, "db/StatefulSet/mongo", "generic")
