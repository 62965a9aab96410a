"""mysql.* against the real MariaDB on 127.0.0.1:3306 and moto's S3, each test in its own
database. What is checked is what a user would see: writes stall during a freeze and go
through after the thaw; a dump restores into an identical database."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomysql
import pytest

from functions.mysql import SESSION_ENDED
from functions.sdk import ObjectStore, PermanentError, RetryableError, held_resources
from functions.storage import s3_client
from tests.conftest import FunctionCaller

HOST = os.environ.get("SNAPHOOK_TEST_MYSQL_HOST", "127.0.0.1")
PORT = int(os.environ.get("SNAPHOOK_TEST_MYSQL_PORT", "3306"))
USER = os.environ.get("SNAPHOOK_TEST_MYSQL_USER", "root")
PASSWORD = os.environ.get("SNAPHOOK_TEST_MYSQL_PASSWORD", "")
SERVER: dict[str, Any] = {"host": HOST, "port": PORT, "user": USER, "password": PASSWORD}


# --- helpers, also used by test_mysql_e2e.py ----------------------------------------------


@contextlib.asynccontextmanager
async def connect(database: str | None = None) -> AsyncIterator[Any]:
    conn = await aiomysql.connect(
        host=HOST,
        port=PORT,
        user=USER,
        password=PASSWORD,
        db=database,
        autocommit=True,
        charset="utf8mb4",
    )
    try:
        yield conn
    finally:
        conn.close()


async def sql(conn: Any, statement: str, args: Any = None) -> list[tuple[Any, ...]]:
    async with conn.cursor() as cursor:
        await cursor.execute(statement, args)
        return list(await cursor.fetchall())


@dataclass
class Databases:
    """Scratch databases (``snaphook_t_<hex>``), all dropped when the test ends."""

    names: list[str] = field(default_factory=list)

    def name(self) -> str:
        """A name to create later (e.g. by mysql.restore); dropped all the same."""
        self.names.append(f"snaphook_t_{uuid.uuid4().hex[:12]}")
        return self.names[-1]

    async def create(self, *statements: str) -> str:
        name = self.name()
        async with connect() as conn:
            await sql(conn, f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        async with connect(name) as conn:
            for statement in statements:
                await sql(conn, statement)
        return name

    async def drop_all(self) -> None:
        async with connect() as conn:
            # Not IF EXISTS: its note would become a Python warning, hence an error here.
            for name in self.names:
                if await sql(conn, "SHOW DATABASES LIKE %s", (name,)):
                    await sql(conn, f"DROP DATABASE `{name}`")


@contextlib.asynccontextmanager
async def freezes_one_at_a_time() -> AsyncIterator[None]:
    """FTWRL is server-wide: a test that freezes waits for any other test (in any xdist
    worker) that does, so no test sees another's lock. Others merely stall for a moment."""
    async with connect() as conn:
        [(got,)] = await sql(conn, "SELECT GET_LOCK('snaphook-tests:freeze', 120)")
        assert got == 1
        yield


@dataclass
class PendingWrite:
    task: asyncio.Task[Any]
    connection_id: int


@contextlib.asynccontextmanager
async def pending_insert(database: str) -> AsyncIterator[PendingWrite]:
    """An INSERT into ``orders`` started on its own connection, not awaited."""
    async with connect(database) as conn:
        insert = sql(conn, "INSERT INTO orders (item, qty) VALUES ('during the freeze', 1)")
        task = asyncio.create_task(insert)
        try:
            yield PendingWrite(task, conn.thread_id())
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomysql.MySQLError):
                await task


async def assert_blocked(write: PendingWrite) -> None:
    """Not done after half a second, and the server shows it waiting for the lock."""
    done, _ = await asyncio.wait({write.task}, timeout=0.5)
    assert not done, "the INSERT went through during the freeze"
    async with connect() as conn:
        rows = await sql(
            conn,
            "SELECT state, info FROM information_schema.processlist WHERE id = %s",
            (write.connection_id,),
        )
    [(state, info)] = rows
    # MariaDB: "Waiting for backup lock"; MySQL: "Waiting for global read lock".
    assert "lock" in state.lower() and info.startswith("INSERT"), (state, info)


