"""PostgreSQL hook functions.

    postgres.freeze    CHECKPOINT, then a non-exclusive base backup (pg_backup_start) on a
                       connection the freeze lease keeps open
    postgres.thaw      pg_backup_stop on that connection: stop LSN, backup_label, tablespace map
    postgres.dump      pg_dump (custom, or plain SQL gzip'd) streamed into an S3 object
    postgres.restore   that object streamed back through pg_restore / psql, optionally into
                       a database it creates first

A non-exclusive backup lives exactly as long as its session: if the dispatcher dies, the
connection closes and PostgreSQL aborts the backup by itself. That is why the session is
the thing the lease holds (``ctx.hold``), and why a thaw that finds nothing held reports
"not stopped" instead of failing.

Credentials: the DSN (``postgresql://user:password@host:port/db?sslmode=...``) is a
SecretStr. asyncpg gets it as it is; pg_dump, pg_restore and psql get it as PG* environment
variables, never as arguments, where ``ps`` would show the password to every local user.
Errors name the database, host and role, never the password.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import asyncpg
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from functions.procstream import ProcessFailed, gunzip_stream, read_process, write_process
from functions.sdk import Context, FunctionError, PermanentError, RetryableError, function
from functions.storage import download_stream, upload_stream

MIB = 1024 * 1024
CONNECT_TIMEOUT = 10.0
MAX_PARTS = 10_000  # S3's limit for one multipart upload
APP_NAME = "snaphook-freeze"  # + lease id: how an operator (and thaw) finds a freeze session
NAME_MAX = 63  # PostgreSQL truncates identifiers and application_name to 63 bytes
CUSTOM_MAGIC = b"PGDMP"
GZIP_MAGIC = b"\x1f\x8b"
NOT_HELD = "session ended; PostgreSQL ended the backup with it"

# DSN query parameters libpq's programs understand, as the environment variables they read.
_QUERY_ENV = {
    "host": "PGHOST",
    "port": "PGPORT",
    "user": "PGUSER",
    "password": "PGPASSWORD",
    "dbname": "PGDATABASE",
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslcrl": "PGSSLCRL",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "application_name": "PGAPPNAME",
    "options": "PGOPTIONS",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "passfile": "PGPASSFILE",
}
# SQLSTATE classes a retry can fix: connection trouble, resources, shutdown/startup.
_TRANSIENT_SQLSTATES = ("08", "53", "57P")
# pg_dump / pg_restore / psql stderr that means the connection, not the data, failed.
_TRANSIENT_STDERR = (
    "could not connect",
    "connection refused",
    "server closed the connection",
    "terminating connection",
    "could not receive data",
    "could not send data",
    "the database system is",
    "timeout expired",
    "too many clients",
)


# --- where to connect ------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """A DSN taken apart once: the PG* variables libpq's programs read, and the names
    (never the password) that messages may show."""

    dsn: str
    env: dict[str, str] = field(repr=False)
    database_override: str | None = None

    @classmethod
    def parse(cls, secret: SecretStr, database: str | None = None) -> Server:
        dsn = secret.get_secret_value()
        parts = urlsplit(dsn)
        if parts.scheme not in ("postgres", "postgresql"):
            raise PermanentError("dsn: expected postgresql://user:password@host:port/database")
        userinfo, _, hostlist = parts.netloc.rpartition("@")
        user, _, password = userinfo.partition(":")
        env = _host_env(hostlist)
        if user:
            env["PGUSER"] = unquote(user)
        if password:
            env["PGPASSWORD"] = unquote(password)
        if path := unquote(parts.path.lstrip("/")):
            env["PGDATABASE"] = path
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key not in _QUERY_ENV:
                raise PermanentError(f"dsn: unsupported parameter {key!r}")
            env[_QUERY_ENV[key]] = value
        if database:
            env["PGDATABASE"] = database
        return cls(dsn, env, database or None)

    def on(self, database: str) -> Server:
        """The same server and login, another database."""
        return Server(self.dsn, {**self.env, "PGDATABASE": database}, database)

    @property
    def user(self) -> str:
        return self.env.get("PGUSER") or os.environ.get("PGUSER") or "(default user)"

    @property
    def database(self) -> str:
        # libpq's default database is the user name.
        return self.env.get("PGDATABASE") or os.environ.get("PGDATABASE") or self.user

    @property
    def where(self) -> str:
        hosts = self.env.get("PGHOST") or os.environ.get("PGHOST") or "localhost"
        return f"{hosts} port {self.env.get('PGPORT', '5432')}"

    def describe(self) -> str:
        return f"database {self.database!r} on {self.where} as {self.user!r}"

    def tool_env(self) -> dict[str, str]:
        """The environment for pg_dump & co.: the DSN's settings over the process's own."""
        return {**os.environ, **self.env}

    def scrub(self, text: str) -> str:
        """``text`` without the password, should a peer ever echo it."""
        password = self.env.get("PGPASSWORD", "")
        for form in {password, quote(password, safe="")} if len(password) >= 3 else ():
            text = text.replace(form, "**********")
        return text


def _host_env(hostlist: str) -> dict[str, str]:
    """``h1:5432,[::1]:5433`` → PGHOST/PGPORT lists, as libpq takes them."""
    hosts, ports = [], []
    for item in filter(None, hostlist.split(",")):
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port = rest.removeprefix(":")
        else:
            host, _, port = item.partition(":")
        if port and not port.isdigit():
            raise PermanentError("dsn: a port is not a number")
        hosts.append(unquote(host))
        ports.append(port)
    env = {}
    if hosts:
        env["PGHOST"] = ",".join(hosts)
    if any(ports):  # libpq wants one port, or one per host
        env["PGPORT"] = ",".join(port or "5432" for port in ports)
    return env


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _conninfo_dbname(name: str) -> str:
    """``dbname='...'`` for ``pg_restore --dbname``: a bare name that looks like a
    connection string (contains ``=``) would be taken apart by libpq."""
    escaped = name.replace("\\", "\\\\").replace("'", "\\'")
    return f"dbname='{escaped}'"


# --- errors ----------------------------------------------------------------------------


def _connect_failure(server: Server, exc: BaseException) -> FunctionError:
    """Refused, unreachable or starting up: retry. Bad login or no such database: give up."""
    detail = server.scrub(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return PermanentError(f"database {server.database!r} does not exist on {server.where}")
    if isinstance(
        exc, asyncpg.InvalidAuthorizationSpecificationError | asyncpg.InvalidPasswordError
    ):
        return PermanentError(f"login to {server.describe()} refused: {server.scrub(str(exc))}")
    if isinstance(exc, asyncpg.PostgresError) and not _transient(exc):
        return PermanentError(f"cannot connect to {server.describe()}: {detail}")
    if isinstance(exc, asyncpg.ClientConfigurationError | ValueError):
        return PermanentError(f"dsn: {detail}")
    return RetryableError(f"cannot connect to {server.describe()}: {detail}")


def _transient(exc: BaseException) -> bool:
    state = str(getattr(exc, "sqlstate", "") or "")
    return state.startswith(_TRANSIENT_SQLSTATES)


def _query_failure(server: Server, action: str, exc: BaseException) -> FunctionError:
    """An SQL error (a missing privilege, a name in use) fails again on retry; a lost
    connection or a server shutting down may not."""
    detail = server.scrub(str(exc))
    if isinstance(exc, asyncpg.PostgresError) and not _transient(exc):
        return PermanentError(f"{action} on {server.describe()}: {detail}")
    return RetryableError(f"{action} on {server.describe()}: {type(exc).__name__}: {detail}")


def _tool_failure(server: Server, exc: ProcessFailed) -> FunctionError:
    """A client program failed. Lost connections are worth a retry; an SQL error (a
    permission, an object that already exists) will fail the same way again."""
    message = server.scrub(str(exc))
    stderr = exc.stderr.lower()
    if any(marker in stderr for marker in _TRANSIENT_STDERR) or "error" not in stderr:
        return RetryableError(message)
    return PermanentError(message)


_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


async def _connect(
    ctx: Context, server: Server, settings: dict[str, str] | None = None
) -> Any:  # asyncpg ships no type information
    timeout = max(0.5, min(CONNECT_TIMEOUT, ctx.remaining()))
    try:
        return await asyncpg.connect(
            server.dsn,
            database=server.database_override,
            timeout=timeout,
            server_settings=settings,
        )
    except (*_DB_ERRORS, ValueError) as exc:
        raise _connect_failure(server, exc) from None


async def _close(conn: Any) -> None:
    """Close a session politely, or cut it. For a freeze session either ends its backup."""
    if conn.is_closed():
        return
    try:
        await conn.close(timeout=5)
    except Exception:
        conn.terminate()


def _version(conn: Any) -> str:
    """``15.20 (Debian ...)``: the server reports it when a session starts."""
    return str(conn.get_settings().server_version)


async def _inspect(ctx: Context, server: Server) -> tuple[str, int]:
    """Server version and database size. Also proves the login works before a client
    program runs: connection errors are classified here, with SQLSTATEs, rather than
    guessed from a program's stderr."""
    conn = await _connect(ctx, server)
    try:
        size: int = await conn.fetchval("SELECT pg_database_size(current_database())")
    except _DB_ERRORS as exc:
        raise _query_failure(server, "reading the database size", exc) from None
    finally:
        await _close(conn)
    return _version(conn), size


