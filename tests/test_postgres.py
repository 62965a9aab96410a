"""PostgreSQL functions against the real server on 127.0.0.1:5432, S3 in moto.

Every test works in databases of its own (``snaphook_test_<hex>``), dropped afterwards.
PostgreSQL 15 has no SQL view of non-exclusive backups (``pg_is_in_backup`` went with
exclusive mode), so "frozen" is observed the ways PostgreSQL does show it: the session
holding the backup in ``pg_stat_activity`` (named after its lease), that session refusing
a second backup, and ``pg_backup_stop`` on it returning a backup label that covers the
freeze. A backup ends with its session, so a session gone is a backup ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml

from dispatcher.invokers.inprocess import InProcessInvoker
from dispatcher.secrets import EnvSecretResolver
from functions import postgres
from functions.sdk import (
    FunctionError,
    ObjectStore,
    PermanentError,
    RetryableError,
    default_registry,
    held_resources,
)
from functions.storage import s3_client
from tests.conftest import FunctionCaller, HarnessFactory, event_json, free_port

PG = "postgresql://postgres@127.0.0.1:5432/postgres"
PASSWORD = "Pw-7f3kq!never-shown"  # trust auth ignores it; it must never show anyway
REPO = Path(__file__).resolve().parent.parent
BLUEPRINT = (REPO / "hooks" / "postgres.yaml").read_text(encoding="utf-8")
SNAPHOOK = Path(sys.executable).with_name("snaphook")

SCHEMA = r"""
CREATE TABLE customers (
    id serial PRIMARY KEY, name text NOT NULL, email text UNIQUE,
    created timestamptz NOT NULL, vip boolean);
CREATE TABLE orders (
    id bigserial PRIMARY KEY, customer int REFERENCES customers(id), total numeric(12, 2),
    placed date, tags text[], meta jsonb);
CREATE TABLE attachments (
    id int PRIMARY KEY, order_id bigint REFERENCES orders(id), body bytea, uid uuid, note text);
CREATE SCHEMA audit;
CREATE TABLE audit.events (id int PRIMARY KEY, at timestamptz, payload jsonb, ratio float8);
CREATE VIEW order_totals AS SELECT customer, sum(total) AS total FROM orders GROUP BY customer;

INSERT INTO customers (name, email, created, vip)
SELECT 'cust ' || g || E' \\ ''quoted''\ttab ü', 'c' || g || '@example.com',
       '2024-01-01'::timestamptz + g * interval '1 hour',
       CASE WHEN g % 3 = 0 THEN NULL ELSE g % 2 = 0 END
FROM generate_series(1, 500) g;
INSERT INTO orders (customer, total, placed, tags, meta)
SELECT 1 + g % 500, (g * 1.37)::numeric(12, 2), '2024-01-01'::date + g % 365,
       ARRAY['t' || g % 7, 'x'],
       jsonb_build_object('n', g, 'nested', jsonb_build_object('ok', g % 2 = 0),
                          'list', jsonb_build_array(g, 'two', NULL))
FROM generate_series(1, 3000) g;
INSERT INTO attachments
SELECT g, g, decode(md5(g::text) || md5((g * 7)::text), 'hex') || '\x00ff'::bytea,
       md5(g::text)::uuid, CASE WHEN g % 5 = 0 THEN NULL ELSE 'n' END