async def assert_completes(write: PendingWrite) -> None:
    await asyncio.wait_for(write.task, 10)


async def count_rows(database: str, table: str = "orders") -> int:
    async with connect(database) as conn:
        [(count,)] = await sql(conn, f"SELECT COUNT(*) FROM `{table}`")
        return int(count)


ORDERS = "CREATE TABLE orders (id INT AUTO_INCREMENT PRIMARY KEY, item VARCHAR(60), qty INT)"


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture
async def databases() -> AsyncIterator[Databases]:
    made = Databases()
    yield made
    await made.drop_all()


@pytest.fixture
async def db(databases: Databases) -> str:
    return await databases.create(ORDERS)


@dataclass
class Leases:
    ids: list[str] = field(default_factory=list)

    def new(self) -> str:
        self.ids.append(f"lease-{uuid.uuid4().hex[:16]}")
        return self.ids[-1]


@pytest.fixture
async def leases(db: str, call_function: FunctionCaller) -> AsyncIterator[Leases]:
    """Lease ids for freezes; whatever a failed test left frozen is thawed afterwards."""
    async with freezes_one_at_a_time():
        book = Leases()
        yield book
        for lease in book.ids:
            await call_function("mysql.thaw", {"lease": lease})


# --- freeze / thaw ------------------------------------------------------------------------


async def test_freeze_blocks_writes_until_thaw(
    call_function: FunctionCaller, db: str, leases: Leases
) -> None:
    lease = leases.new()
    frozen = await call_function("mysql.freeze", SERVER, lease_id=lease)
    async with connect() as conn:
        [(log_bin,)] = await sql(conn, "SELECT @@log_bin")
        [(version,)] = await sql(conn, "SELECT VERSION()")
    assert frozen["server_version"] == version
    if log_bin:
        assert frozen["binlog"]["file"] and frozen["binlog"]["position"] > 0
    else:
        assert frozen["binlog"] is None  # binary logging off: no position to report

    async with pending_insert(db) as write:
        await assert_blocked(write)
        thawed = await call_function("mysql.thaw", {"lease": lease})
        assert thawed["unlocked"] is True
        assert thawed["connection_id"] == frozen["connection_id"]
        await assert_completes(write)
    assert await count_rows(db) == 1

    # Thawing again is harmless, also when told where the server is.
    again = await call_function("mysql.thaw", {"lease": lease, **SERVER})
    assert again == {**again, "unlocked": False, "reason": SESSION_ENDED}
    async with connect() as conn:
        ids = await sql(conn, "SELECT id FROM information_schema.processlist")
    assert (frozen["connection_id"],) not in ids


async def test_thaw_of_a_lease_that_never_froze_is_success(call_function: FunctionCaller) -> None:
    for params in ({"lease": "lease-never-frozen"}, {"lease": "lease-never-frozen", **SERVER}):
        thawed = await call_function("mysql.thaw", params)
        assert (thawed["unlocked"], thawed["reason"]) == (False, SESSION_ENDED)


async def test_thaw_elsewhere_finds_and_ends_the_frozen_session(
    call_function: FunctionCaller, db: str, leases: Leases
) -> None:
    lease = leases.new()
    frozen = await call_function("mysql.freeze", SERVER, lease_id=lease)
    # Another replica (or a restarted dispatcher) does not hold the connection.
    elsewhere = held_resources.pop(lease)
    assert elsewhere is not None
    try:
        async with pending_insert(db) as write:
            await assert_blocked(write)
            thawed = await call_function("mysql.thaw", {"lease": lease, **SERVER})
            assert thawed["unlocked"] is True
            assert thawed["connection_id"] == frozen["connection_id"]
            await assert_completes(write)
    finally:
        elsewhere.session.conn.close()


