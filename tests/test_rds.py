"""``rds.snapshot`` / ``rds.restore`` against moto's RDS over real HTTP, and the
``hooks/rds.yaml`` blueprint end to end.

Every test names its databases with a fresh prefix (moto is shared per worker) and deletes
what it made.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import get_session

from dispatcher.invokers import Invocation
from functions.rds import rds_identifier
from functions.rds_api import until_available
from functions.sdk import EventInfo, PermanentError, RetryableError
from tests.conftest import FunctionCaller, HarnessFactory

OTHER_REGION = "eu-west-1"
# One botocore session for the test side: it caches the parsed RDS model across clients.
SESSION = get_session()
PASSWORD = "not-a-secret-1"


class Moto:
    """Test-side RDS access: make databases, look at what the functions made, clean up."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.prefix = f"t{uuid.uuid4().hex[:8]}"

    def client(self, region: str = "us-east-1") -> Any:
        return SESSION.create_client("rds", region_name=region, endpoint_url=self.url)

    async def instance(self, name: str = "db") -> str:
        identifier = f"{self.prefix}-{name}"
        async with self.client() as rds:
            await rds.create_db_instance(
                DBInstanceIdentifier=identifier,
                Engine="postgres",
                DBInstanceClass="db.t3.micro",
                AllocatedStorage=20,
                MasterUsername="app",
                MasterUserPassword=PASSWORD,
            )
        return identifier

    async def cluster(self, name: str = "aurora") -> str:
        identifier = f"{self.prefix}-{name}"
        async with self.client() as rds:
            await rds.create_db_cluster(
                DBClusterIdentifier=identifier,
                Engine="aurora-postgresql",
                MasterUsername="app",
                MasterUserPassword=PASSWORD,
            )
        return identifier

    async def tags(self, arn: str, region: str = "us-east-1") -> dict[str, str]:
        async with self.client(region) as rds:
            answer = await rds.list_tags_for_resource(ResourceName=arn)
        return {tag["Key"]: tag["Value"] for tag in answer["TagList"]}

    async def cleanup(self) -> None:
        for region in ("us-east-1", OTHER_REGION):
            async with self.client(region) as rds:
                await self._delete_all(rds)

    async def _delete_all(self, rds: Any) -> None:
        mine = self.prefix
        for snap in (await rds.describe_db_snapshots())["DBSnapshots"]:
            if snap["DBSnapshotIdentifier"].startswith(mine):
                await rds.delete_db_snapshot(DBSnapshotIdentifier=snap["DBSnapshotIdentifier"])
        for snap in (await rds.describe_db_cluster_snapshots())["DBClusterSnapshots"]:
            name = snap["DBClusterSnapshotIdentifier"]
            if name.startswith(mine) and snap["SnapshotType"] == "manual":
                await rds.delete_db_cluster_snapshot(DBClusterSnapshotIdentifier=name)
        for db in (await rds.describe_db_instances())["DBInstances"]:
            if db["DBInstanceIdentifier"].startswith(mine):
                await rds.delete_db_instance(
                    DBInstanceIdentifier=db["DBInstanceIdentifier"], SkipFinalSnapshot=True
                )
        for cluster in (await rds.describe_db_clusters())["DBClusters"]:
            if cluster["DBClusterIdentifier"].startswith(mine):
                await rds.delete_db_cluster(
                    DBClusterIdentifier=cluster["DBClusterIdentifier"], SkipFinalSnapshot=True
                )


@pytest.fixture
async def moto(moto_url: str) -> AsyncIterator[Moto]:
    m = Moto(moto_url)
    yield m
    await m.cleanup()


async def run(
    caller: FunctionCaller,
    function: str,
    params: dict[str, Any],
    *,
    backup_id: str = "B-42",
    run_id: str | None = None,
    event_type: str = "backup.pre",
) -> dict[str, Any]:
    """Call ``function`` as a step of a run for backup ``backup_id``."""
    event = EventInfo(
        id=uuid.uuid4().hex,
        source="test",
        type=f"io.snaphook.{event_type}",
        subject="shop/StatefulSet/orders",
        data={
            "backup": {"name": "nightly", "id": backup_id},
            "target": {"namespace": "shop", "kind": "StatefulSet", "name": "orders"},
        },
    )
    invocation = Invocation(
        function=function,
        params={"poll_interval": 0.01, **params},
        event=event,
        run_id=run_id or f"run-{uuid.uuid4().hex[:8]}",
        step="rds",
        attempt=1,
        timeout=30.0,
    )
    return await caller.invoker.invoke(invocation)


