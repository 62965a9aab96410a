"""MySQL and MariaDB: a freeze for volume snapshots, and logical dumps streamed to S3.

    mysql.freeze    FLUSH TABLES WITH READ LOCK on a connection the lease keeps open
    mysql.thaw      UNLOCK TABLES and close it; "not frozen" is success
    mysql.dump      mariadb-dump (or mysqldump) | gzip -> S3 multipart, sha256 and size out
    mysql.restore   S3 -> gunzip -> mariadb (or mysql) into a database, created on request

FTWRL lives as long as its session, so a dispatcher that dies takes the lock with it (the
kernel closes the socket). Three more guards keep a server from staying frozen:

- A freeze that fails or is cancelled (step timeout) KILLs its own session from a second
  connection. A *pending* FTWRL already blocks every write, and when a server notices
  that the client of a waiting statement has gone depends on the server (MariaDB 10.11
  polls, within about a second); the KILL makes it immediate everywhere.
- The freezing session also takes a user-level lock named after the lease. A thaw running
  where the connection is not held (another replica, a restarted process) finds the
  session with ``IS_USED_LOCK`` and ends it, instead of assuming it is gone.
- ``session_timeout`` becomes the session's ``wait_timeout``: the server itself ends an
  idle frozen session if snaphook disappears without closing it (node lost, partition).

Credentials reach the client programs in a ``--defaults-extra-file``: a temporary file
created with mode 0600 in $TMPDIR (a tmpfs keeps it off disk), deleted when the program is
done. Never in argv, which every local user can read in /proc; not in ``MYSQL_PWD``
either, which MySQL 8 deprecates and which every process the client starts inherits. The
programs get a minimal environment, so the dispatcher's own secrets stay out of it too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiomysql
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from functions.procstream import (
    ProcessFailed,
    gunzip_stream,
    gzip_stream,
    read_process,
    write_process,
)
from functions.sdk import Context, FunctionError, PermanentError, RetryableError, function
from functions.storage import download_stream, upload_stream

SESSION_ENDED = "session ended; the server released the lock with it"
_MIB = 1024 * 1024
# Server errors retrying cannot fix: access denied (1044, 1045, 1142, 1698), missing
# privilege such as RELOAD for FTWRL (1227), unknown database (1049).
_PERMANENT_CODES = frozenset({1044, 1045, 1049, 1142, 1227, 1698})
# How the client programs print a server error: "ERROR 1045 (28000): ..." (mariadb,
# mysql), "Got error: 1045: ..." and "Couldn't execute '...': ... (1142)" (mariadb-dump,
# mysqldump). Not any number: "at line 1045" is no error code.
_CLIENT_ERROR_CODE = re.compile(r"(?:\bERROR |Got error: )(\d+)|\((\d+)\)$", re.MULTILINE)
_UNKNOWN_THREAD = 1094  # KILL of a session that has already ended
_S3_URL = r"^s3://[^/]+/.+"  # checked again when used; here so `validate` sees it
_CLIENT_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")
_CLEANUP_TIMEOUT = 5.0  # connecting to kill a session, when the step's own time may be up
_DATABASE_NAME = r"^[A-Za-z0-9_$-]{1,64}$"  # also keeps names safe in backticks and argv


class _Login(BaseModel):
    model_config = ConfigDict(extra="forbid")

    port: int = Field(default=3306, ge=1, le=65535)
    user: str = Field(default="root", min_length=1)
    password: SecretStr = SecretStr("")
    connect_timeout: float = Field(default=10.0, gt=0, le=300)


class ServerParams(_Login):
    host: str = Field(min_length=1)


class FreezeParams(ServerParams):
    # FTWRL waits for running writes while already blocking new ones: give up early and
    # let the step retry rather than stall the application behind a long UPDATE.
    lock_wait_timeout: int = Field(default=10, ge=1, le=86_400)
    # Seconds of silence after which the server ends the frozen session on its own; set it
    # a little above the lease's ttl. Unset: the server's wait_timeout (often 8 hours).
    session_timeout: int | None = Field(default=None, ge=1, le=31_536_000)


class BinlogPosition(BaseModel):
    file: str
    position: int
    gtid: str | None = None


class FreezeResult(BaseModel):
    server_version: str
    connection_id: int
    binlog: BinlogPosition | None  # None: binary logging is off
    waited_seconds: float  # how long FTWRL waited for running writes


class ThawParams(_Login):
    # Given, a thaw that does not hold the connection (another replica, a restart) looks
    # the freezing session up on the server and ends it; without, it trusts that the
    # session ended with the process that held it.
    host: str | None = None
    lease: str = ""  # filled in when the lease is released


class ThawResult(BaseModel):
    unlocked: bool
    reason: str | None = None
    connection_id: int | None = None
    held_seconds: float | None = None


class DumpParams(ServerParams):
    database: str = Field(pattern=_DATABASE_NAME)
    to: str = Field(pattern=_S3_URL)
    single_transaction: bool = True  # consistent InnoDB snapshot without locking tables
    routines: bool = True
    triggers: bool = True
    events: bool = True
    compression_level: int = Field(default=6, ge=1, le=9)
    # S3 allows 10 000 parts: 8 MiB parts cap a dump at about 78 GiB compressed.
    part_size_mib: int = Field(default=8, ge=5, le=5120)
    enabled: bool = True  # false: do nothing (a blueprint param switching the dump off)


class DumpResult(BaseModel):
    database: str
    skipped: bool = False
    url: str | None = None
    bytes: int = 0
    sha256: str | None = None
    parts: int = 0


class RestoreParams(ServerParams):
    from_: str = Field(alias="from", pattern=_S3_URL)  # where a mysql.dump put it
    database: str = Field(pattern=_DATABASE_NAME)
    # Create the database if it is missing. Restoring again is safe: the dump drops and
    # recreates each table it contains.
    create: bool = False
    enabled: bool = True


class RestoreResult(BaseModel):
    database: str
    skipped: bool = False
    created: bool = False
    bytes: int = 0  # compressed bytes read from S3
    sha256: str | None = None  # of those bytes: compare with the dump's


# --- connections ------------------------------------------------------------------------


def _failure(where: str, action: str, exc: BaseException) -> FunctionError:
    """A function error naming the server and what failed; never a parameter value."""
    mysql_error = isinstance(exc, aiomysql.MySQLError) and exc.args
    code = exc.args[0] if mysql_error and isinstance(exc.args[0], int) else None
    text = str(exc.args[1]) if code is not None and len(exc.args) > 1 else str(exc)
    message = f"mysql {where}: {action}: {text or type(exc).__name__}"
    if code:
        message += f" (error {code})"
    return (PermanentError if code in _PERMANENT_CODES else RetryableError)(message)


@dataclass
class _Session:
    conn: Any  # aiomysql.Connection
    host: str
    port: int

    @property
    def where(self) -> str:  # for messages
        return f"{self.host}:{self.port}"

    @property
    def connection_id(self) -> int:
        return int(self.conn.thread_id())

    async def rows(self, action: str, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        try:
            async with self.conn.cursor(aiomysql.DictCursor) as cursor:
                await cursor.execute(sql, args or None)
                return list(await cursor.fetchall())
        except (aiomysql.MySQLError, OSError) as exc:
            raise _failure(self.where, action, exc) from None

    async def close(self) -> None:
        """Say goodbye (servers log dropped clients as aborted); a dead link just closes."""
        try:
            await self.conn.ensure_closed()
        except (aiomysql.MySQLError, OSError):
            pass
        finally:
            self.conn.close()


async def _open(host: str, p: _Login, timeout: float) -> _Session:
    try:
        conn = await aiomysql.connect(
            host=host,
            port=p.port,
            user=p.user,
            password=p.password.get_secret_value(),
            connect_timeout=max(1.0, min(p.connect_timeout, timeout)),
            autocommit=True,
            charset="utf8mb4",
            program_name="snaphook",
        )
    except (aiomysql.MySQLError, OSError) as exc:
        raise _failure(f"{host}:{p.port}", "connect", exc) from None
    return _Session(conn, host, p.port)


async def _kill(session: _Session, connection_id: int) -> bool:
    """End another session; False if it had already ended."""
    try:
        async with session.conn.cursor() as cursor:
            await cursor.execute("KILL CONNECTION %s", (connection_id,))
    except (aiomysql.MySQLError, OSError) as exc:
        if exc.args and exc.args[0] == _UNKNOWN_THREAD:
            return False
        raise _failure(session.where, f"end session {connection_id}", exc) from None
    return True


def _lock_name(lease_id: str) -> str:
    return f"snaphook:{lease_id}"[:64]  # the servers' limit for user-level lock names


# --- freeze / thaw ----------------------------------------------------------------------


@dataclass
class _Frozen:
    """What the lease holds: the session with the lock, and since when."""

    session: _Session
    since: float  # time.monotonic()


@function("mysql.freeze")
async def freeze(ctx: Context, p: FreezeParams) -> FreezeResult:
    """Flush and lock all tables for writes; the lock holds until mysql.thaw or the lease ends.

    A long-running write makes FTWRL wait; after ``lock_wait_timeout`` seconds the step
    fails (retryable) and nothing stays locked.
    """
    if ctx.lease_id is None:
        raise PermanentError("mysql.freeze needs a lease: {ttl: ..., release: mysql.thaw}")
    session = await _open(p.host, p, ctx.remaining())
    try:
        result = await _lock(session, p, ctx.lease_id)
    except BaseException:
        await _abandon(session, p)
        raise
    ctx.hold(_Frozen(session, since=time.monotonic()))
    ctx.logger.info(
        "froze %s (session %d, waited %.3fs)",
        session.where,
        result.connection_id,
        result.waited_seconds,
    )
    return result


async def _lock(session: _Session, p: FreezeParams, lease_id: str) -> FreezeResult:
    timeouts = {"lock_wait_timeout": p.lock_wait_timeout}
    if p.session_timeout is not None:
        timeouts["wait_timeout"] = p.session_timeout
    assignments = ", ".join(f"SESSION {name} = %s" for name in timeouts)
    await session.rows("set session timeouts", f"SET {assignments}", list(timeouts.values()))
    [mark] = await session.rows(
        "mark the session",
        # Waits a little: the session of a failed earlier attempt may still be ending.
        "SELECT GET_LOCK(%s, 2) AS got, VERSION() AS version",
        (_lock_name(lease_id),),
    )
    if mark["got"] != 1:  # an earlier attempt's session for this lease still exists
        raise RetryableError(f"mysql {session.where}: lease {lease_id} is frozen by a session")
    started = time.monotonic()
    await session.rows(
        f"FLUSH TABLES WITH READ LOCK (lock_wait_timeout {p.lock_wait_timeout}s)",
        "FLUSH TABLES WITH READ LOCK",
    )
    waited = time.monotonic() - started
    return FreezeResult(
        server_version=mark["version"],
        connection_id=session.connection_id,
        binlog=await _binlog_position(session, mark["version"]),
        waited_seconds=round(waited, 3),
    )


def _is_mysql_at_least(version: str, minimum: tuple[int, int]) -> bool:
    if "mariadb" in version.lower():
        return False
    found = re.match(r"(\d+)\.(\d+)", version)
    return found is not None and (int(found[1]), int(found[2])) >= minimum


async def _binlog_position(session: _Session, version: str) -> BinlogPosition | None:
    # MySQL 8.2 renamed the statement and 8.4 dropped the old name; MariaDB keeps it.
    statement = (
        "SHOW BINARY LOG STATUS" if _is_mysql_at_least(version, (8, 2)) else "SHOW MASTER STATUS"
    )
    rows = await session.rows("read the binlog position", statement)
    if not rows:
        return None  # binary logging is off
    gtid = rows[0].get("Executed_Gtid_Set")  # MySQL reports it here, MariaDB separately
    if gtid is None and "mariadb" in version.lower():
        [row] = await session.rows("read the GTID position", "SELECT @@gtid_binlog_pos AS gtid")
        gtid = row["gtid"]
    return BinlogPosition(
        file=rows[0]["File"], position=int(rows[0]["Position"]), gtid=gtid or None
    )


async def _abandon(session: _Session, p: _Login) -> None:
    """End a session whose freeze failed or was cancelled, also from a second connection:
    a pending FTWRL blocks writes until the server notices our socket is gone, at a moment
    of its choosing. Best effort: if the KILL fails, that moment still comes."""
    connection_id = session.connection_id
    await session.close()
    with contextlib.suppress(FunctionError):
        killer = await _open(session.host, p, _CLEANUP_TIMEOUT)
        try:
            await _kill(killer, connection_id)
        finally:
            await killer.close()


@function("mysql.thaw")
async def thaw(ctx: Context, p: ThawParams) -> ThawResult:
    """UNLOCK TABLES and close the lease's connection.

    Nothing to unlock (never frozen, thawed already, the session ended with a restart) is
    success: ``unlocked: false`` and the reason.
    """
    lease = p.lease or ctx.lease_id or ""
    held = ctx.release_held(lease) if lease else None
    if isinstance(held, _Frozen):
        return await _unlock(ctx, held)
    if p.host is not None and lease:
        return await _end_elsewhere(p, p.host, lease, ctx.remaining())
    return ThawResult(unlocked=False, reason=SESSION_ENDED)


async def _unlock(ctx: Context, frozen: _Frozen) -> ThawResult:
    session = frozen.session
    held = round(time.monotonic() - frozen.since, 3)
    try:
        await session.rows("UNLOCK TABLES", "UNLOCK TABLES")
    except FunctionError as exc:
        # The server ended the session early (restart, wait_timeout, KILL): no lock left,
        # but it may have gone before the snapshot finished, so say so.
        ctx.logger.warning("%s: frozen session ended before the thaw: %s", session.where, exc)
        reason = f"the session ended before the thaw ({exc}); the lock went with it"
        return ThawResult(
            unlocked=False, reason=reason, connection_id=session.connection_id, held_seconds=held
        )
    finally:
        await session.close()
    ctx.logger.info(
        "thawed %s (session %d) after %.3fs", session.where, session.connection_id, held
    )
    return ThawResult(unlocked=True, connection_id=session.connection_id, held_seconds=held)


async def _end_elsewhere(p: ThawParams, host: str, lease: str, timeout: float) -> ThawResult:
    """Not held in this process: if the freezing session still exists, it holds the
    lease's named lock, which tells us its id; killing it releases FTWRL."""
    session = await _open(host, p, timeout)
    try:
        [row] = await session.rows(
            "find the frozen session", "SELECT IS_USED_LOCK(%s) AS holder", (_lock_name(lease),)
        )
        holder = row["holder"]
        if holder is None or not await _kill(session, int(holder)):
            return ThawResult(unlocked=False, reason=SESSION_ENDED)
    finally:
        await session.close()
    return ThawResult(
        unlocked=True,
        reason=f"ended session {holder}, which held the lock from another process",
        connection_id=int(holder),
    )