FROM generate_series(1, 1000) g;
INSERT INTO audit.events
SELECT g, now(), '{"k": [1, 2.5, "x"]}'::jsonb || jsonb_build_object('g', g), g / 7.0
FROM generate_series(1, 200) g;
"""


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture
async def admin() -> AsyncIterator[Any]:
    conn = await asyncpg.connect(PG)
    yield conn
    await conn.close()


Databases = Callable[[], str]


@pytest.fixture
async def databases(admin: Any) -> AsyncIterator[Databases]:
    """Fresh database names; whatever exists under them is dropped afterwards."""
    names: list[str] = []

    def name() -> str:
        names.append(f"snaphook_test_{uuid.uuid4().hex[:16]}")
        return names[-1]

    yield name
    for db in names:
        # FORCE terminates the database's sessions first (a freeze session, psql, ...).
        await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


@pytest.fixture
async def db(admin: Any, databases: Databases) -> str:
    name = databases()
    await admin.execute(f'CREATE DATABASE "{name}"')
    return name


@pytest.fixture
async def call(object_store: ObjectStore) -> AsyncIterator[FunctionCaller]:
    """The dispatcher's in-process invoker over the functions imported so far (postgres and
    the built-ins): these tests then depend on no other family's module."""
    async with aiohttp.ClientSession() as http:
        invoker = InProcessInvoker(
            default_registry, http, EnvSecretResolver(), object_store=object_store
        )
        yield FunctionCaller(invoker)


@pytest.fixture
def lease() -> Iterator[str]:
    """A lease id; a session a failed test left held under it is cut afterwards."""
    lease_id = f"lease-{uuid.uuid4().hex[:16]}"
    yield lease_id
    held = held_resources.pop(lease_id)
    if held is not None:
        held.conn.terminate()


def dsn(database: str = "postgres", *, user: str = "postgres", port: int = 5432) -> str:
    return f"postgresql://{user}:{PASSWORD}@127.0.0.1:{port}/{database}"


async def session(admin: Any, pid: int) -> Any:
    return await admin.fetchrow(
        "SELECT datname, application_name, state, query FROM pg_stat_activity WHERE pid = $1",
        pid,
    )


async def gone(admin: Any, pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while await session(admin, pid) is not None:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


async def fill(database: str, sql: str = SCHEMA) -> None:
    conn = await asyncpg.connect(PG, database=database)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def fingerprint(database: str) -> dict[str, Any]:
    """Row count and checksum of every table."""
    conn = await asyncpg.connect(PG, database=database)
    try:
        tables = await conn.fetch(
            "SELECT format('%I.%I', schemaname, tablename) AS name FROM pg_tables"
            " WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1"
        )
        return {
            table["name"]: tuple(
                await conn.fetchrow(
                    f"SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY id), ''))"
                    f" FROM {table['name']} t"
                )
            )
            for table in tables
        }
    finally:
        await conn.close()


async def beyond_tables(database: str) -> tuple[Any, ...]:
    """What SCHEMA has besides table rows: the view's answer, the sequence's position."""
    conn = await asyncpg.connect(PG, database=database)
    try:
        return (
            await conn.fetchval("SELECT sum(total) FROM order_totals"),
            await conn.fetchval("SELECT last_value FROM orders_id_seq"),
        )
    finally:
        await conn.close()


async def object_bytes(store: ObjectStore, url: str) -> bytes:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    async with s3_client(store) as s3:
        answer = await s3.get_object(Bucket=bucket, Key=key)
        async with answer["Body"] as body:
            data: bytes = await body.read()
            return data


# --- freeze / thaw -----------------------------------------------------------------------


async def test_freeze_holds_a_backup_until_thaw_stops_it(
    call: FunctionCaller, admin: Any, db: str, lease: str
) -> None:
    frozen = await call("postgres.freeze", {"dsn": PG, "database": db}, lease_id=lease)
    pid = frozen["backend_pid"]
    row = await session(admin, pid)
    assert row is not None, "the freeze session is not in pg_stat_activity"
    assert (row["datname"], row["application_name"]) == (db, f"snaphook-freeze {lease}")
    assert row["query"].startswith("SELECT pg_backup_start")
    assert frozen["label"] == f"snaphook {lease}"
    assert frozen["server_version"].startswith("15")

    # The session really is in backup mode: PostgreSQL refuses to start a second one on it.
    held = held_resources.pop(lease)
    assert held is not None
    try:
        with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError, match="already in progress"):
            await held.conn.fetchval("SELECT pg_backup_start('again')")
    finally:
        held_resources.put(lease, held)

    thawed = await call("postgres.thaw", {"dsn": PG, "lease": lease})
    assert thawed["stopped"] is True
    assert lsn(thawed["stop_lsn"]) >= lsn(frozen["start_lsn"])
    # PostgreSQL's own record of the backup spans the freeze: our label, our start LSN.
    assert f"LABEL: snaphook {lease}\n" in thawed["labelfile"]
    assert f"START WAL LOCATION: {frozen['start_lsn']} " in thawed["labelfile"]
    assert thawed["tablespace_map"] == ""
    assert await gone(admin, pid), "thaw left the backup session open"