# --- naming ------------------------------------------------------------------------------


def test_identifiers_are_valid_rds_names() -> None:
    names = {"db": "Orders", "backup_id": "2024_01_01T00:00/x", "run_id": "r1"}
    assert rds_identifier("{db}-{backup_id}", names, 255) == "orders-2024-01-01t00-00-x"
    assert rds_identifier("{backup_id}", names, 255) == "snaphook-2024-01-01t00-00-x"
    assert rds_identifier("a--b-", {}, 255) == "a-b"


def test_long_identifiers_keep_a_digest_of_the_whole() -> None:
    one = rds_identifier("x" * 80 + "{db}", {"db": "a"}, 63)
    two = rds_identifier("x" * 80 + "{db}", {"db": "b"}, 63)
    assert len(one) == 63 and len(two) == 63
    assert one != two


def test_unknown_placeholder_names_the_known_ones() -> None:
    with pytest.raises(PermanentError, match=r"unknown \{backup\}.*\{backup_id\}"):
        rds_identifier("{db}-{backup}", {"db": "a", "backup_id": "1"}, 63)


# --- waiting -----------------------------------------------------------------------------


async def test_wait_polls_until_available() -> None:
    states = iter(["backing-up", "available"])
    calls: list[float] = []

    async def describe() -> dict[str, Any]:
        calls.append(time.monotonic())
        return {"Status": next(states)}

    current = {"Status": "creating"}
    found = await until_available(describe, current, "Status", "s", time.monotonic() + 5, 0.01)
    assert found == {"Status": "available"}
    assert len(calls) == 2


async def test_wait_past_the_deadline_is_retryable() -> None:
    async def describe() -> dict[str, Any]:
        return {"Status": "creating"}

    with pytest.raises(RetryableError, match="s1 is still creating"):
        await until_available(
            describe, {"Status": "creating"}, "Status", "s1", time.monotonic() + 0.05, 0.01
        )


async def test_wait_on_a_failed_resource_is_permanent() -> None:
    async def describe() -> dict[str, Any]:
        return {"Status": "incompatible-restore"}

    with pytest.raises(PermanentError, match="db1 is incompatible-restore"):
        await until_available(
            describe, {"Status": "creating"}, "Status", "db1", time.monotonic() + 5, 0.01
        )


# --- rds.snapshot ------------------------------------------------------------------------


async def test_instance_snapshot_is_available_and_tagged(
    moto: Moto, call_function: FunctionCaller
) -> None:
    db = await moto.instance()
    out = await run(call_function, "rds.snapshot", {"db": db, "tags": {"team": "payments"}})
    assert out["identifier"] == f"{db}-b-42"
    assert out["status"] == "available"
    assert out["kind"] == "instance" and out["region"] == "us-east-1"
    assert out["arn"].endswith(f":snapshot:{db}-b-42")
    assert out["created_at"] and out["existed"] is False and out["region_copy"] is None
    tags = await moto.tags(out["arn"])
    assert tags["team"] == "payments"
    assert tags["snaphook.io/backup-id"] == "B-42"
    assert tags["snaphook.io/backup-name"] == "nightly"
    assert tags["snaphook.io/run-id"].startswith("run-")


async def test_retried_snapshot_adopts_the_first(moto: Moto, call_function: FunctionCaller) -> None:
    db = await moto.instance()
    first = await run(call_function, "rds.snapshot", {"db": db}, run_id="run-1")
    again = await run(call_function, "rds.snapshot", {"db": db}, run_id="run-1")
    assert again["existed"] is True
    assert again["arn"] == first["arn"] and again["status"] == "available"


async def test_snapshot_name_taken_by_another_db_is_refused(
    moto: Moto, call_function: FunctionCaller
) -> None:
    one, two = await moto.instance("one"), await moto.instance("two")
    params = {"identifier": f"{moto.prefix}-shared-{{backup_id}}"}
    await run(call_function, "rds.snapshot", {"db": one, **params})
    with pytest.raises(PermanentError, match=f"exists already, of {one}"):
        await run(call_function, "rds.snapshot", {"db": two, **params})


