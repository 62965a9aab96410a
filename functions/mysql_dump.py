"""``mysql.dump`` and ``mysql.restore``: logical dumps streamed between the server's client
programs and S3.

    mysql.dump      mariadb-dump (or mysqldump) | gzip -> S3 multipart, sha256 and size out
    mysql.restore   S3 -> gunzip -> mariadb (or mysql) into a database, created on request

Credentials reach the client programs in a ``--defaults-extra-file``: a temporary file
created with mode 0600 in $TMPDIR (a tmpfs keeps it off disk), deleted when the program is
done. Never in argv, which every local user can read in /proc; not in ``MYSQL_PWD``
either, which MySQL 8 deprecates and which every process the client starts inherits. The
programs get a minimal environment, so the dispatcher's own secrets stay out of it too.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Iterator

from pydantic import BaseModel, Field

from functions.mysql_conn import PERMANENT_CODES, ServerParams, open_session
from functions.procstream import (
    ProcessFailed,
    gunzip_stream,
    gzip_stream,
    read_process,
    write_process,
)
from functions.sdk import Context, FunctionError, PermanentError, function
from functions.storage import StreamTally, download_stream, upload_stream

_MIB = 1024 * 1024
# How the client programs print a server error: "ERROR 1045 (28000): ..." (mariadb,
# mysql), "Got error: 1045: ..." and "Couldn't execute '...': ... (1142)" (mariadb-dump,
# mysqldump). Not any number: "at line 1045" is no error code.
_CLIENT_ERROR_CODE = re.compile(r"(?:\bERROR |Got error: )(\d+)|\((\d+)\)$", re.MULTILINE)
_S3_URL = r"^s3://[^/]+/.+"  # checked again when used; here so `validate` sees it
_CLIENT_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")
_DATABASE_NAME = r"^[A-Za-z0-9_$-]{1,64}$"  # also keeps names safe in backticks and argv


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


# --- running the client programs --------------------------------------------------------


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
    return PermanentError(str(exc)) if codes & PERMANENT_CODES else exc


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


# --- mysql.dump / mysql.restore --------------------------------------------------------


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


async def _create_database(p: RestoreParams, timeout: float) -> bool:
    session = await open_session(p.host, p, timeout)
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
    tally = StreamTally()
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
        database=p.database, created=created, bytes=tally.bytes, sha256=tally.sha256
    )