async def test_thaw_with_nothing_held_reports_the_backup_ended_with_its_session(
    call: FunctionCaller, lease: str
) -> None:
    thawed = await call("postgres.thaw", {"dsn": PG, "lease": lease})
    assert thawed["stopped"] is False
    assert thawed["reason"] == "session ended; PostgreSQL ended the backup with it"
    assert thawed["terminated_pids"] == []


async def test_thaw_ends_a_freeze_session_that_outlived_its_holder(
    call: FunctionCaller, admin: Any, db: str, lease: str
) -> None:
    """As after a dispatcher restart whose old connection the server still believes in
    (its host died, a partition hides the close): nothing is held, the session is open."""
    frozen = await call("postgres.freeze", {"dsn": PG, "database": db}, lease_id=lease)
    orphan = held_resources.pop(lease)  # the new process knows nothing of it
    assert orphan is not None
    try:
        thawed = await call("postgres.thaw", {"dsn": PG, "lease": lease})
        assert thawed["stopped"] is False
        assert thawed["terminated_pids"] == [frozen["backend_pid"]]
        assert await gone(admin, frozen["backend_pid"])
        with pytest.raises((asyncpg.PostgresConnectionError, asyncpg.InterfaceError)):
            await orphan.conn.fetchval("SELECT 1")
    finally:
        orphan.conn.terminate()


async def test_a_retried_freeze_replaces_the_earlier_attempts_session(
    call: FunctionCaller, admin: Any, db: str, lease: str
) -> None:
    first = await call("postgres.freeze", {"dsn": PG, "database": db}, lease_id=lease)
    second = await call("postgres.freeze", {"dsn": PG, "database": db}, lease_id=lease)
    assert first["backend_pid"] != second["backend_pid"]
    assert await gone(admin, first["backend_pid"])
    thawed = await call("postgres.thaw", {"dsn": PG, "lease": lease})
    assert thawed["stopped"] is True and thawed["start_lsn"] == second["start_lsn"]


async def test_freeze_without_a_lease_starts_nothing(call: FunctionCaller) -> None:
    with pytest.raises(PermanentError, match="needs a lease"):
        await call("postgres.freeze", {"dsn": PG})