async def test_snapshot_of_unknown_instance_is_permanent(
    moto: Moto, call_function: FunctionCaller
) -> None:
    with pytest.raises(PermanentError, match="DBInstanceNotFound"):
        await run(call_function, "rds.snapshot", {"db": f"{moto.prefix}-missing"})


async def test_snapshot_without_waiting_still_names_it(
    moto: Moto, call_function: FunctionCaller
) -> None:
    db = await moto.instance()
    out = await run(call_function, "rds.snapshot", {"db": db, "wait": 0})
    assert out["identifier"] == f"{db}-b-42" and out["arn"]


async def test_copy_needs_waiting(call_function: FunctionCaller) -> None:
    params = {"db": "x", "wait": 0, "copy_to_region": OTHER_REGION}
    with pytest.raises(PermanentError, match="copy_to_region needs wait > 0"):
        await run(call_function, "rds.snapshot", params)


async def test_instance_snapshot_copied_to_another_region(
    moto: Moto, call_function: FunctionCaller
) -> None:
    db = await moto.instance()
    params = {"db": db, "copy_to_region": OTHER_REGION}
    out = await run(call_function, "rds.snapshot", params, run_id="run-c")
    copy = out["region_copy"]
    assert copy["region"] == OTHER_REGION and copy["identifier"] == out["identifier"]
    assert copy["arn"].startswith(f"arn:aws:rds:{OTHER_REGION}:")
    assert copy["status"] == "available" and copy["existed"] is False
    async with moto.client(OTHER_REGION) as rds:
        found = await rds.describe_db_snapshots(DBSnapshotIdentifier=out["identifier"])
    assert found["DBSnapshots"][0]["DBInstanceIdentifier"] == db
    assert (await moto.tags(copy["arn"], OTHER_REGION))["snaphook.io/backup-id"] == "B-42"
    again = await run(call_function, "rds.snapshot", params, run_id="run-c")
    assert again["region_copy"]["existed"] is True


async def test_cluster_snapshot_copied_to_another_region(
    moto: Moto, call_function: FunctionCaller
) -> None:
    cluster = await moto.cluster()
    params = {"db": cluster, "kind": "cluster", "copy_to_region": OTHER_REGION}
    out = await run(call_function, "rds.snapshot", params)
    assert out["kind"] == "cluster" and out["status"] == "available"
    assert out["arn"].endswith(f":cluster-snapshot:{cluster}-b-42")
    assert (await moto.tags(out["arn"]))["snaphook.io/backup-id"] == "B-42"
    async with moto.client(OTHER_REGION) as rds:
        found = await rds.describe_db_cluster_snapshots(
            DBClusterSnapshotIdentifier=out["identifier"]
        )
    assert found["DBClusterSnapshots"][0]["DBClusterIdentifier"] == cluster
    assert out["region_copy"]["arn"].startswith(f"arn:aws:rds:{OTHER_REGION}:")


# --- rds.restore -------------------------------------------------------------------------


async def test_restore_instance_from_its_snapshot(
    moto: Moto, call_function: FunctionCaller
) -> None:
    db = await moto.instance()
    snap = await run(call_function, "rds.snapshot", {"db": db})
    params = {"db": db, "target": "{db}-restored-{backup_id}", "instance_class": "db.t3.large"}
    out = await run(call_function, "rds.restore", params, event_type="restore.pre")
    target = f"{db}-restored-b-42"
    assert out["identifier"] == target and out["snapshot"] == snap["identifier"]
    assert out["status"] == "available" and out["existed"] is False
    assert out["endpoint"].startswith(target) and out["port"] == 5432
    async with moto.client() as rds:
        found = (await rds.describe_db_instances(DBInstanceIdentifier=target))["DBInstances"]
    assert found[0]["DBInstanceClass"] == "db.t3.large"
    assert (await moto.tags(out["arn"]))["snaphook.io/restored-from"] == snap["identifier"]
    again = await run(call_function, "rds.restore", params, event_type="restore.pre")
    assert again["existed"] is True and again["arn"] == out["arn"]


