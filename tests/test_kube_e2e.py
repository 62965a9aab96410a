"""End to end: a dispatcher bound by annotations to the shipped hooks/mongodb-kube.yaml,
against the fake Kubernetes API server, with mongosh faked in the MongoDB pod.

An event names ``db/StatefulSet/mongo``; the StatefulSet's annotations choose the blueprint
and its params; kube.exec runs fsyncLock in pod mongo-0 (the fake mongosh keeps the lock
count), the post event unlocks, and kube.event records each phase's outcome on the
StatefulSet. The MongoDB password comes from a Kubernetes Secret and must appear nowhere
but on the exec's stdin.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import functions.kube  # noqa: F401  (registers kube.exec and kube.event)
from tests.conftest import Harness, HarnessFactory, event_json, free_port
from tests.kube_fake import ExecCall, ExecResult, FakeCluster, RunningCluster, write_kubeconfig
from tests.secrets_registry import test_secret

REPO = Path(__file__).resolve().parent.parent
MONGODB_KUBE = (REPO / "hooks" / "mongodb-kube.yaml").read_text(encoding="utf-8")
OTHER = """\
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: other}
spec:
  actions:
    backup.pre:
      - {name: note, function: test.effect}
"""
BLUEPRINTS = {"mongodb-kube": MONGODB_KUBE, "other": OTHER}
WAIT = 20.0


@dataclass
class FakeMongo:
    """What mongosh does to one mongod: the fsyncLock count, and who authenticated."""

    lock_count: int = 0
    fail_lock: bool = False  # lock, then fail (as a timeout half-way would)
    scripts: list[str] = field(default_factory=list)
    users: list[tuple[str, str]] = field(default_factory=list)

    async def __call__(self, call: ExecCall) -> ExecResult:
        """mongosh reading its script from a pipe: each line runs once its newline arrived
        (or stdin ended); ``quit(n)`` exits with ``n``, the end of stdin with 0."""
        if call.container != "mongod" or call.command != ["mongosh", "--quiet", "--norc"]:
            return ExecResult(stderr="unexpected exec", exit_code=127)
        printed = ""
        while script := (await call.read_line()).decode():
            self.scripts.append(script)
            auth = re.search(r"\.auth\(\s*(\"[^\"]*\"),\s*(\"[^\"]*\")\s*\)", script)
            if auth:
                self.users.append((json.loads(auth.group(1)), json.loads(auth.group(2))))
            if "db.fsyncLock()" in script:
                self.lock_count += 1
                if self.fail_lock:  # the script's catch: print(e); quit(1)
                    return ExecResult(stderr="MongoServerError: interrupted\n", exit_code=1)
                reply = {"info": "now locked", "lockCount": self.lock_count, "ok": 1}
                printed += json.dumps(reply) + "\n"
            elif "db.fsyncUnlock()" in script:
                self.lock_count = 0  # the script unlocks until lockCount is 0
                printed += "unlocked\n"
            elif script.strip():
                return ExecResult(stderr="SyntaxError", exit_code=1)
            if "quit(0)" in script:
                break
        return ExecResult(stdout=printed)

    @property
    def locked(self) -> bool:
        return self.lock_count > 0


def encoded(data: dict[str, str]) -> dict[str, str]:
    return {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}


def mongo_statefulset(
    cluster: FakeCluster, namespace: str, name: str, annotations: dict[str, str] | None = None
) -> FakeMongo:
    """A StatefulSet with its pod ``<name>-0`` running mongod (and a sidecar)."""
    if cluster.get("namespaces", None, namespace) is None:
        cluster.add_namespace(namespace)
    cluster.add_workload("StatefulSet", namespace, name, annotations=annotations)
    cluster.add_pod(namespace, f"{name}-0", labels={"app": name}, containers=("mongod", "exporter"))
    mongo = FakeMongo()
    cluster.on_exec(f"{name}-0", mongo, namespace=namespace)
    return mongo


def add_secret(cluster: FakeCluster, namespace: str, name: str, data: dict[str, str]) -> None:
    cluster.add(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace},
            "data": encoded(data),
        }
    )


def credentialed_mongo(
    cluster: FakeCluster, secret: str, username: str, password: str, **params: str
) -> FakeMongo:
    """``db/StatefulSet/mongo`` bound to ``mongodb-kube``, its ``credentials`` param naming
    the Secret ``db/<secret>`` (created here); ``params``: more ``snaphook.io/param.*``."""
    cluster.add_namespace("db")
    add_secret(cluster, "db", secret, {"username": username, "password": password})
    annotations = {"snaphook.io/blueprint": "mongodb-kube", "snaphook.io/param.credentials": secret}
    annotations.update({f"snaphook.io/param.{key}": value for key, value in params.items()})
    return mongo_statefulset(cluster, "db", "mongo", annotations)


async def dispatcher(
    harness: HarnessFactory, kube: RunningCluster | None = None, **settings: Any
) -> Harness:
    return await harness(
        BLUEPRINTS,
        bindings=[],  # annotations only
        kubeconfig=kube.kubeconfig if kube else settings.pop("kubeconfig"),
        kube_context="fake",
        kube_bindings=True,
        kube_secrets=True,
        kube_secret_allow=["mongo-creds"],
        **settings,
    )


async def decide(h: Harness, event_type: str, subject: str, **kw: Any) -> dict[str, Any]:
    return await h.emit(event_type, subject=subject, wait=WAIT, **kw)


def events_on(cluster: FakeCluster, namespace: str, kind: str, name: str) -> list[dict[str, Any]]:
    found = [
        e
        for e in cluster.items("events", namespace)
        if (e["involvedObject"]["kind"], e["involvedObject"]["name"]) == (kind, name)
    ]
    return sorted(found, key=lambda e: int(e["metadata"]["resourceVersion"]))  # oldest first


async def test_annotated_statefulset_is_locked_unlocked_and_told(
    kube_cluster: RunningCluster, harness: HarnessFactory
) -> None:
    cluster = kube_cluster.cluster
    password = test_secret("mongo password")
    mongo = credentialed_mongo(cluster, "mongo-creds", "backup", password, container="mongod")
    h = await dispatcher(harness, kube_cluster)

    pre = await decide(h, "backup.pre", "db/StatefulSet/mongo", backup_id="b1")
    assert pre["allowed"] is True, pre
    assert mongo.locked and mongo.users == [("backup", password)]
    (lock,) = [c for c in cluster.execs if c.pod == "mongo-0"]
    assert (lock.namespace, lock.container) == ("db", "mongod")
    run = await h.final(pre["run_id"])
    assert run["blueprint"] == "mongodb-kube"
    assert [lease["status"] for lease in run["leases"]] == ["open"]
    (locked_event,) = events_on(cluster, "db", "StatefulSet", "mongo")
    assert (locked_event["reason"], locked_event["type"]) == ("MongoFsyncLocked", "Normal")

    post = await decide(h, "backup.post", "db/StatefulSet/mongo", backup_id="b1")
    assert post["allowed"] is True, post
    assert not mongo.locked
    done = await h.final(post["run_id"])
    assert [s["status"] for s in done["steps"]] == ["succeeded", "succeeded"]
    first = await h.final(pre["run_id"])
    assert first["leases"][0]["released_by"] == f"step:{post['run_id']}/unlock"
    told = events_on(cluster, "db", "StatefulSet", "mongo")
    assert [(e["reason"], e["type"]) for e in told] == [
        ("MongoFsyncLocked", "Normal"),
        ("BackupHooksSucceeded", "Normal"),
    ]
    assert "fsyncUnlock succeeded" in told[1]["message"]

    # The password went to mongosh over stdin, and nowhere else: not in the exec URLs (the
    # API server's audit log), the run records, the Events.
    assert sum(password in script for script in mongo.scripts) == 2  # lock and unlock
    seen = [r.path + str(r.query) + json.dumps(r.body) for r in cluster.requests]
    seen += [json.dumps(run), json.dumps(done), json.dumps(told)]
    assert not [text for text in seen if password in text]


async def test_a_failed_lock_is_unlocked_at_once(
    kube_cluster: RunningCluster, harness: HarnessFactory
) -> None:
    cluster = kube_cluster.cluster
    mongo = mongo_statefulset(cluster, "db", "mongo", {"snaphook.io/blueprint": "mongodb-kube"})
    mongo.fail_lock = True
    h = await dispatcher(harness, kube_cluster)
    pre = await decide(h, "backup.pre", "db/StatefulSet/mongo")
    assert pre["allowed"] is False
    lock = next(s for s in pre["steps"] if s["name"] == "lock")
    assert "exited with code 1; stderr ends: MongoServerError: interrupted" in lock["error"]
    run = await h.final(pre["run_id"])
    assert [(x["status"], x["released_by"]) for x in run["leases"]] == [("released", "step-failed")]
    assert not mongo.locked  # the lease's release ran the unlock in the pod
    (failed,) = events_on(cluster, "db", "StatefulSet", "mongo")
    assert (failed["reason"], failed["type"]) == ("MongoFsyncLockFailed", "Warning")


async def test_an_api_server_before_kubernetes_1_30_is_locked_and_unlocked_too(
    kube_cluster: RunningCluster, harness: HarnessFactory
) -> None:
    """v4.channel.k8s.io cannot say that stdin ended: the scripts must end by themselves."""
    cluster = kube_cluster.cluster
    cluster.exec_protocols = ("v4.channel.k8s.io", "channel.k8s.io")
    mongo = mongo_statefulset(cluster, "db", "mongo", {"snaphook.io/blueprint": "mongodb-kube"})
    h = await dispatcher(harness, kube_cluster)

    pre = await decide(h, "backup.pre", "db/StatefulSet/mongo", backup_id="b1")
    assert pre["allowed"] is True, pre
    assert mongo.locked
    assert {c.protocol for c in cluster.execs} == {"v4.channel.k8s.io"}
    post = await decide(h, "backup.post", "db/StatefulSet/mongo", backup_id="b1")
    assert post["allowed"] is True, post
    assert not mongo.locked


async def test_namespace_annotation_binds_its_statefulsets(
    kube_cluster: RunningCluster, harness: HarnessFactory
) -> None:
    cluster = kube_cluster.cluster
    cluster.add_namespace(
        "shop",
        annotations={"snaphook.io/blueprint": "mongodb-kube", "snaphook.io/timeout": "25s"},
    )
    mongo = mongo_statefulset(cluster, "shop", "orders")  # no annotations of its own
    h = await dispatcher(harness, kube_cluster)
    pre = await decide(h, "backup.pre", "shop/StatefulSet/orders")
    assert pre["allowed"] is True, pre
    assert mongo.locked and mongo.users == []  # no credentials param: no auth
    run = await h.final(pre["run_id"])
    assert run["blueprint"] == "mongodb-kube"


async def test_annotation_change_is_picked_up(
    kube_cluster: RunningCluster, harness: HarnessFactory
) -> None:
    cluster = kube_cluster.cluster
    mongo = mongo_statefulset(cluster, "db", "mongo", {"snaphook.io/blueprint": "other"})
    h = await dispatcher(harness, kube_cluster)
    first = await decide(h, "backup.pre", "db/StatefulSet/mongo", backup_id="b1")
    assert (await h.final(first["run_id"]))["blueprint"] == "other"
    assert not mongo.locked

    cluster.update(
        "statefulsets",
        "db",
        "mongo",
        {"metadata": {"annotations": {"snaphook.io/blueprint": "mongodb-kube"}}},
    )
    # Probe with restore.pre events (neither blueprint has steps for them) until the
    # watch has delivered the change: no sleep, no side effect.
    async with asyncio.timeout(10):
        while True:
            probe = await h.emit("restore.pre", subject="db/StatefulSet/mongo")
            if (await h.final(probe["run_id"]))["blueprint"] == "mongodb-kube":
                break
    second = await decide(h, "backup.pre", "db/StatefulSet/mongo", backup_id="b2")
    assert second["allowed"] is True and mongo.locked


async def test_a_secret_read_during_an_api_outage_is_retried(
    kube_cluster: RunningCluster, harness: HarnessFactory
) -> None:
    cluster = kube_cluster.cluster
    password = test_secret("mongo password, outage")
    mongo = credentialed_mongo(cluster, "mongo-creds", "backup-op", password)
    h = await dispatcher(harness, kube_cluster)
    cluster.fail("get", "secrets", 503, times=1)
    pre = await decide(h, "backup.pre", "db/StatefulSet/mongo", backup_id="b1")
    assert pre["allowed"] is True, pre
    lock = next(s for s in pre["steps"] if s["name"] == "lock")
    assert (lock["status"], lock["attempts"]) == ("succeeded", 2)
    assert mongo.locked and mongo.users == [("backup-op", password)]


async def test_secret_outside_the_allow_list_fails_the_step_clearly(
    kube_cluster: RunningCluster, harness: HarnessFactory
) -> None:
    cluster = kube_cluster.cluster
    password = test_secret("root password")
    mongo = credentialed_mongo(cluster, "root-creds", "root", password)
    h = await dispatcher(harness, kube_cluster)
    pre = await decide(h, "backup.pre", "db/StatefulSet/mongo")
    assert pre["allowed"] is False
    lock = next(s for s in pre["steps"] if s["name"] == "lock")
    assert lock["status"] == "failed"
    assert (
        "Kubernetes Secret db/root-creds is not allowed (add it to kube_secret_allow)"
        in (lock["error"])
    )
    assert mongo.scripts == []  # nothing ran in the pod
    assert cluster.requests_to(resource="secrets") == []  # nor was the Secret read
    run = await h.final(pre["run_id"])
    assert password not in json.dumps(run)
    (failed,) = events_on(cluster, "db", "StatefulSet", "mongo")
    assert (failed["reason"], failed["type"]) == ("MongoFsyncLockFailed", "Warning")


async def test_unannotated_workload_is_422_and_api_down_is_503(
    kube_cluster: RunningCluster, harness: HarnessFactory, tmp_path: Path
) -> None:
    mongo_statefulset(kube_cluster.cluster, "db", "plain")
    h = await dispatcher(harness, kube_cluster)
    resp = await h.send(event_json("backup.pre", subject="db/StatefulSet/plain"), wait=WAIT)
    assert resp.status == 422
    problem = await resp.json()
    assert "no blueprint is bound to db/StatefulSet/plain" in problem["detail"]

    nowhere = write_kubeconfig(tmp_path / "down", f"http://127.0.0.1:{free_port()}", "t")
    down = await dispatcher(harness, kubeconfig=nowhere, state_dir=tmp_path / "down-state")
    resp = await down.send(event_json("backup.pre", subject="db/StatefulSet/mongo"))
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "5"
    assert "cannot be reached" in (await resp.json())["detail"]


@pytest.fixture(autouse=True)
def _no_env_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment resolver comes first: nothing there may shadow the cluster's."""
    for name in ("SNAPHOOK_SECRET_MONGO_CREDS_USERNAME", "SNAPHOOK_SECRET_MONGO_CREDS_PASSWORD"):
        monkeypatch.delenv(name, raising=False)


async def test_serve_without_kubernetes_access_says_so(tmp_path: Path) -> None:
    from tests.test_cli import clean_env, snaphook

    result = await snaphook(
        "serve",
        "--port",
        "0",
        "--state-dir",
        str(tmp_path / "state"),
        env=clean_env(SNAPHOOK_KUBE_BINDINGS="true", KUBERNETES_SERVICE_HOST=""),
    )
    assert result.code == 1
    assert result.err.strip().endswith(
        "kube_bindings/kube_secrets: cannot configure Kubernetes access: "
        "Service host/port is not set. (not in a cluster? set kubeconfig)"
    )