# --- dump / restore ---------------------------------------------------------------------


def _program(*names: str) -> str:
    for name in names:
        if path := shutil.which(name):
            return path
    raise PermanentError(f"none of {', '.join(names)} is installed (not found on PATH)")


_OPTION_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _option_value(value: str) -> str:
    """Quoted for an option file, where the client strips the quotes and undoes these
    escapes. An unescaped quote would end the quoting early, and a later ``#`` would then
    start a comment and cut the password short."""
    return '"' + value.translate(_OPTION_ESCAPES) + '"'


@contextlib.contextmanager
def _defaults_file(p: ServerParams) -> Iterator[str]:
    """A private option file with the connection settings, removed when the block ends."""
    # mkstemp creates the file with mode 0600 and O_EXCL: no other user can read it, and
    # nobody can have planted it beforehand.
    fd, path = tempfile.mkstemp(prefix="snaphook-mysql-", suffix=".cnf")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(
                "[client]\n"
                f"host={_option_value(p.host)}\n"
                f"port={p.port}\n"
                f"user={_option_value(p.user)}\n"
                f"password={_option_value(p.password.get_secret_value())}\n"
            )
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _client_env() -> dict[str, str]:
    return {name: os.environ[name] for name in _CLIENT_ENV if name in os.environ}