async def test_restore_never_takes_over_an_unrelated_database(
    moto: Moto, call_function: FunctionCaller
) -> None:
    db = await moto.instance()
    other = await moto.instance("other")
    await run(call_function, "rds.snapshot", {"db": db})
    with pytest.raises(PermanentError, match=f"{other} exists already and was not restored"):
        await run(call_function, "rds.restore", {"db": db, "target": other})


async def test_restore_of_a_missing_snapshot_is_permanent(
    moto: Moto, call_function: FunctionCaller
) -> None:
    db = await moto.instance()
    with pytest.raises(PermanentError, match="DBSnapshotNotFound"):
        await run(call_function, "rds.restore", {"db": db, "target": "{db}-new"})


async def test_restore_cluster_with_a_writer(moto: Moto, call_function: FunctionCaller) -> None:
    cluster = await moto.cluster()
    await run(call_function, "rds.snapshot", {"db": cluster, "kind": "cluster"})
    params = {
        "db": cluster,
        "kind": "cluster",
        "target": "{db}-restored",
        "instance_class": "db.r6g.large",
    }
    out = await run(call_function, "rds.restore", params)
    # moto reports a new cluster as "creating" first: this went through the wait loop.
    assert out["status"] == "available" and out["kind"] == "cluster"
    assert out["identifier"] == f"{cluster}-restored"
    assert out["endpoint"] and out["reader_endpoint"]
    assert out["instance"] == f"{cluster}-restored-1"
    async with moto.client() as rds:
        writer = await rds.describe_db_instances(DBInstanceIdentifier=out["instance"])
    assert writer["DBInstances"][0]["DBClusterIdentifier"] == out["identifier"]
    again = await run(call_function, "rds.restore", params)
    assert again["existed"] is True and again["instance"] == out["instance"]


# --- the blueprint -----------------------------------------------------------------------

BLUEPRINT = Path(__file__).parent.parent / "hooks" / "rds.yaml"


async def test_blueprint_snapshots_with_the_backup_and_restores_it(
    moto: Moto, moto_url: str, harness: HarnessFactory
) -> None:
    db = await moto.instance()
    h = await harness(
        {"rds": BLUEPRINT.read_text()},
        bindings=[
            {
                "blueprint": "rds-snapshot",
                "match": {"namespace": "ns"},
                "params": {"db": db, "copy_to_region": OTHER_REGION},
            }
        ],
        aws_endpoint_url=moto_url,
    )
    backup = f"{moto.prefix}-nightly"
    pre = await h.emit("backup.pre", backup_id=backup, wait=20)
    assert pre["allowed"], pre
    post = await h.final((await h.emit("backup.post", backup_id=backup, wait=20))["run_id"])
    steps = {step["name"]: step for step in post["steps"]}
    assert steps["snapshot"]["outputs"]["existed"] is True  # started by the pre phase
    assert steps["snapshot"]["outputs"]["region_copy"]["status"] == "available"
    assert steps["report"]["status"] == "succeeded"
    restored = await h.final((await h.emit("restore.pre", backup_id=backup, wait=20))["run_id"])
    restore = {step["name"]: step for step in restored["steps"]}["restore"]
    assert restore["outputs"]["identifier"] == f"{db}-restored-{backup}"
    assert restore["outputs"]["status"] == "available"


async def test_blueprint_reports_a_failed_snapshot(
    moto: Moto, moto_url: str, harness: HarnessFactory
) -> None:
    missing = f"{moto.prefix}-missing"
    h = await harness(
        {"rds": BLUEPRINT.read_text()},
        bindings=[
            {"blueprint": "rds-snapshot", "match": {"namespace": "ns"}, "params": {"db": missing}}
        ],
        aws_endpoint_url=moto_url,
    )
    pre = await h.emit("backup.pre", wait=20)
    assert pre["allowed"] is False
    post = await h.final((await h.emit("backup.post", wait=20))["run_id"])
    report = {step["name"]: step for step in post["steps"]}["report"]
    assert report["status"] == "succeeded"
    message = report["outputs"]["message"]
    assert f"RDS snapshot of {missing} failed: " in message
    assert "DBInstanceNotFound" in message