async def test_server_ends_a_forgotten_freeze_after_session_timeout(
    call_function: FunctionCaller, db: str, leases: Leases
) -> None:
    lease = leases.new()
    await call_function("mysql.freeze", {**SERVER, "session_timeout": 1}, lease_id=lease)
    async with pending_insert(db) as write:
        await assert_blocked(write)
        # Nobody thaws: the server drops the idle session after a second, and the lock.
        await assert_completes(write)
    thawed = await call_function("mysql.thaw", {"lease": lease})
    assert thawed["unlocked"] is False
    assert "session ended before the thaw" in thawed["reason"]


@pytest.mark.parametrize("gives_up_by", ["lock_wait_timeout", "step timeout"])
async def test_freeze_behind_a_long_write_gives_up_and_leaves_nothing_locked(
    gives_up_by: str,
    call_function: FunctionCaller,
    db: str,
    databases: Databases,
    leases: Leases,
) -> None:
    other = await databases.create(ORDERS)
    async with connect(other) as slow, connect() as admin:
        await sql(slow, "INSERT INTO orders (item, qty) VALUES ('slow', 1)")
        update = asyncio.create_task(sql(slow, "UPDATE orders SET qty = qty + SLEEP(30)"))
        await wait_until(admin, PROCESSLIST + "id = %s AND state = 'User sleep'", slow.thread_id())
        lease = leases.new()
        if gives_up_by == "lock_wait_timeout":
            params = {**SERVER, "lock_wait_timeout": 1}
            with pytest.raises(RetryableError, match="Lock wait timeout"):
                await call_function("mysql.freeze", params, lease_id=lease)
        else:
            # The runner cancels a step at its timeout; cancel while FTWRL is waiting.
            freezing = asyncio.create_task(call_function("mysql.freeze", SERVER, lease_id=lease))
            await wait_until(admin, PROCESSLIST + "info = %s", FTWRL)
            freezing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await freezing
        # The long UPDATE still runs, yet writes elsewhere go through at once: no FTWRL
        # is left waiting (a waiting FTWRL already blocks them) or granted.
        assert not update.done()
        async with connect(db) as writer:
            await asyncio.wait_for(sql(writer, "INSERT INTO orders (item) VALUES ('x')"), 5)
        statements = await sql(admin, "SELECT info FROM information_schema.processlist")
        assert (FTWRL,) not in statements
        await sql(admin, "KILL QUERY %s", (slow.thread_id(),))
        with contextlib.suppress(aiomysql.MySQLError):
            await update
    thawed = await call_function("mysql.thaw", {"lease": lease})
    assert thawed["unlocked"] is False


FTWRL = "FLUSH TABLES WITH READ LOCK"
PROCESSLIST = "SELECT id FROM information_schema.processlist WHERE "


async def wait_until(admin: Any, query: str, args: Any) -> None:
    """Poll until ``query`` finds a row (bounded: 5 s)."""
    for _ in range(250):
        if await sql(admin, query, args):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"nothing matched {query} {args}")


async def test_freeze_without_a_lease_is_refused(call_function: FunctionCaller) -> None:
    with pytest.raises(PermanentError, match="needs a lease"):
        await call_function("mysql.freeze", SERVER)


async def test_bad_password_is_refused_without_showing_it(
    call_function: FunctionCaller, db: str, bucket: str
) -> None:
    wrong = {**SERVER, "password": "Wr0ng-pa55word"}
    with pytest.raises(PermanentError, match="Access denied") as refused:
        await call_function("mysql.freeze", wrong, lease_id="lease-bad-password")
    assert "Wr0ng-pa55word" not in str(refused.value)
    dump = {**wrong, "database": db, "to": f"s3://{bucket}/bad.sql.gz"}
    with pytest.raises(PermanentError, match="Access denied") as refused:
        await call_function("mysql.dump", dump)
    assert "Wr0ng-pa55word" not in str(refused.value)
    # Nothing was held for the failed freeze.
    assert held_resources.pop("lease-bad-password") is None


# --- dump / restore -----------------------------------------------------------------------