def _client_failure(exc: ProcessFailed) -> FunctionError:
    """Bad credentials or an unknown database will not fix themselves: no retries."""
    codes = {int(a or b) for a, b in _CLIENT_ERROR_CODE.findall(exc.stderr)}
    return PermanentError(str(exc)) if codes & _PERMANENT_CODES else exc


@contextlib.asynccontextmanager
async def _closing(*streams: AsyncIterator[bytes]) -> AsyncIterator[None]:
    """Close a pipeline of generators, outermost first, when the block ends: a dump that
    fails half-way must stop its client program now, not when the garbage collector
    gets to it (``async for`` does not close what it iterates)."""
    try:
        yield
    finally:
        for stream in streams:
            if isinstance(stream, AsyncGenerator):
                await stream.aclose()


def _dump_flags(p: DumpParams) -> list[str]:
    flags = [
        "--default-character-set=utf8mb4",
        "--hex-blob",  # binary columns as hex: safe whatever the restoring client's charset
        "--no-tablespaces",  # MySQL 8 wants the PROCESS privilege for them; rarely useful
        "--single-transaction" if p.single_transaction else "--lock-tables",
    ]
    for name, wanted in (("routines", p.routines), ("triggers", p.triggers), ("events", p.events)):
        flags.append(f"--{name}" if wanted else f"--skip-{name}")
    return flags