def _part_size(wanted: int, database_bytes: int) -> int:
    """``wanted``, or more if the dump might not fit in S3's 10,000 parts. A dump (plain
    ones are gzip'd) is rarely larger than the database on disk; 25% spare for the rest."""
    needed = -(-database_bytes * 5 // 4 // MAX_PARTS)
    return max(wanted, -(-needed // MIB) * MIB)


def _left(ctx: Context) -> float:
    return max(0.5, ctx.remaining())


# --- freeze / thaw ---------------------------------------------------------------------


class FreezeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dsn: SecretStr
    database: str | None = None  # where to log in; the backup covers the whole cluster
    label: str | None = Field(default=None, max_length=1000)  # default: "snaphook <lease>"
    # Immediate checkpoint for pg_backup_start. The CHECKPOINT before it already flushed,
    # so this one is short either way; false spreads it per checkpoint_completion_target.
    fast: bool = True


class FreezeResult(BaseModel):
    start_lsn: str
    label: str
    backend_pid: int
    server_version: str


class ThawParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dsn: SecretStr  # to look for a freeze session this process no longer holds
    database: str | None = None
    lease: str = ""  # filled in when the lease is released; a post step passes it
    # pg_backup_stop waits until the WAL the backup needs is archived (when archiving is on).
    wait_for_archive: bool = True


class ThawResult(BaseModel):
    stopped: bool
    reason: str = ""
    label: str | None = None
    start_lsn: str | None = None
    stop_lsn: str | None = None
    labelfile: str | None = None  # write as backup_label into the restored data directory
    tablespace_map: str | None = None  # likewise tablespace_map, when not empty
    notices: list[str] = Field(default_factory=list)
    terminated_pids: list[int] = Field(default_factory=list)


@dataclass
class _Backup:
    """What a freeze lease holds: the session its backup lives and dies with."""

    conn: Any
    label: str
    start_lsn: str
    notices: list[str] = field(default_factory=list)


def _session_name(lease: str) -> str:
    return f"{APP_NAME} {lease}"[:NAME_MAX]


@function("postgres.freeze")
async def freeze(ctx: Context, p: FreezeParams) -> FreezeResult:
    """CHECKPOINT, then pg_backup_start on a connection the lease keeps open until
    postgres.thaw stops the backup (or the session ends, and PostgreSQL aborts it)."""
    if ctx.lease_id is None:
        raise PermanentError("postgres.freeze needs a lease: {ttl: ..., release: postgres.thaw}")
    # A retry of this step: the earlier attempt's session (if it got that far) goes first.
    if isinstance(earlier := ctx.release_held(ctx.lease_id), _Backup):
        await _close(earlier.conn)
    server = Server.parse(p.dsn, p.database)
    label = p.label or f"snaphook {ctx.lease_id}"
    conn = await _connect(ctx, server, _freeze_settings(ctx.lease_id))
    try:
        backup = await _start_backup(ctx, server, conn, label, p.fast)
    except BaseException as exc:
        conn.terminate()  # ends any backup the session began; no await while cancelled
        if isinstance(exc, _DB_ERRORS):
            raise _query_failure(server, "starting the backup", exc) from None
        raise
    ctx.hold(backup)
    pid: int = conn.get_server_pid()
    ctx.logger.info("backup %r started at %s on backend %d", label, backup.start_lsn, pid)
    return FreezeResult(
        start_lsn=backup.start_lsn, label=label, backend_pid=pid, server_version=_version(conn)
    )


def _freeze_settings(lease: str) -> dict[str, str]:
    return {
        "application_name": _session_name(lease),
        # If the dispatcher's host vanishes without closing the socket, keepalives end the
        # session (and so the backup) within about two minutes instead of the OS's hours.
        "tcp_keepalives_idle": "60",
        "tcp_keepalives_interval": "10",
        "tcp_keepalives_count": "6",
    }


async def _start_backup(ctx: Context, server: Server, conn: Any, label: str, fast: bool) -> _Backup:
    if conn.get_server_version().major < 15:
        raise PermanentError(f"{server.describe()}: pg_backup_start needs PostgreSQL 15 or later")
    notices: list[str] = []
    conn.add_log_listener(lambda _conn, message: notices.append(str(message.message)))
    # The session must outlive the freeze window: no idle or statement timeout of the role
    # may cut it (that would silently abort the backup before the snapshot).
    await conn.execute("SET idle_session_timeout = 0; SET statement_timeout = 0")
    # Flushing dirty buffers before the backup starts keeps pg_backup_start's own
    # checkpoint short, and leaves little WAL for crash recovery of a snapshot restored
    # without its backup_label.
    await conn.execute("CHECKPOINT", timeout=_left(ctx))
    start = await conn.fetchval(
        "SELECT pg_backup_start($1, $2)::text", label, fast, timeout=_left(ctx)
    )
    return _Backup(conn, label, str(start), notices)


@function("postgres.thaw")
async def thaw(ctx: Context, p: ThawParams) -> ThawResult:
    """pg_backup_stop on the freeze's session, then close it. Nothing held here (the
    dispatcher restarted, or the freeze never got that far) is success: the backup ended
    with its session. A session still open without its client is terminated."""
    lease = p.lease or ctx.lease_id or ""
    if not lease:
        return ThawResult(stopped=False, reason="no lease given: nothing to stop")
    held = ctx.release_held(lease)
    if held is None:
        return await _end_leftovers(ctx, p, lease, NOT_HELD)
    if not isinstance(held, _Backup):
        raise PermanentError(f"lease {lease} was not taken by postgres.freeze")
    try:
        row = await held.conn.fetchrow(
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop($1)",
            p.wait_for_archive,
            timeout=_left(ctx),
        )
    except _DB_ERRORS as exc:
        held.conn.terminate()
        ctx.logger.warning("pg_backup_stop of %r failed: %s", held.label, exc)
        reason = f"pg_backup_stop failed ({type(exc).__name__}: {exc}); the session was closed"
        return await _end_leftovers(ctx, p, lease, reason + ", which ended the backup")
    except BaseException:
        held.conn.terminate()
        raise
    await _close(held.conn)
    for notice in held.notices:
        ctx.logger.warning("PostgreSQL: %s", notice)
    ctx.logger.info("backup %r stopped at %s", held.label, row["lsn"])
    return ThawResult(
        stopped=True,
        label=held.label,
        start_lsn=held.start_lsn,
        stop_lsn=row["lsn"],
        labelfile=row["labelfile"],
        tablespace_map=row["spcmapfile"],
        notices=held.notices,
    )


async def _end_leftovers(ctx: Context, p: ThawParams, lease: str, reason: str) -> ThawResult:
    """Terminate a freeze session of ``lease`` that the server still has although no
    process holds it (its client's host died, or a network partition hides the close);
    PostgreSQL aborts the backup of a session it ends."""
    server = Server.parse(p.dsn, p.database)
    try:
        conn = await _connect(ctx, server)
    except FunctionError as exc:
        # Keepalives (set by freeze) end such a session anyway; a thaw that cannot look
        # must not turn into a failed lease when the server is simply down.
        ctx.logger.warning("could not look for a leftover freeze session: %s", exc)
        return ThawResult(stopped=False, reason=f"{reason} (could not check the server: {exc})")
    try:
        # The side effect stays in the select list, which runs only for rows that passed
        # WHERE: in WHERE the planner may call it before the name filter, on every session.
        rows = await conn.fetch(
            "SELECT pid, pg_terminate_backend(pid, 5000) AS ended FROM pg_stat_activity"
            " WHERE application_name = $1 AND pid <> pg_backend_pid()",
            _session_name(lease),
            timeout=_left(ctx),
        )
    except _DB_ERRORS as exc:
        raise _query_failure(server, "looking for a leftover freeze session", exc) from None
    finally:
        await _close(conn)
    pids = [int(row["pid"]) for row in rows]
    if pids:
        ctx.logger.warning("terminated leftover freeze session(s) %s of lease %s", pids, lease)
        reason = f"terminated the leftover freeze session(s) {pids}; PostgreSQL ended the backup"
    return ThawResult(stopped=False, reason=reason, terminated_pids=pids)


# --- dump / restore --------------------------------------------------------------------


class DumpParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dsn: SecretStr
    database: str | None = None  # default: the DSN's
    to: str = Field(pattern=r"^s3://[^/]+/.+")
    format: Literal["custom", "plain"] = "custom"  # plain: SQL text, gzip'd by pg_dump
    compression: int | None = Field(default=None, ge=0, le=9)  # default: pg_dump's / gzip 6
    schemas: list[str] = Field(default_factory=list)  # pg_dump --schema patterns
    exclude_tables: list[str] = Field(default_factory=list)  # --exclude-table patterns
    no_owner: bool = False  # plain format: leave out ownership (restore: see its own flag)
    # MiB per multipart part, at least; grown for a database whose dump could otherwise
    # need more than S3's 10,000 parts. Each part is held in memory while it uploads.
    part_size_mb: int = Field(default=5, ge=5, le=5120)
    enabled: bool = True  # false: do nothing (a blueprint param can switch the dump off)


class DumpResult(BaseModel):
    dumped: bool
    url: str | None = None
    bytes: int | None = None
    sha256: str | None = None
    parts: int | None = None
    format: str | None = None
    database: str | None = None
    server_version: str | None = None


class RestoreParams(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    dsn: SecretStr
    database: str = Field(min_length=1, max_length=NAME_MAX)  # restore into this one
    source: str = Field(alias="from", pattern=r"^s3://[^/]+/.+")
    create: bool = False  # create the database first; an existing one is an error...
    clean: bool = False  # ...unless clean: then it is dropped and created afresh
    single_transaction: bool = True  # all or nothing
    no_owner: bool = False  # custom format: don't restore ownership (roles may not exist)
    enabled: bool = True

    @model_validator(mode="after")
    def _clean_needs_create(self) -> RestoreParams:
        if self.clean and not self.create:
            raise ValueError("clean: true drops and re-creates the database; it needs create: true")
        return self


class RestoreResult(BaseModel):
    restored: bool
    database: str
    created: bool = False
    format: str | None = None
    bytes: int | None = None
    sha256: str | None = None
    server_version: str | None = None


@function("postgres.dump")
async def dump(ctx: Context, p: DumpParams) -> DumpResult:
    """pg_dump streamed through a bounded buffer into an S3 (multipart) upload; never whole
    in memory or on disk. pg_dump's own snapshot makes it consistent without a freeze."""
    if not p.enabled:
        return DumpResult(dumped=False)
    server = Server.parse(p.dsn, p.database)
    version, size = await _inspect(ctx, server)
    # Closed also when the upload fails: pg_dump is killed rather than left writing.
    async with _closing(read_process(_dump_argv(p), server.tool_env())) as output:
        try:
            stored = await upload_stream(
                ctx,
                p.to,
                output,
                part_size=_part_size(p.part_size_mb * MIB, size),
                content_type="application/octet-stream"
                if p.format == "custom"
                else "application/gzip",
            )
        except ProcessFailed as exc:
            raise _tool_failure(server, exc) from None
    ctx.logger.info(
        "dumped %s: %d bytes in %d part(s)", server.database, stored.bytes, stored.parts
    )
    return DumpResult(
        dumped=True,
        url=stored.url,
        bytes=stored.bytes,
        sha256=stored.sha256,
        parts=stored.parts,
        format=p.format,
        database=server.database,
        server_version=version,
    )


def _dump_argv(p: DumpParams) -> list[str]:
    # Values go after "=" so that one starting with "-" cannot pass for an option.
    argv = ["pg_dump", "--no-password", f"--format={p.format}"]
    if p.format == "plain":
        # pg_dump gzips plain output itself: the compression runs in its process, beside
        # ours, instead of on the dispatcher's event loop.
        argv.append(f"--compress={6 if p.compression is None else max(p.compression, 1)}")
    elif p.compression is not None:
        argv.append(f"--compress={p.compression}")
    argv += [f"--schema={schema}" for schema in p.schemas]
    argv += [f"--exclude-table={table}" for table in p.exclude_tables]
    if p.no_owner:
        argv.append("--no-owner")
    return argv


@function("postgres.restore")
async def restore(ctx: Context, p: RestoreParams) -> RestoreResult:
    """Stream a dump from S3 into a database: pg_restore for custom archives, psql for
    gzip'd SQL (told apart by the object's first bytes). With ``create`` the database is
    created first and dropped again if the restore fails, so a retry starts clean."""
    if not p.enabled:
        return RestoreResult(restored=False, database=p.database)
    target = Server.parse(p.dsn, p.database)
    created = await _create_database(ctx, _admin(p), p.database, p.clean) if p.create else False
    try:
        version, _ = await _inspect(ctx, target)
        fmt, digest = await _load(ctx, target, p)
    except BaseException:
        if created:
            await _drop_after_failure(ctx, _admin(p), p.database)
        raise
    ctx.logger.info("restored %d bytes (%s) into %s", digest.bytes, fmt, p.database)
    return RestoreResult(
        restored=True,
        database=p.database,
        created=created,
        format=fmt,
        bytes=digest.bytes,
        sha256=digest.sha256.hexdigest(),
        server_version=version,
    )


def _admin(p: RestoreParams) -> Server:
    """Where to run CREATE/DROP DATABASE: the DSN's database, unless that is the target."""
    server = Server.parse(p.dsn)
    return server if server.database != p.database else server.on("postgres")


async def _create_database(ctx: Context, admin: Server, name: str, clean: bool) -> bool:
    conn = await _connect(ctx, admin)
    try:
        exists = await conn.fetchval("SELECT true FROM pg_database WHERE datname = $1", name)
        if exists and not clean:
            raise PermanentError(
                f"database {name!r} already exists on {admin.where};"
                " set clean: true to drop and re-create it"
            )
        if exists:
            ctx.logger.warning("dropping database %r to restore it afresh", name)
            await conn.execute(f"DROP DATABASE {_ident(name)}", timeout=_left(ctx))
        # template0: pg_dump's output expects a pristine database, not template1's extras.
        await conn.execute(f"CREATE DATABASE {_ident(name)} TEMPLATE template0", timeout=_left(ctx))
    except _DB_ERRORS as exc:
        raise _query_failure(admin, f"creating database {name!r}", exc) from None
    finally:
        await _close(conn)
    return True


async def _drop_after_failure(ctx: Context, admin: Server, name: str) -> None:
    try:
        conn = await _connect(ctx, admin)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {_ident(name)}", timeout=10)
        finally:
            await _close(conn)
    except (FunctionError, *_DB_ERRORS) as exc:
        ctx.logger.warning("could not drop the half-restored database %r: %s", name, exc)


class _Digest:
    """sha256 and size of a stream, taken as it flows past."""

    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    async def tap(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            self.sha256.update(chunk)
            self.bytes += len(chunk)
            yield chunk


async def _load(ctx: Context, target: Server, p: RestoreParams) -> tuple[str, _Digest]:
    digest = _Digest()
    async with _closing(download_stream(ctx, p.source)) as source:
        stream = digest.tap(source)
        head = await _peek(stream, len(CUSTOM_MAGIC))
        fmt, argv, feed = _restore_plan(head, p)
        try:
            await write_process(argv, feed(_prepend(head, stream)), target.tool_env())
        except ProcessFailed as exc:
            raise _tool_failure(target, exc) from None
    return fmt, digest


Feed = Callable[[AsyncIterator[bytes]], AsyncIterator[bytes]]


def _restore_plan(head: bytes, p: RestoreParams) -> tuple[str, list[str], Feed]:
    if head.startswith(CUSTOM_MAGIC):
        argv = ["pg_restore", "--no-password", "--exit-on-error"]
        argv.append(f"--dbname={_conninfo_dbname(p.database)}")
        if p.single_transaction:
            argv.append("--single-transaction")
        if p.no_owner:
            argv.append("--no-owner")
        return "custom", argv, lambda chunks: chunks
    if head.startswith(GZIP_MAGIC):
        # psql reads the database from PGDATABASE; query results go nowhere.
        argv = ["psql", "--no-password", "--no-psqlrc", "--quiet", "--output=/dev/null"]
        argv.append("--set=ON_ERROR_STOP=1")
        if p.single_transaction:
            argv.append("--single-transaction")
        return "plain", argv, gunzip_stream
    what = "empty" if not head else "neither a pg_dump custom archive nor gzip'd SQL"
    raise PermanentError(f"{p.source}: {what}")


@asynccontextmanager
async def _closing(stream: AsyncIterator[bytes]) -> AsyncIterator[AsyncIterator[bytes]]:
    """Close a generator-backed stream on the way out, also on failure: a client program
    is killed and an S3 connection returned now, not whenever the generator is collected."""
    try:
        yield stream
    finally:
        if inspect.isasyncgen(stream):
            await stream.aclose()


async def _peek(stream: AsyncIterator[bytes], size: int) -> bytes:
    """At least ``size`` bytes from the start of ``stream`` (fewer only if it ends)."""
    head = b""
    while len(head) < size and (chunk := await anext(stream, None)) is not None:
        head += chunk
    return head


async def _prepend(head: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if head:
        yield head
    async for chunk in rest:
        yield chunk