@pytest.mark.slow
async def test_killing_the_dispatcher_ends_the_backup(tmp_path: Path, admin: Any, db: str) -> None:
    """``snaphook serve`` with the shipped blueprint freezes, then gets SIGKILL: no thaw
    runs, yet the session is gone, and with it the backup."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    shutil.copy(REPO / "hooks" / "postgres.yaml", hooks)
    binding = {"blueprint": "postgres-consistent", "match": {"namespace": "db"}}
    binding["params"] = {"database": db, "dump": False}
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump({"apiVersion": "snaphook.io/v1", "kind": "Config", "bindings": [binding]}),
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPHOOK_")}
    env["SNAPHOOK_SECRET_PG_CREDS_DSN"] = PG
    port = free_port()
    with (tmp_path / "serve.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            str(SNAPHOOK),
            "serve",
            "--host=127.0.0.1",
            f"--port={port}",
            f"--state-dir={tmp_path / 'state'}",
            f"--hooks={hooks}",
            f"--config={config}",
            env=env,
            cwd=REPO,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            await until_ready(http, url, proc)
            event = event_json("backup.pre", subject="db/StatefulSet/pg")
            headers = {"Content-Type": "application/cloudevents+json"}
            async with http.post(f"{url}/v1/events?wait=20", json=event, headers=headers) as resp:
                decision = await resp.json()
            assert decision["allowed"] is True, decision
            async with http.get(f"{url}/v1/runs/{decision['run_id']}") as resp:
                run = await resp.json()
        freeze = next(s for s in run["steps"] if s["name"] == "freeze")
        pid = freeze["outputs"]["backend_pid"]
        assert await session(admin, pid) is not None, "not frozen before the kill"

        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        assert await gone(admin, pid), "the backup session survived the dispatcher"
        [lease] = run["leases"]
        left = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            f"snaphook-freeze {lease['lease_id']}",
        )
        assert left == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def until_ready(http: aiohttp.ClientSession, url: str, proc: Any) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.returncode is None, "snaphook serve exited; see serve.log"
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with http.get(f"{url}/readyz") as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.05)
    pytest.fail("snaphook serve did not become ready")


# --- dump / restore ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["custom", "plain"])
async def test_dump_then_restore_into_a_new_database_is_identical(
    call: FunctionCaller,
    object_store: ObjectStore,
    bucket: str,
    databases: Databases,
    db: str,
    fmt: str,
) -> None:
    await fill(db)
    url = f"s3://{bucket}/pg/{db}.{fmt}"
    dumped = await call("postgres.dump", {"dsn": PG, "database": db, "to": url, "format": fmt})
    data = await object_bytes(object_store, url)
    assert dumped["dumped"] is True and dumped["url"] == url and dumped["format"] == fmt
    assert (dumped["bytes"], dumped["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert dumped["database"] == db and dumped["server_version"].startswith("15")
    assert data[:5] == b"PGDMP" if fmt == "custom" else data[:2] == b"\x1f\x8b"

    copy = databases()
    restored = await call(
        "postgres.restore", {"dsn": PG, "database": copy, "from": url, "create": True}
    )
    assert restored["restored"] is True and restored["created"] is True
    assert (restored["format"], restored["sha256"]) == (fmt, dumped["sha256"])
    original, again = await fingerprint(db), await fingerprint(copy)
    assert set(original) == {
        "audit.events",
        "public.attachments",
        "public.customers",
        "public.orders",
    }
    assert original["public.orders"][0] == 3000
    assert again == original
    assert await beyond_tables(copy) == await beyond_tables(db)


async def test_restore_refuses_an_existing_database_unless_clean(
    call: FunctionCaller, bucket: str, databases: Databases, db: str, admin: Any
) -> None:
    await fill(
        db,
        "CREATE TABLE t (id int PRIMARY KEY, v text);"
        "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 50) g;",
    )
    url = f"s3://{bucket}/small.dump"
    await call("postgres.dump", {"dsn": PG, "database": db, "to": url})
    existing = databases()
    await admin.execute(f'CREATE DATABASE "{existing}"')
    await fill(existing, "CREATE TABLE junk (id int);")
    params = {"dsn": PG, "database": existing, "from": url, "create": True}

    with pytest.raises(PermanentError, match=f"'{existing}' already exists.*clean: true"):
        await call("postgres.restore", params)
    assert list(await fingerprint(existing)) == ["public.junk"]  # untouched

    await call("postgres.restore", {**params, "clean": True})
    assert await fingerprint(existing) == await fingerprint(db)  # t, and no junk


async def test_restore_of_something_else_fails_and_leaves_no_database(
    call: FunctionCaller,
    object_store: ObjectStore,
    bucket: str,
    databases: Databases,
    admin: Any,
) -> None:
    async with s3_client(object_store) as s3:
        await s3.put_object(Bucket=bucket, Key="notes.txt", Body=b"just some text\n")
    target = databases()
    params = {"dsn": PG, "database": target, "from": f"s3://{bucket}/notes.txt", "create": True}
    with pytest.raises(PermanentError, match="neither a pg_dump custom archive nor gzip"):
        await call("postgres.restore", params)
    assert await admin.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", target) == 0


# 6.4 MB of random bytea, which pg_dump writes as ~13 MB of hex.
BLOBS = (
    "CREATE TABLE blobs (id int PRIMARY KEY, body bytea);"
    "ALTER TABLE blobs ALTER body SET STORAGE EXTERNAL;"
    "INSERT INTO blobs SELECT g, decode(string_agg(md5(random()::text || i), ''), 'hex')"
    " FROM generate_series(1, 100) g, generate_series(1, 4096) i GROUP BY g;"
)


async def test_large_dump_is_a_real_multipart_upload_and_ps_never_shows_the_password(
    call: FunctionCaller, object_store: ObjectStore, bucket: str, db: str
) -> None:
    await fill(db, BLOBS)  # ~13 MB dumped: parts of 5 MiB
    url = f"s3://{bucket}/big.dump"
    params = {"dsn": dsn(db), "to": url, "part_size_mb": 5, "compression": 0}
    watcher = asyncio.create_task(watch_children("pg_dump"))
    try:
        dumped = await call("postgres.dump", params)
    finally:
        watcher.cancel()
        snapshots = await watcher
    parts = dumped["parts"]
    assert parts >= 3 and parts == -(-dumped["bytes"] // (5 * 1024 * 1024))
    bucket_name, _, key = url.removeprefix("s3://").partition("/")
    async with s3_client(object_store) as s3:
        head = await s3.head_object(Bucket=bucket_name, Key=key)
    assert head["ETag"].strip('"').endswith(f"-{parts}")  # S3's mark of a multipart object
    data = await object_bytes(object_store, url)
    assert hashlib.sha256(data).hexdigest() == dumped["sha256"]

    assert any(b"--format=custom" in cmdline for cmdline, _ in snapshots), "pg_dump not seen"
    for cmdline, environ in snapshots:
        assert PASSWORD.encode() not in cmdline
        assert b"PGPASSWORD=" + PASSWORD.encode() in environ.split(b"\0")


async def watch_children(program: str) -> list[tuple[bytes, bytes]]:
    """(cmdline, environ) of every child of this process running ``program``, as ``ps``
    (and anyone on the machine) sees them, until cancelled. Debian's /usr/bin/pg_dump is a
    perl wrapper that execs the real one: both command lines are collected."""
    seen: set[tuple[bytes, bytes]] = set()
    try:
        while True:
            for entry in filter(str.isdigit, os.listdir("/proc")):
                with contextlib.suppress(OSError, IndexError):
                    proc = Path("/proc", entry)
                    parent = (proc / "stat").read_text().rsplit(")", 1)[1].split()[1]
                    cmdline = (proc / "cmdline").read_bytes()
                    if int(parent) == os.getpid() and program.encode() in cmdline:
                        seen.add((cmdline, (proc / "environ").read_bytes()))
            await asyncio.sleep(0.002)
    except asyncio.CancelledError:
        return sorted(seen)


async def cut_database(admin: Any, db: str, object_store: ObjectStore, bucket: str) -> bool:
    """End pg_dump's session while it copies the table out."""
    cut = await admin.fetchval(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = $1 AND application_name = 'pg_dump' AND query LIKE 'COPY%'",
        db,
    )
    return bool(cut)