SHOP = [
    """CREATE TABLE people (
        id INT AUTO_INCREMENT PRIMARY KEY,
        name VARCHAR(100) CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci NOT NULL,
        profile JSON, born DATE, balance DECIMAL(12, 2))""",
    """CREATE TABLE files (
        id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(100), body BLOB, digest BINARY(32))""",
    """CREATE TABLE audit (
        id INT AUTO_INCREMENT PRIMARY KEY, person INT, at DATETIME(6), note TEXT)""",
    """CREATE TRIGGER people_audit AFTER INSERT ON people FOR EACH ROW
        INSERT INTO audit (person, at, note) VALUES (NEW.id, NOW(6), CONCAT('new ', NEW.name))""",
    "CREATE PROCEDURE count_people(OUT n INT) SELECT COUNT(*) INTO n FROM people",
]
NAMES = ["Zoë 🦄", "李雷", "O'Brien \\ back", 'say "hi"', "tab\there", "Ærøskøbing"]


async def fill_shop(database: str) -> None:
    people = [
        (
            f"{NAMES[i % len(NAMES)]} {i}",
            None if i % 7 == 0 else f'{{"n": {i}, "tags": ["ü", "🦄"]}}',
            None if i % 5 == 0 else f"19{50 + i % 50}-0{1 + i % 9}-1{i % 9}",
            f"{i * 3.25:.2f}",
        )
        for i in range(200)
    ]
    blobs = [os.urandom(4096) + b"\x00'\\\"\n" for _ in range(20)]
    async with connect(database) as conn, conn.cursor() as cursor:
        await cursor.executemany(
            "INSERT INTO people (name, profile, born, balance) VALUES (%s, %s, %s, %s)", people
        )
        await cursor.executemany(
            # Binary values go as hex: aiomysql 0.3.2 cannot escape bytes with PyMySQL 1.2.
            "INSERT INTO files (name, body, digest) VALUES (%s, UNHEX(%s), UNHEX(%s))",
            [(f"f{i}", b.hex(), hashlib.sha256(b).hexdigest()) for i, b in enumerate(blobs)],
        )


async def fingerprint(database: str) -> dict[str, tuple[int, int]]:
    """Row count and CHECKSUM TABLE of every table."""
    async with connect(database) as conn:
        tables = [
            row[0] for row in await sql(conn, "SHOW FULL TABLES WHERE Table_type = 'BASE TABLE'")
        ]
        sums = dict(await sql(conn, "CHECKSUM TABLE " + ", ".join(f"`{t}`" for t in tables)))
        counts = {t: (await sql(conn, f"SELECT COUNT(*) FROM `{t}`"))[0][0] for t in tables}
    return {t: (counts[t], sums[f"{database}.{t}"]) for t in tables}


async def stored_object(store: ObjectStore, url: str) -> tuple[str, bytes]:
    """(ETag, body) of an s3:// URL."""
    bucket, key = url.removeprefix("s3://").split("/", 1)
    async with s3_client(store) as s3:
        answer = await s3.get_object(Bucket=bucket, Key=key)
        async with answer["Body"] as body:
            return answer["ETag"].strip('"'), await body.read()


