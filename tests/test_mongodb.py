"""``mongodb.*`` through the real async driver against the fake server (tests/mongo_server.py).

Proves behaviour, not calls: a write from another client blocks while the server is
fsync-locked and completes after the unlock; exported then imported collections are equal
byte for byte; the lock outlives a dispatcher killed with SIGKILL, and the restarted
dispatcher's lease handling unlocks it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from bson import Binary, Decimal128, Int64, ObjectId, Regex
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import OperationFailure

import functions.mongodb  # noqa: F401  (registers mongodb.* for the in-process harness)
from functions.sdk import ObjectStore, PermanentError, RetryableError
from functions.storage import s3_client
from tests.conftest import FunctionCaller, HarnessFactory, event_json, free_port
from tests.mongo_server import FakeMongo

REPO = Path(__file__).resolve().parent.parent
SNAPHOOK = Path(sys.executable).with_name("snaphook")
RAW: CodecOptions[RawBSONDocument] = CodecOptions(document_class=RawBSONDocument)
Client = AsyncMongoClient[dict[str, Any]]


@pytest.fixture
async def mongo() -> AsyncIterator[FakeMongo]:
    server = await FakeMongo().start()
    yield server
    await server.close()


@pytest.fixture
async def client(mongo: FakeMongo) -> AsyncIterator[Client]:
    """The application's own client: another connection than the functions'."""
    c: Client = AsyncMongoClient(mongo.uri, appname="app", serverSelectionTimeoutMS=5000)
    yield c
    await c.close()


async def eventually(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def blocked_insert(client: Client, mongo: FakeMongo) -> asyncio.Task[Any]:
    """An insert that the server holds back (fsync lock): started, and seen waiting."""
    task = asyncio.create_task(client.shop.orders.insert_one({"late": True}))
    await eventually(lambda: mongo.blocked_writes == 1, "the insert to reach the server")
    assert not task.done()
    return task


# --- fsync lock / unlock --------------------------------------------------------------


async def test_lock_blocks_writes_until_unlock(
    call_function: FunctionCaller, mongo: FakeMongo, client: Client
) -> None:
    await client.shop.orders.insert_one({"early": True})
    locked = await call_function("mongodb.fsync_lock", {"uri": mongo.uri})
    assert locked == {"lock_count": 1, "shared": False}
    # The function's client is gone; the lock is the server's and stays.
    assert mongo.open_connections("snaphook") == 0 and mongo.lock_count == 1

    insert = await blocked_insert(client, mongo)
    await asyncio.sleep(0.2)
    assert not insert.done(), "a write went through while the server was fsync-locked"
    assert [d async for d in client.shop.orders.find({"early": True})]  # reads still work

    unlocked = await call_function("mongodb.fsync_unlock", {"uri": mongo.uri})
    assert unlocked == {"unlocked": True, "unlocks": 1, "lock_count": 0, "reason": ""}
    await asyncio.wait_for(insert, 5)
    assert [d async for d in client.shop.orders.find({"late": True})]


async def test_second_lock_is_reported_and_unlock_releases_all(
    call_function: FunctionCaller, mongo: FakeMongo, client: Client
) -> None:
    assert (await call_function("mongodb.fsync_lock", {"uri": mongo.uri}))["lock_count"] == 1
    again = await call_function("mongodb.fsync_lock", {"uri": mongo.uri})
    assert again == {"lock_count": 2, "shared": True}
    insert = await blocked_insert(client, mongo)

    unlocked = await call_function("mongodb.fsync_unlock", {"uri": mongo.uri, "lease": "l-1"})
    assert (unlocked["unlocks"], unlocked["lock_count"], mongo.lock_count) == (2, 0, 0)
    await asyncio.wait_for(insert, 5)


async def test_unlock_when_not_locked_is_a_no_op(
    call_function: FunctionCaller, mongo: FakeMongo, client: Client
) -> None:
    for _ in range(2):  # idempotent: a release may come for a lock that never happened
        unlocked = await call_function("mongodb.fsync_unlock", {"uri": mongo.uri})
        assert unlocked == {
            "unlocked": False,
            "unlocks": 0,
            "lock_count": 0,
            "reason": "not locked",
        }
    # ...which the server itself answers with an error, as mongod does.
    with pytest.raises(OperationFailure) as failed:
        await client.admin.command("fsyncUnlock")
    assert failed.value.code == 20 and "fsyncUnlock called when not locked" in str(failed.value)


async def test_unlock_loop_is_bounded(
    call_function: FunctionCaller, mongo: FakeMongo, client: Client
) -> None:
    for _ in range(3):
        await client.admin.command({"fsync": 1, "lock": True})
    with pytest.raises(RetryableError, match="still locked after 2 unlocks"):
        await call_function("mongodb.fsync_unlock", {"uri": mongo.uri, "max_unlocks": 2})
    assert mongo.lock_count == 1
    unlocked = await call_function("mongodb.fsync_unlock", {"uri": mongo.uri})
    assert unlocked["unlocks"] == 1 and mongo.lock_count == 0


PASSWORD = "Hunter2-s3cret"


@pytest.mark.parametrize(
    ("uri", "error", "says"),
    [
        ("mongodb://admin:{pw}@127.0.0.1:{port}/", PermanentError, "Authentication failed"),
        pytest.param(
            "mongodb://admin:{pw}@127.0.0.1:{closed}/",
            RetryableError,
            "ServerSelectionTimeout",
            # pymongo 4.20 leaks the socket of a connect attempt that client.close()
            # cancels (upstream: PYTHON-5867); gc.collect() below makes the warning
            # surface in this test, not in a later one.
            marks=pytest.mark.filterwarnings(
                "ignore:Exception ignored in. <socket.socket"
                ":pytest.PytestUnraisableExceptionWarning"
            ),
        ),
        ("mongodb://admin:{pw}@127.0.0.1:notaport/", PermanentError, "invalid connection"),
        ("mongodb://admin:{pw}@x@127.0.0.1/", PermanentError, "must be escaped"),
        ("mongodb://admin:{pw}@127.0.0.1:{port}/?tls=ture", PermanentError, "value of tls"),
    ],
    ids=["refused-login", "unreachable", "bad-port", "unescaped", "bad-option"],
)
async def test_errors_never_show_the_password(
    call_function: FunctionCaller,
    mongo: FakeMongo,
    uri: str,
    error: type[Exception],
    says: str,
) -> None:
    uri = uri.format(pw=PASSWORD, port=mongo.port, closed=free_port())
    for name in ("mongodb.fsync_lock", "mongodb.fsync_unlock"):
        with pytest.raises(error) as caught:
            await call_function(name, {"uri": uri, "connect_timeout": 0.5})
        message = str(caught.value)
        assert says in message and PASSWORD not in message
        assert caught.value.__cause__ is None
        del caught  # its traceback keeps the driver's failed connection attempt alive
    gc.collect()


# --- export / import ------------------------------------------------------------------


def orders(count: int) -> list[dict[str, Any]]:
    """Documents using the BSON types a JSON round trip tends to lose."""
    start = datetime(2024, 2, 29, 23, 59, 59, 123000)
    return [
        {
            "_id": ObjectId(),
            "n": i,
            "big": Int64(2**40 + i),
            "small": Int64(i),  # must stay Int64, not become an Int32
            "price": Decimal128(f"{i}.10"),
            "ratio": i / 7,
            "at": start + timedelta(milliseconds=1001 * i),
            "blob": Binary(bytes([i % 256]) * 8),
            "uuid": Binary(uuid.UUID(int=i).bytes, 4),
            "custom": Binary(b"\x00\x01", 0x80),
            "pattern": Regex("^ord-[0-9]+$", "i"),
            "lines": [{"sku": f"s{i}", "qty": 1}, {"sku": "x", "qty": Int64(2)}],
            "note": None if i % 2 else "naïve ☃ 東京",
            "paid": i % 3 == 0,
        }
        for i in range(count)
    ]


async def seed(client: Client) -> None:
    await client.shop.orders.insert_many(orders(250))
    await client.shop.customers.insert_many([{"email": f"c{i}@x.io"} for i in range(5)])
    await client.shop.customers.create_index("email", unique=True)
    await client.shop.create_collection("events", capped=True, size=4096)
    await client.shop["logs/app 2024"].insert_one({"line": "a/b"})
    await client.other.things.insert_one({"kind": "not exported"})


async def raw_documents(client: Client, db: str, name: str) -> list[bytes]:
    coll: AsyncCollection[Any] = client[db].get_collection(name, codec_options=RAW)
    return [bytes(doc.raw) async for doc in coll.find({})]


async def objects(store: ObjectStore, bucket: str) -> dict[str, bytes]:
    async with s3_client(store) as s3:
        listed = await s3.list_objects_v2(Bucket=bucket)
        found = {}
        for item in listed.get("Contents", []):
            answer = await s3.get_object(Bucket=bucket, Key=item["Key"])
            async with answer["Body"] as body:
                found[item["Key"]] = await body.read()
        return found


@pytest.mark.parametrize(("fmt", "packed"), [("bson", True), ("jsonl", False), ("jsonl", True)])
async def test_export_import_round_trip(
    call_function: FunctionCaller,
    mongo: FakeMongo,
    client: Client,
    object_store: ObjectStore,
    bucket: str,
    fmt: str,
    packed: bool,
) -> None:
    await seed(client)
    mongo.commands.clear()
    exported = await call_function(
        "mongodb.export",
        {
            "uri": mongo.uri,
            "to": f"s3://{bucket}/exports/b1/",
            "databases": "shop",  # as a template renders it
            "format": fmt,
            "gzip": packed,
            "batch_size": 40,
        },
    )
    # Streamed from the cursor batch by batch: 250 orders are 1 find + 6 getMore.
    assert mongo.commands.count("getMore") >= 6

    suffix = f".{fmt}" + (".gz" if packed else "")
    names = ["customers", "events", "logs/app 2024", "orders"]
    counts = {c["collection"]: c["count"] for c in exported["collections"]}
    assert counts == {"customers": 5, "events": 0, "logs/app 2024": 1, "orders": 250}
    assert exported["count"] == 256 and exported["url"] == f"s3://{bucket}/exports/b1/manifest.json"
    stored = await objects(object_store, bucket)
    keys = {f"exports/b1/shop/{n.replace('/', '%2F').replace(' ', '%20')}{suffix}" for n in names}
    assert set(stored) == keys | {"exports/b1/manifest.json"}
    for entry in exported["collections"]:
        data = stored[entry["url"].removeprefix(f"s3://{bucket}/")]
        assert (entry["bytes"], entry["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
        assert data.startswith(b"\x1f\x8b") == packed  # gzip magic
    manifest = json.loads(stored["exports/b1/manifest.json"])
    assert (manifest["format"], manifest["compression"]) == (fmt, "gzip" if packed else "none")
    assert {e["path"] for e in manifest["collections"]} == {
        k.removeprefix("exports/b1/") for k in keys
    }

    mongo.commands.clear()
    imported = await call_function(
        "mongodb.import",
        {
            "uri": mongo.uri,
            "from": f"s3://{bucket}/exports/b1",
            "database": "restored",
            "batch_size": 40,
        },
    )
    assert imported["count"] == 256 and imported["database"] == "restored"
    assert mongo.commands.count("insert") >= 7  # 250 orders in batches of 40, and the rest

    # Equal byte for byte: every type, field order and value survived.
    for name in names:
        assert await raw_documents(client, "restored", name) == await raw_documents(
            client, "shop", name
        ), name
    info = await client.restored.customers.index_information()
    assert info["email_1"]["unique"] is True
    [events] = await (await client.restored.list_collections(filter={"name": "events"})).to_list()
    assert events["options"] == {"capped": True, "size": 4096}


async def test_exported_lines_are_canonical_extended_json(
    call_function: FunctionCaller,
    mongo: FakeMongo,
    client: Client,
    object_store: ObjectStore,
    bucket: str,
) -> None:
    await client.shop.orders.insert_many(orders(3))
    to = f"s3://{bucket}/x"
    await call_function(
        "mongodb.export", {"uri": mongo.uri, "to": to, "format": "jsonl", "collections": ["orders"]}
    )
    data = gzip.decompress((await objects(object_store, bucket))["x/shop/orders.jsonl.gz"])
    first = json.loads(data.splitlines()[0])
    assert first["small"] == {"$numberLong": "0"} and first["price"] == {"$numberDecimal": "0.10"}
    assert first["at"] == {"$date": {"$numberLong": "1709251199123"}}


async def test_import_into_existing_data_needs_drop(
    call_function: FunctionCaller, mongo: FakeMongo, client: Client, bucket: str
) -> None:
    await client.shop.orders.insert_many(orders(30))
    to = f"s3://{bucket}/dup"
    await call_function("mongodb.export", {"uri": mongo.uri, "to": to})
    params = {"uri": mongo.uri, "from": f"{to}/manifest.json", "database": "shop"}
    with pytest.raises(PermanentError, match="duplicate key"):
        await call_function("mongodb.import", params)
    imported = await call_function("mongodb.import", {**params, "drop": True})
    assert imported["collections"] == [
        {"collection": "orders", "source": "shop.orders", "count": 30}
    ]
    assert len(await raw_documents(client, "shop", "orders")) == 30


async def test_selection_errors_name_what_is_missing(
    call_function: FunctionCaller, mongo: FakeMongo, client: Client, bucket: str
) -> None:
    await client.shop.orders.insert_one({"n": 1})
    await client.crm.people.insert_one({"n": 1})
    with pytest.raises(PermanentError, match="no collection invoices in shop"):
        await call_function(
            "mongodb.export",
            {
                "uri": mongo.uri,
                "to": f"s3://{bucket}/e",
                "databases": ["shop"],
                "collections": "orders,invoices",
            },
        )
    with pytest.raises(PermanentError, match="no database nope"):
        await call_function(
            "mongodb.export", {"uri": mongo.uri, "to": f"s3://{bucket}/e", "databases": "nope"}
        )

    exported = await call_function("mongodb.export", {"uri": mongo.uri, "to": f"s3://{bucket}/all"})
    assert {(c["database"], c["collection"]) for c in exported["collections"]} == {
        ("crm", "people"),
        ("shop", "orders"),
    }
    params = {"uri": mongo.uri, "from": f"s3://{bucket}/all", "database": "copy"}
    with pytest.raises(PermanentError, match="holds crm, shop: set source_database"):
        await call_function("mongodb.import", params)
    imported = await call_function("mongodb.import", {**params, "source_database": "crm"})
    assert imported["count"] == 1


async def test_damaged_export_is_detected(
    call_function: FunctionCaller,
    mongo: FakeMongo,
    client: Client,
    object_store: ObjectStore,
    bucket: str,
) -> None:
    await client.shop.orders.insert_many(orders(20))
    await call_function(
        "mongodb.export", {"uri": mongo.uri, "to": f"s3://{bucket}/d", "gzip": False}
    )
    key = "d/shop/orders.bson"
    data = bytearray((await objects(object_store, bucket))[key])
    data[-2] ^= 0xFF  # one flipped bit inside the last document's payload area
    async with s3_client(object_store) as s3:
        await s3.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    with pytest.raises(PermanentError, match="does not match the manifest"):
        await call_function(
            "mongodb.import", {"uri": mongo.uri, "from": f"s3://{bucket}/d", "database": "r"}
        )


# --- through the dispatcher -----------------------------------------------------------


HOOKS = (REPO / "hooks" / "mongodb.yaml").read_text(encoding="utf-8")


async def test_blueprint_locks_for_the_snapshot_and_unlocks_after(
    harness: HarnessFactory, mongo: FakeMongo, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SNAPHOOK_SECRET_MONGO_CREDS_URI", mongo.uri)
    h = await harness({"mongodb": HOOKS}, bind="mongodb-consistent")
    pre = await h.emit("backup.pre", wait=10, backup_id="b1")
    assert pre["allowed"] is True and mongo.lock_count == 1
    insert = await blocked_insert(client, mongo)

    post = await h.emit("backup.post", wait=10, backup_id="b1")
    run = await h.final(post["run_id"])
    await asyncio.wait_for(insert, 5)
    assert mongo.lock_count == 0
    unlock, report = run["steps"]
    assert unlock["outputs"]["unlocked"] is True and report["status"] == "succeeded"
    lease = (await h.final(pre["run_id"]))["leases"][0]
    assert lease["released_by"] == f"step:{post['run_id']}/unlock"


async def test_blueprint_with_export_exports_while_locked(
    harness: HarnessFactory,
    mongo: FakeMongo,
    client: Client,
    moto_url: str,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await client.shop.orders.insert_many(orders(120))
    monkeypatch.setenv("SNAPHOOK_SECRET_MONGO_CREDS_URI", mongo.uri)
    h = await harness(
        {"mongodb": HOOKS}, bind="mongodb-consistent-export", s3_endpoint_url=moto_url
    )
    data = {
        "backup": {"name": "nightly", "id": "b2"},
        "params": {"export_to": f"s3://{bucket}/mongo"},
    }
    pre = await h.emit("backup.pre", wait=20, data=data)
    assert pre["allowed"] is True, pre
    run = await h.final(pre["run_id"])
    export = run["steps"][1]["outputs"]
    assert export["url"] == f"s3://{bucket}/mongo/ns/app/b2/manifest.json"
    assert export["count"] == 120
    assert mongo.lock_count == 1  # still frozen: the snapshot comes now

    post = await h.emit("backup.post", wait=10, data={**data, "outcome": "succeeded"})
    await h.final(post["run_id"])
    assert mongo.lock_count == 0


async def test_import_blueprint_restores_an_export_after_a_restore(
    harness: HarnessFactory,
    call_function: FunctionCaller,
    mongo: FakeMongo,
    client: Client,
    moto_url: str,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await client.shop.orders.insert_many(orders(30))
    # Where mongodb-consistent-export puts the export of backup b3 of ns/app.
    to = f"s3://{bucket}/mongo/ns/app/b3"
    await call_function("mongodb.export", {"uri": mongo.uri, "to": to, "format": "jsonl"})
    monkeypatch.setenv("SNAPHOOK_SECRET_MONGO_CREDS_URI", mongo.uri)
    h = await harness({"mongodb": HOOKS}, bind="mongodb-import", s3_endpoint_url=moto_url)
    params = {"export_to": f"s3://{bucket}/mongo", "database": "fresh"}
    data = {"backup": {"name": "nightly", "id": "b3"}, "outcome": "succeeded", "params": params}
    run = await h.final((await h.emit("restore.post", data=data))["run_id"])
    assert [s["status"] for s in run["steps"]] == ["succeeded", "succeeded"], run
    assert await raw_documents(client, "fresh", "orders") == await raw_documents(
        client, "shop", "orders"
    )


URI = "{{ secret('mongo-creds', 'uri') }}"
LOCK_THEN_SLEEP = """
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: mongo-hold}
spec:
  actions:
    backup.pre:
      - name: lock
        function: mongodb.fsync_lock
        with: {uri: "URI"}
        lease:
          ttl: TTL
          release:
            function: mongodb.fsync_unlock
            with: {uri: "URI"}
      - {name: hold, function: sleep, needs: [lock], with: {seconds: HOLD}}