async def cut_bucket(admin: Any, db: str, object_store: ObjectStore, bucket: str) -> bool:
    """Delete the bucket once the multipart upload into it has begun."""
    async with s3_client(object_store) as s3:
        if not (await s3.list_multipart_uploads(Bucket=bucket)).get("Uploads"):
            return False
        await s3.delete_bucket(Bucket=bucket)
        return True


@pytest.mark.parametrize(
    ("cut", "error"),
    [(cut_database, "pg_dump exited with 1"), (cut_bucket, "upload s3://.*NoSuchBucket")],
)
async def test_a_dump_cut_off_midway_fails_and_leaves_nothing_behind(
    call: FunctionCaller,
    object_store: ObjectStore,
    db: str,
    admin: Any,
    cut: Callable[..., Any],
    error: str,
) -> None:
    await fill(db, BLOBS)
    bucket = f"test-cut-{uuid.uuid4().hex[:12]}"
    async with s3_client(object_store) as s3:
        await s3.create_bucket(Bucket=bucket)
    params = {"dsn": PG, "database": db, "to": f"s3://{bucket}/cut.dump", "part_size_mb": 5}
    dumping = asyncio.create_task(call("postgres.dump", {**params, "compression": 0}))
    for _ in range(2000):
        if dumping.done() or await cut(admin, db, object_store, bucket):
            break
        await asyncio.sleep(0.005)
    assert not dumping.done(), "the dump ended before it could be cut"
    # Stopping early must neither hang nor leave pg_dump running.
    with pytest.raises(FunctionError, match=error):
        await asyncio.wait_for(dumping, 30)
    assert running_children("pg_dump") == []
    if cut is cut_database:  # the bucket is still there, without a partial dump in it
        async with s3_client(object_store) as s3:
            assert (await s3.list_multipart_uploads(Bucket=bucket)).get("Uploads", []) == []
            assert (await s3.list_objects_v2(Bucket=bucket)).get("KeyCount", 0) == 0
            await s3.delete_bucket(Bucket=bucket)


