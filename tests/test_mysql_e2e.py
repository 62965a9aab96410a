"""End to end: CloudEvents into a dispatcher, a real MariaDB frozen and thawed by them.

Most tests run the shipped blueprint, hooks/mysql.yaml, bound to a scratch database.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import functions.mysql  # noqa: F401  (registers mysql.* before a harness builds its registry)
from tests.conftest import FunctionCaller, Harness, HarnessFactory
from tests.test_mysql import (
    HOST,
    ORDERS,
    PASSWORD,
    PORT,
    SHOP,
    USER,
    Databases,
    assert_blocked,
    assert_completes,
    connect,
    fill_shop,
    fingerprint,
    freezes_one_at_a_time,
    pending_insert,
    sql,
)

SHIPPED = Path(__file__).parent.parent / "hooks" / "mysql.yaml"


def shipped_blueprint(ttl: str | None = None) -> dict[str, str]:
    text = SHIPPED.read_text(encoding="utf-8")
    if ttl is not None:  # the only change: a lease short enough to watch it run out
        assert text.count("ttl: 15m") == 1
        text = text.replace("ttl: 15m", f"ttl: {ttl}")
    return {"mysql": text}


def bound_to(database: str, **params: Any) -> list[dict[str, Any]]:
    server = {"host": HOST, "port": PORT, "user": USER, "database": database}
    return [
        {
            "blueprint": "mysql-consistent",
            "match": {"namespace": "ns"},
            "params": {**server, **params},
        }
    ]


@pytest.fixture(autouse=True)
def mysql_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPHOOK_SECRET_MYSQL_CREDS_PASSWORD", PASSWORD)


@pytest.fixture
async def databases() -> AsyncIterator[Databases]:
    made = Databases()
    yield made
    await made.drop_all()


@pytest.fixture
async def db(databases: Databases) -> str:
    return await databases.create(ORDERS)


class Leases:
    """Leases the tests saw taken; any still frozen are thawed when the test ends."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    async def of(self, h: Harness, run_id: str) -> dict[str, Any]:
        body: dict[str, Any] = await (await h.client.get(f"/v1/runs/{run_id}")).json()
        [lease] = body["leases"]
        self.ids.append(lease["lease_id"])
        return dict(lease)


@pytest.fixture
async def leases(db: str, call_function: FunctionCaller) -> AsyncIterator[Leases]:
    async with freezes_one_at_a_time():
        seen = Leases()
        yield seen
        for lease in seen.ids:
            await call_function("mysql.thaw", {"lease": lease})


def steps_of(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {step["name"]: step for step in run["steps"]}


async def test_pre_event_freezes_and_post_event_thaws(
    harness: HarnessFactory, db: str, leases: Leases
) -> None:
    h = await harness(shipped_blueprint(), bindings=bound_to(db))
    pre = await h.emit("backup.pre", wait=10, backup_id="b1")
    assert pre["allowed"] is True, pre
    lease = await leases.of(h, pre["run_id"])
    assert lease["status"] == "open"
    pre_steps = steps_of(await h.final(pre["run_id"]))
    assert pre_steps["dump"]["outputs"]["skipped"] is True  # dump: false by default

    async with pending_insert(db) as write:
        await assert_blocked(write)
        post = await h.emit("backup.post", wait=10, backup_id="b1")
        assert post["allowed"] is True, post
        await assert_completes(write)

    post_steps = steps_of(await h.final(post["run_id"]))
    thawed = post_steps["thaw"]["outputs"]
    assert thawed["unlocked"] is True
    assert thawed["connection_id"] == pre_steps["freeze"]["outputs"]["connection_id"]
    assert post_steps["report"]["status"] == "succeeded"
    lease = await leases.of(h, pre["run_id"])
    assert (lease["status"], lease["released_by"]) == ("released", f"step:{post['run_id']}/thaw")


async def test_reaper_thaws_when_the_post_event_never_comes(
    harness: HarnessFactory, db: str, leases: Leases
) -> None:
    h = await harness(shipped_blueprint(ttl="2s"), bindings=bound_to(db), lease_reap_interval=0.05)
    pre = await h.emit("backup.pre", wait=10)
    assert pre["allowed"] is True, pre
    async with pending_insert(db) as write:
        await assert_blocked(write)
        # No post event: the lease runs out after 2 s and the reaper thaws.
        await asyncio.wait_for(write.task, 2 + 5)
    lease = await leases.of(h, pre["run_id"])
    for _ in range(100):
        if lease["status"] == "released":
            break
        await asyncio.sleep(0.05)
        lease = await leases.of(h, pre["run_id"])
    assert (lease["status"], lease["released_by"]) == ("released", "reaper")


AFTER_FREEZE = """
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {{name: mysql-dump-after-freeze}}
spec:
  actions:
    backup.pre:
      - name: freeze
        function: mysql.freeze
        with: {{{server}}}
        lease: {{ttl: 15m, release: mysql.thaw}}
      - name: dump
        function: mysql.dump
        needs: [freeze]
        with: {{{server}, database: {database}, to: "s3://{bucket}/never.sql.gz"}}
"""


async def test_dump_failing_after_the_freeze_denies_and_thaws_at_once(
    harness: HarnessFactory, db: str, leases: Leases, moto_url: str
) -> None:
    server = (
        f'host: "{HOST}", port: {PORT}, user: "{USER}", '
        "password: \"{{ secret('mysql-creds', 'password') }}\""
    )
    missing = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    text = AFTER_FREEZE.format(server=server, database=db, bucket=missing)
    h = await harness({"mysql-dump-after-freeze": text}, s3_endpoint_url=moto_url)
    pre = await h.emit("backup.pre", wait=10)
    assert pre["allowed"] is False and "dump" in pre["reason"], pre
    run = await h.final(pre["run_id"])
    assert steps_of(run)["freeze"]["status"] == "succeeded"  # it was frozen...
    lease = await leases.of(h, pre["run_id"])
    assert (lease["status"], lease["released_by"]) == ("released", "run-failed")
    async with connect(db) as conn:  # ...and is not any more, long before the 15 min ttl
        await asyncio.wait_for(sql(conn, "INSERT INTO orders (item) VALUES ('after')"), 5)


async def test_dump_in_backup_pre_loads_into_a_new_database_on_restore_post(
    harness: HarnessFactory,
    databases: Databases,
    leases: Leases,
    bucket: str,
    moto_url: str,
) -> None:
    source = await databases.create(*SHOP)
    await fill_shop(source)
    bindings = bound_to(source, bucket=bucket, dump=True)
    h = await harness(shipped_blueprint(), bindings=bindings, s3_endpoint_url=moto_url)
    pre = await h.emit("backup.pre", wait=20, backup_id="b-dump")
    assert pre["allowed"] is True, pre
    await leases.of(h, pre["run_id"])
    dumped = steps_of(await h.final(pre["run_id"]))["dump"]["outputs"]
    assert dumped["url"] == f"s3://{bucket}/mysql/ns/app/b-dump.sql.gz" and dumped["bytes"] > 0
    post = await h.emit("backup.post", wait=10, backup_id="b-dump")
    assert post["allowed"] is True, post

    target = databases.name()
    data = {
        "backup": {"name": "nightly", "id": "b-dump"},
        "outcome": "succeeded",
        "params": {"database": target, "restore_from_dump": True},
    }
    restored = await h.emit("restore.post", wait=20, data=data)
    assert restored["allowed"] is True, restored
    load = steps_of(await h.final(restored["run_id"]))["load"]["outputs"]
    assert (load["created"], load["sha256"]) == (True, dumped["sha256"])
    assert await fingerprint(target) == await fingerprint(source)