"""


def lock_then_sleep(ttl: str, hold: float) -> str:
    """A freeze whose lease expires after ``ttl``, then a step running ``hold`` seconds."""
    return LOCK_THEN_SLEEP.replace("URI", URI).replace("TTL", ttl).replace("HOLD", str(hold))


async def until(
    probe: Callable[[], Awaitable[dict[str, Any]]],
    done: Callable[[dict[str, Any]], bool],
    timeout: float = 20,
) -> dict[str, Any]:
    """Poll ``probe`` until ``done`` holds for its value; that value."""
    deadline = time.monotonic() + timeout
    while not done(value := await probe()):
        assert time.monotonic() < deadline, value
        await asyncio.sleep(0.05)
    return value


async def test_reaper_unlocks_when_the_post_event_never_comes(
    harness: HarnessFactory, mongo: FakeMongo, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SNAPHOOK_SECRET_MONGO_CREDS_URI", mongo.uri)
    # Long enough that a loaded machine still sees the lock before the reaper lifts it.
    h = await harness({"mongo-hold": lock_then_sleep("2s", 0)})
    pre = await h.emit("backup.pre", wait=10)
    assert pre["allowed"] is True and mongo.lock_count == 1
    insert = await blocked_insert(client, mongo)
    await asyncio.wait_for(insert, 10)  # the reaper unlocked at the TTL
    assert mongo.lock_count == 0

    async def lease() -> dict[str, Any]:
        run = await h.final(pre["run_id"])
        first: dict[str, Any] = run["leases"][0]
        return first

    released = await until(lease, lambda lease: lease["status"] != "releasing")
    assert (released["status"], released["released_by"]) == ("released", "reaper")


# --- the crash: SIGKILL while locked --------------------------------------------------


class Dispatcher:
    """``snaphook serve`` as a subprocess on one state directory, restartable."""

    def __init__(self, root: Path, blueprint: str, env: dict[str, str]) -> None:
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.starts = 0
        (root / "hooks").mkdir()
        (root / "hooks" / "bp.yaml").write_text(blueprint, encoding="utf-8")
        binding = {"blueprint": "mongo-hold", "match": {"namespace": "db"}}
        config = {"apiVersion": "snaphook.io/v1", "kind": "Config", "bindings": [binding]}
        (root / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPHOOK_")}
        self.env.update(env, PYTHONPATH=str(REPO), SNAPHOOK_LEASE_REAP_INTERVAL="0.2")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return (self.root / f"serve{self.starts}.log").read_text(errors="replace")[-4000:]

    def spawn(self) -> subprocess.Popen[bytes]:
        self.port, self.starts = free_port(), self.starts + 1
        argv = [
            str(SNAPHOOK),
            "serve",
            "--host=127.0.0.1",
            f"--port={self.port}",
            f"--state-dir={self.root / 'state'}",
            f"--hooks={self.root / 'hooks'}",
            f"--config={self.root / 'config.yaml'}",
        ]
        with (self.root / f"serve{self.starts}.log").open("wb") as out:
            self.proc = subprocess.Popen(
                argv, cwd=REPO, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        return self.proc

    async def start(self, http: aiohttp.ClientSession) -> None:
        proc = self.spawn()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"snaphook serve exited:\n{self.log()}"
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(f"{self.url}/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)
        pytest.fail(f"snaphook serve not ready:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as when a node dies or the OOM killer strikes."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc = None

    async def post(self, http: aiohttp.ClientSession, event: dict[str, Any]) -> str:
        headers = {"Content-Type": "application/cloudevents+json"}
        async with http.post(f"{self.url}/v1/events", json=event, headers=headers) as resp:
            assert resp.status == 202, await resp.text()
            run_id: str = (await resp.json())["run_id"]
            return run_id

    async def run(self, http: aiohttp.ClientSession, run_id: str) -> dict[str, Any]:
        async with http.get(f"{self.url}/v1/runs/{run_id}") as resp:
            assert resp.status == 200, await resp.text()
            body: dict[str, Any] = await resp.json()
            return body


@pytest.fixture
def dispatcher(tmp_path: Path, mongo: FakeMongo) -> Iterator[Dispatcher]:
    assert SNAPHOOK.exists(), f"{SNAPHOOK} not found: install the project into this venv"
    secret = {"SNAPHOOK_SECRET_MONGO_CREDS_URI": mongo.uri}
    d = Dispatcher(tmp_path, lock_then_sleep("2s", 30), secret)
    try:
        yield d
    finally:
        d.kill()


@pytest.mark.slow
async def test_lock_held_at_a_dispatcher_crash_is_released_after_restart(
    dispatcher: Dispatcher, mongo: FakeMongo, client: Client
) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
        await dispatcher.start(http)
        run_id = await dispatcher.post(http, event_json(subject="db/StatefulSet/mongo"))
        run = await until(
            lambda: dispatcher.run(http, run_id), lambda r: r["steps"][1]["status"] == "running"
        )
        [lease] = run["leases"]
        assert mongo.lock_count == 1 and lease["status"] == "open"
        insert = await blocked_insert(client, mongo)

        dispatcher.kill()
        # The lock outlives every connection of the dead dispatcher, and the lease's TTL:
        # nothing but a dispatcher will unlock the server now.
        await eventually(lambda: mongo.open_connections("snaphook") == 0, "connections to end")
        await asyncio.sleep(max(0.0, lease["expires_at"] - time.time()) + 0.3)
        assert mongo.lock_count == 1 and not insert.done()

        await dispatcher.start(http)
        run = await until(
            lambda: dispatcher.run(http, run_id),
            lambda r: r["status"] == "failed" and r["leases"][0]["status"] == "released",
        )
        await asyncio.wait_for(insert, 10)
        assert mongo.lock_count == 0 and "fsyncUnlock" in mongo.commands
        # Failed as interrupted; its lease released once, by the failed run or the reaper.
        hold = run["steps"][1]
        assert hold["status"] == "failed" and "interrupted" in hold["error"]
        assert run["leases"][0]["released_by"] in ("run-failed", "reaper")