def running_children(program: str) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, IndexError):
            proc = Path("/proc", entry)
            state, parent = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            running = state != "Z" and int(parent) == os.getpid()
            if running and program.encode() in (proc / "cmdline").read_bytes():
                found.append(int(entry))
    return found


async def test_a_dump_of_no_matching_schema_fails_for_good(
    call: FunctionCaller, object_store: ObjectStore, bucket: str, db: str
) -> None:
    params = {"dsn": PG, "database": db, "to": f"s3://{bucket}/x.dump", "schemas": ["nosuch"]}
    with pytest.raises(PermanentError, match="no matching schemas"):
        await call("postgres.dump", params)
    async with s3_client(object_store) as s3:
        assert (await s3.list_objects_v2(Bucket=bucket)).get("KeyCount", 0) == 0


@pytest.mark.parametrize(
    ("function", "user", "database", "expected"),
    [
        ("postgres.dump", "nobody_here", "postgres", "login to database 'postgres'"),
        ("postgres.dump", "postgres", "no_such_db_x1", "database 'no_such_db_x1' does not exist"),
        ("postgres.freeze", "nobody_here", "postgres", "login to database 'postgres'"),
        ("postgres.restore", "postgres", "no_such_db_x2", "database 'no_such_db_x2' does not"),
    ],
)
async def test_login_errors_are_permanent_and_name_the_database_not_the_password(
    call: FunctionCaller,
    bucket: str,
    lease: str,
    function: str,
    user: str,
    database: str,
    expected: str,
) -> None:
    params: dict[str, Any] = {"dsn": dsn(database, user=user)}
    if function == "postgres.dump":
        params["to"] = f"s3://{bucket}/x.dump"
    if function == "postgres.restore":
        params.update({"database": database, "from": f"s3://{bucket}/x.dump"})
    with pytest.raises(PermanentError) as caught:
        await call(function, params, lease_id=lease)
    message = str(caught.value)
    assert expected in message
    assert PASSWORD not in message and "Pw-7f3kq" not in message


async def test_refused_connection_is_retryable(call: FunctionCaller, bucket: str) -> None:
    params = {"dsn": dsn(port=free_port()), "to": f"s3://{bucket}/x.dump"}
    with pytest.raises(RetryableError) as caught:
        await call("postgres.dump", params)
    assert "cannot connect" in str(caught.value) and PASSWORD not in str(caught.value)


async def test_a_disabled_dump_uploads_nothing(
    call: FunctionCaller, object_store: ObjectStore, bucket: str
) -> None:
    params = {"dsn": PG, "to": f"s3://{bucket}/x.dump", "enabled": "False"}
    assert (await call("postgres.dump", params))["dumped"] is False
    async with s3_client(object_store) as s3:
        assert (await s3.list_objects_v2(Bucket=bucket)).get("KeyCount", 0) == 0