@function("mysql.dump")
async def dump(ctx: Context, p: DumpParams) -> DumpResult:
    """Stream a logical dump of ``database``, gzipped, to ``to`` (S3 multipart).

    The dump has no CREATE DATABASE, so it restores under any name.
    """
    if not p.enabled:
        return DumpResult(database=p.database, skipped=True)
    program = _program("mariadb-dump", "mysqldump")
    with _defaults_file(p) as options:
        # --defaults-extra-file must come first; "--" so no name can pass for an option.
        argv = [program, f"--defaults-extra-file={options}", *_dump_flags(p), "--", p.database]
        sql = read_process(argv, _client_env())
        packed = gzip_stream(sql, p.compression_level)
        async with _closing(packed, sql):
            try:
                stored = await upload_stream(
                    ctx,
                    p.to,
                    packed,
                    part_size=p.part_size_mib * _MIB,
                    content_type="application/gzip",
                )
            except ProcessFailed as exc:
                raise _client_failure(exc) from None
    ctx.logger.info(
        "dumped %s to %s: %d bytes, %d parts", p.database, stored.url, stored.bytes, stored.parts
    )
    return DumpResult(
        database=p.database,
        url=stored.url,
        bytes=stored.bytes,
        sha256=stored.sha256,
        parts=stored.parts,
    )