async def test_dump_and_restore_into_a_new_database_are_identical(
    call_function: FunctionCaller, databases: Databases, bucket: str, object_store: ObjectStore
) -> None:
    source = await databases.create(*SHOP)
    await fill_shop(source)
    url = f"s3://{bucket}/shop.sql.gz"
    dumped = await call_function("mysql.dump", {**SERVER, "database": source, "to": url})
    _, body = await stored_object(object_store, url)
    assert (dumped["bytes"], dumped["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())

    target = databases.name()
    params = {**SERVER, "from": url, "database": target, "create": True}
    restored = await call_function("mysql.restore", params)
    assert restored == {**restored, "created": True, "sha256": dumped["sha256"]}
    before, after = await fingerprint(source), await fingerprint(target)
    assert set(before) == {"people", "files", "audit"}
    assert after == before
    # Routines and triggers came along, and work in the copy.
    async with connect(target) as conn:
        await sql(conn, "INSERT INTO people (name) VALUES ('after the restore')")
        await sql(conn, "CALL count_people(@n)")
        assert await sql(conn, "SELECT @n") == [(201,)]
    assert await count_rows(target, "audit") == before["audit"][0] + 1

    # Restoring again into the same database overwrites rather than duplicates.
    again = await call_function("mysql.restore", params)
    assert again["created"] is False
    assert await fingerprint(target) == before


async def test_large_dump_is_a_multipart_upload(
    call_function: FunctionCaller, databases: Databases, bucket: str, object_store: ObjectStore
) -> None:
    source = await databases.create("CREATE TABLE blobs (id INT PRIMARY KEY, body LONGBLOB)")
    async with connect(source) as conn, conn.cursor() as cursor:
        # Random bytes do not compress: 6 MiB of them make a dump above one 5 MiB part.
        rows = [(i, os.urandom(256 * 1024).hex()) for i in range(24)]
        await cursor.executemany("INSERT INTO blobs VALUES (%s, UNHEX(%s))", rows)
    url = f"s3://{bucket}/big.sql.gz"
    params = {**SERVER, "database": source, "to": url, "part_size_mib": 5, "compression_level": 1}
    dumped = await call_function("mysql.dump", params)
    assert dumped["parts"] == 2 and dumped["bytes"] > 5 * 1024 * 1024
    etag, body = await stored_object(object_store, url)
    assert etag.endswith("-2")  # S3's mark of a multipart object
    assert hashlib.sha256(body).hexdigest() == dumped["sha256"]


async def test_restore_of_a_missing_database_without_create_fails_permanently(
    call_function: FunctionCaller, db: str, databases: Databases, bucket: str
) -> None:
    url = f"s3://{bucket}/orders.sql.gz"
    await call_function("mysql.dump", {**SERVER, "database": db, "to": url})
    params = {**SERVER, "from": url, "database": databases.name()}
    with pytest.raises(PermanentError, match="Unknown database"):
        await call_function("mysql.restore", params)


WRAPPER = """#!/bin/sh
# Records how it was started, then runs the real client.
printf '%s\\n' "$@" > "{out}/argv"
stat -c %a "${{1#--defaults-extra-file=}}" > "{out}/mode"
exec {real} "$@"
"""


async def test_the_client_gets_credentials_in_a_private_file_only(
    call_function: FunctionCaller,
    db: str,
    bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shutil

    real = shutil.which("mariadb-dump")
    assert real is not None
    wrapper = tmp_path / "bin" / "mariadb-dump"
    wrapper.parent.mkdir()
    wrapper.write_text(WRAPPER.format(out=tmp_path, real=real))
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    user, password = f"snaphook_t_{uuid.uuid4().hex[:8]}", "p\"a\\ss #w;rd'x "
    account = f"'{user}'@'%'"
    async with connect() as conn:
        await sql(conn, f"CREATE USER {account} IDENTIFIED BY {conn.escape(password)}")
        try:
            await sql(conn, f"GRANT ALL ON `{db}`.* TO {account}")
            params = {**SERVER, "user": user, "password": password, "database": db}
            dumped = await call_function("mysql.dump", {**params, "to": f"s3://{bucket}/o.gz"})
        finally:
            await sql(conn, f"DROP USER {account}")
    assert dumped["bytes"] > 0  # the client logged in with that awkward password
    argv, mode, left_behind = what_the_client_saw(tmp_path)
    assert password not in argv and user not in argv
    assert mode == "600"
    assert not left_behind  # the options file is removed once the dump is done


def what_the_client_saw(out: Path) -> tuple[str, str, bool]:
    """The wrapper's argv, the mode of its options file, and whether that file remains."""
    argv = (out / "argv").read_text()
    options = Path(argv.splitlines()[0].removeprefix("--defaults-extra-file="))
    return argv, (out / "mode").read_text().strip(), options.exists()