@pytest.mark.parametrize(
    ("url", "env"),
    [
        (
            "postgresql://app:p%40ss%2Fw@db1:5433,[::1]/orders?sslmode=require",
            {
                "PGHOST": "db1,::1",
                "PGPORT": "5433,5432",
                "PGUSER": "app",
                "PGPASSWORD": "p@ss/w",
                "PGDATABASE": "orders",
                "PGSSLMODE": "require",
            },
        ),
        (
            "postgres:///app?host=/var/run/postgresql&application_name=bk",
            {"PGHOST": "/var/run/postgresql", "PGDATABASE": "app", "PGAPPNAME": "bk"},
        ),
    ],
)
def test_client_programs_get_the_dsn_as_libpq_environment(url: str, env: dict[str, str]) -> None:
    from pydantic import SecretStr

    assert postgres.Server.parse(SecretStr(url)).env == env


@pytest.mark.parametrize(("database_gib", "part_mib"), [(0.2, 5), (40, 6), (1000, 128)])
def test_parts_grow_so_a_big_database_fits_in_s3s_10000_parts(
    database_gib: float, part_mib: int
) -> None:
    part = postgres._part_size(5 * 1024 * 1024, int(database_gib * 2**30))
    assert part == part_mib * 1024 * 1024
    assert part * 10_000 >= database_gib * 2**30


def test_a_dsn_with_unknown_options_is_refused_without_echoing_it() -> None:
    from pydantic import SecretStr

    with pytest.raises(PermanentError, match="unsupported parameter 'sslmodee'") as caught:
        postgres.Server.parse(SecretStr(f"postgresql://u:{PASSWORD}@h/db?sslmodee=require"))
    assert PASSWORD not in str(caught.value)


# --- end to end: the shipped blueprint through the dispatcher -------------------------------


async def test_blueprint_freezes_on_pre_thaws_on_post_and_restores_the_dump(
    harness: HarnessFactory,
    moto_url: str,
    bucket: str,
    databases: Databases,
    db: str,
    admin: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SNAPHOOK_SECRET_PG_CREDS_DSN", PG)
    await fill(db)
    bindings = [
        {
            "blueprint": "postgres-consistent",
            "match": {"namespace": "ns"},
            "params": {"database": db, "bucket": bucket},
        }
    ]
    h = await harness({"postgres": BLUEPRINT}, bindings=bindings, s3_endpoint_url=moto_url)
    backup = {"name": "nightly", "id": f"b-{uuid.uuid4().hex[:8]}"}

    pre = await h.emit("backup.pre", wait=30, data={"backup": backup})
    assert pre["allowed"] is True, pre
    run = await h.final(pre["run_id"])
    steps = {s["name"]: s for s in run["steps"]}
    pid = steps["freeze"]["outputs"]["backend_pid"]
    assert (await session(admin, pid))["application_name"].startswith("snaphook-freeze")
    assert steps["dump"]["outputs"]["url"].endswith(f"/ns/app/{backup['id']}.dump")

    post = await h.emit("backup.post", wait=30, data={"backup": backup, "outcome": "succeeded"})
    assert post["allowed"] is True, post
    run = await h.final(post["run_id"])
    steps = {s["name"]: s for s in run["steps"]}
    assert steps["thaw"]["outputs"]["stopped"] is True
    assert "START WAL LOCATION" in steps["thaw"]["outputs"]["labelfile"]
    assert steps["report"]["status"] == "succeeded"
    assert await gone(admin, pid)

    copy = databases()
    data = {
        "backup": backup,
        "outcome": "succeeded",
        "params": {"database": copy, "restore_dump": True},
    }
    restore = await h.emit("restore.post", data=data)
    run = await h.final(restore["run_id"], timeout=60)
    steps = {s["name"]: s for s in run["steps"]}
    assert steps["restore"]["status"] == "succeeded", steps["restore"]
    assert await fingerprint(copy) == await fingerprint(db)