class _Tally:
    """Counts and hashes the bytes flowing past."""

    def __init__(self) -> None:
        self.bytes = 0
        self.sha256 = hashlib.sha256()

    async def through(self, chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            self.bytes += len(chunk)
            self.sha256.update(chunk)
            yield chunk


async def _create_database(p: RestoreParams, timeout: float) -> bool:
    session = await _open(p.host, p, timeout)
    try:
        found = await session.rows(
            "look up the database",
            "SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s",
            (p.database,),
        )
        if found:
            return False
        await session.rows(
            f"create database {p.database}",
            f"CREATE DATABASE IF NOT EXISTS `{p.database}` CHARACTER SET utf8mb4",
        )
        return True
    finally:
        await session.close()


@function("mysql.restore")
async def restore(ctx: Context, p: RestoreParams) -> RestoreResult:
    """Stream a mysql.dump from S3 into ``database`` (``create: true`` creates it)."""
    if not p.enabled:
        return RestoreResult(database=p.database, skipped=True)
    program = _program("mariadb", "mysql")
    created = await _create_database(p, ctx.remaining()) if p.create else False
    tally = _Tally()
    with _defaults_file(p) as options:
        argv = [
            program,
            f"--defaults-extra-file={options}",
            "--default-character-set=utf8mb4",
            "--binary-mode",  # dumps from elsewhere may carry raw binary strings
            f"--database={p.database}",
        ]
        packed = download_stream(ctx, p.from_)
        counted = tally.through(packed)
        sql = gunzip_stream(counted)
        async with _closing(sql, counted, packed):
            try:
                await write_process(argv, sql, _client_env())
            except ProcessFailed as exc:
                raise _client_failure(exc) from None
    ctx.logger.info("restored %s from %s: %d bytes", p.database, p.from_, tally.bytes)
    return RestoreResult(
        database=p.database, created=created, bytes=tally.bytes, sha256=tally.sha256.hexdigest()
    )
