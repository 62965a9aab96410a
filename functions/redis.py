"""Redis: a fresh RDB snapshot, and a streamed logical export/import of the keyspace.

``redis.bgsave`` gives a volume snapshot a ``dump.rdb`` as new as the pre event.
``redis.export`` / ``redis.import`` cover data that lives only in memory: each key is
DUMPed with its expiry and streamed through gzip to S3; the import RESTOREs the stream
into an empty instance, another DB number, or under another key prefix. Neither holds
more than one SCAN page of values in memory. Not for Redis Cluster (SCAN is per node).

Export format, version 1; integers are big-endian and the whole stream is gzipped::

    header  b"SHKREDIS" | version u16 | meta_len u32 | meta (JSON object, UTF-8)
    record  b"K" | key_len u32 | key | expire_at i64 | payload_len u64 | payload
    end     b"E" | record count u64               (nothing may follow)

``payload`` is the DUMP reply (it carries its RDB version and a checksum that RESTORE
checks). ``expire_at`` is the key's expiry in Unix milliseconds on the source server's
clock, ``-1`` for none: the import may run days after the export, so the remaining TTL
is computed against the target's clock then, as RDB files do it (both clocks must be
NTP-synced). ``meta`` holds ``redis_version``, ``db``, ``match`` and ``exported_at_ms``.
The end record makes a truncated object an error instead of a silently short restore.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    NoPermissionError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from functions.procstream import gunzip_stream, gzip_stream
from functions.sdk import Context, FunctionError, PermanentError, RetryableError, function
from functions.storage import DEFAULT_PART, MIN_PART, download_stream, upload_stream

MAGIC = b"SHKREDIS"
VERSION = 1
NO_EXPIRY = -1
_HEADER = struct.Struct(">8sHI")  # magic, version, meta_len
_KEY_LEN = struct.Struct(">I")
_VALUE = struct.Struct(">qQ")  # expire_at, payload_len
_COUNT = struct.Struct(">Q")
_RESTORE_BATCH_BYTES = 8 * 1024 * 1024  # flush a RESTORE pipeline at this much payload
_T = TypeVar("_T")
_MARGIN = 0.25  # give up this long before the step's timeout, with a clearer message


# --- connections -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Server:
    """Where to connect, plus a name that is safe to show (no credentials)."""

    options: dict[str, Any]
    name: str
    secrets: tuple[str, ...]  # the password as written in the URL and decoded

    @classmethod
    def parse(cls, url: SecretStr, db: int | None) -> _Server:
        raw = url.get_secret_value()
        secrets: tuple[str, ...] = (raw,)
        try:
            written = urlsplit(raw).password or ""
            secrets = tuple(s for s in {raw, written, unquote(written)} if s)
            options: dict[str, Any] = dict(parse_url(raw))
        except ValueError as exc:
            raise PermanentError(f"bad redis url: {_scrub(str(exc), secrets)}") from None
        if db is not None:
            options["db"] = db  # an explicit param beats the URL's /N
        host = f"{options.get('host', 'localhost')}:{options.get('port', 6379)}"
        where = options.get("path") or host
        name = f"{urlsplit(raw).scheme}://{where}/{options.get('db', 0)}"
        return cls(options, name, secrets)

    @property
    def db(self) -> int:
        return int(self.options.get("db", 0))

    def scrub(self, text: str) -> str:
        return _scrub(text, self.secrets)


def _scrub(text: str, secrets: tuple[str, ...]) -> str:
    # Longest first: the whole URL goes before the password inside it.
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _failure(server: _Server, exc: RedisError) -> FunctionError:
    """A Redis error as a function error, naming the server but never its password."""
    message = f"{server.name}: {server.scrub(str(exc) or type(exc).__name__)}"
    if isinstance(exc, AuthenticationError | AuthorizationError | NoPermissionError):
        return PermanentError(message)  # retrying a refused login or command cannot help
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        return RetryableError(message)  # restarting, loading its dataset, network blip
    if isinstance(exc, ResponseError):
        return PermanentError(message)  # unknown/renamed command, bad DB index, OOM
    return RetryableError(message)


@asynccontextmanager
async def _connect(url: SecretStr, db: int | None = None) -> AsyncIterator[tuple[Redis, _Server]]:
    server = _Server.parse(url, db)
    # No client-level retries: the step's retry policy is the one place that decides.
    options = {"socket_connect_timeout": 10, **server.options, "retry": Retry(NoBackoff(), 0)}
    pool = ConnectionPool(**options)
    client = Redis.from_pool(pool)
    try:
        yield client, server
    except RedisError as exc:
        raise _failure(server, exc) from None  # `from None`: the chain may quote the URL
    finally:
        await client.aclose()


async def _call(client: Redis, *args: Any) -> Any:
    """One command; redis-py leaves ``execute_command`` unannotated, so type it once here."""
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


@asynccontextmanager
async def _closing(stream: AsyncIterator[_T]) -> AsyncIterator[AsyncIterator[_T]]:
    """Close a stream generator even when we stop early: an abandoned one would keep its
    S3 response or Redis connection open until garbage collection."""
    try:
        yield stream
    finally:
        if (close := getattr(stream, "aclose", None)) is not None:
            await close()


async def _until(ctx: Context, what: str, done: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``done`` with backoff (50 ms doubling to 1 s) while the step has time left."""
    delay, started = 0.05, time.monotonic()
    while not await done():
        if ctx.remaining() < delay + _MARGIN:
            waited = time.monotonic() - started
            # Permanent: a retry would meet the same slow save; the timeout is what to fix.
            raise PermanentError(f"{what} after {waited:.1f}s; give the step a longer timeout")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


# --- redis.bgsave ------------------------------------------------------------------------


class BgsaveParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: SecretStr  # redis://[user:password@]host:port, rediss://..., unix:///path


class BgsaveResult(BaseModel):
    lastsave: int  # LASTSAVE after our save: Unix seconds
    rdb_last_bgsave_status: str
    duration: float  # seconds from our BGSAVE to its end
    waited: float  # seconds spent first waiting for a save or rewrite already running


async def _persistence(client: Redis) -> dict[str, Any]:
    info: dict[str, Any] = await _call(client, "INFO", "persistence")
    return info


async def _no_child(client: Redis) -> bool:
    info = await _persistence(client)
    running = ("rdb_bgsave_in_progress", "aof_rewrite_in_progress", "module_fork_in_progress")
    return not any(int(info.get(name, 0)) for name in running)


async def _save_done(client: Redis) -> bool:
    return int((await _persistence(client))["rdb_bgsave_in_progress"]) == 0


async def _start_save(ctx: Context, client: Redis) -> int:
    """BGSAVE, first waiting out any save or rewrite already running; returns the server's
    clock (seconds) just before our BGSAVE.

    A save already in progress is not accepted as ours: it forked before we were called and
    may lack writes the application made just before the pre event.
    """
    while True:
        seconds, _ = await _call(client, "TIME")
        try:
            await _call(client, "BGSAVE")
        except ResponseError as exc:
            # "Background save already in progress" / "Another child process is active"
            if "in progress" not in str(exc) and "child process" not in str(exc):
                raise
        else:
            return int(seconds)
        await _until(ctx, "a save or rewrite was still running", lambda: _no_child(client))


@function("redis.bgsave")
async def bgsave(ctx: Context, p: BgsaveParams) -> BgsaveResult:
    """BGSAVE and wait until it ends; fail if it failed or LASTSAVE did not advance.

    Completion is read from INFO persistence, not LASTSAVE alone: LASTSAVE has one-second
    resolution (two saves in one second look alike) and a failed save never moves it.
    """
    async with _connect(p.url) as (client, server):
        called = time.monotonic()
        since = await _start_save(ctx, client)
        started = time.monotonic()
        await _until(ctx, "BGSAVE was still running", lambda: _save_done(client))
        info = await _persistence(client)
    status, lastsave = str(info["rdb_last_bgsave_status"]), int(info["rdb_last_save_time"])
    if status != "ok":
        # The reason (disk full, dir not writable, child killed) is only in the server log;
        # a retry forks a fresh save, which is cheap to try.
        raise RetryableError(f"{server.name}: BGSAVE failed (rdb_last_bgsave_status:{status})")
    if lastsave < since:
        raise RetryableError(f"{server.name}: BGSAVE ended but LASTSAVE did not advance")
    ctx.logger.info("BGSAVE on %s done, LASTSAVE %d", server.name, lastsave)
    return BgsaveResult(
        lastsave=lastsave,
        rdb_last_bgsave_status=status,
        duration=round(time.monotonic() - started, 3),
        waited=round(started - called, 3),
    )


# --- the export format -------------------------------------------------------------------


def _header(meta: dict[str, Any]) -> bytes:
    blob = json.dumps(meta, sort_keys=True).encode()
    return _HEADER.pack(MAGIC, VERSION, len(blob)) + blob


def _record(key: bytes, expire_at: int, payload: bytes) -> bytes:
    head = b"K" + _KEY_LEN.pack(len(key))
    return b"".join((head, key, _VALUE.pack(expire_at, len(payload)), payload))


@dataclass(frozen=True)
class _Entry:
    key: bytes
    expire_at: int
    payload: bytes


class _Reader:
    """Parses the format from a stream of chunks; only the current record is buffered."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = bytearray()
        self._pos = 0

    async def _exactly(self, size: int) -> bytes:
        while len(self._buffer) - self._pos < size:
            chunk = await anext(self._chunks, None)
            if chunk is None:
                raise PermanentError("the export is truncated (no end record)")
            # Compact only when refilling: dropping each record's bytes at once would move
            # the rest of the buffer once per record.
            del self._buffer[: self._pos]
            self._pos = 0
            self._buffer += chunk
        start, self._pos = self._pos, self._pos + size
        return bytes(self._buffer[start : self._pos])

    async def header(self) -> dict[str, Any]:
        magic, version, size = _HEADER.unpack(await self._exactly(_HEADER.size))
        if magic != MAGIC:
            raise PermanentError("not a snaphook Redis export (bad magic)")
        if version != VERSION:
            raise PermanentError(f"export format version {version} is not supported")
        try:
            meta: dict[str, Any] = json.loads(await self._exactly(size))
        except ValueError:
            raise PermanentError("corrupt export: the header is not JSON") from None
        return meta

    async def entries(self) -> AsyncIterator[_Entry]:
        count = 0
        while (tag := await self._exactly(1)) == b"K":
            (size,) = _KEY_LEN.unpack(await self._exactly(_KEY_LEN.size))
            key = await self._exactly(size)
            expire_at, length = _VALUE.unpack(await self._exactly(_VALUE.size))
            yield _Entry(key, expire_at, await self._exactly(length))
            count += 1
        if tag != b"E":
            raise PermanentError(f"corrupt export: unknown record tag {tag!r}")
        (expected,) = _COUNT.unpack(await self._exactly(_COUNT.size))
        if expected != count or await self._trailing():
            raise PermanentError(
                f"corrupt export: {count} records read, end record says {expected}"
            )

    async def _trailing(self) -> bool:
        if len(self._buffer) > self._pos:
            return True
        async for chunk in self._chunks:
            if chunk:
                return True
        return False


# --- redis.export ------------------------------------------------------------------------


class ExportParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: SecretStr
    to: str = Field(pattern=r"^s3://")  # s3://bucket/key, conventionally *.snap.gz
    db: int | None = Field(default=None, ge=0)  # default: the URL's /N, else 0
    match: str = "*"  # SCAN MATCH pattern
    count: int = Field(default=1000, ge=1, le=100_000)  # SCAN COUNT hint = keys per pipeline
    part_size: int = Field(default=DEFAULT_PART, ge=MIN_PART, le=5 * 1024**3)


class ExportResult(BaseModel):
    url: str
    keys: int
    vanished: int  # seen by SCAN but deleted or expired before DUMP
    bytes: int  # of the stored (compressed) object
    sha256: str  # of the stored object: `sha256sum` of the download matches it
    parts: int


@dataclass
class _Tally:
    keys: int = 0
    vanished: int = 0
    seen: set[int] = field(default_factory=set)

    def unseen(self, keys: list[bytes]) -> list[bytes]:
        """Drop keys SCAN already returned: it may repeat keys while the table shrinks.

        Only 128-bit digests of key names are kept (~70 bytes a key), never values.
        """
        fresh = []
        for key in keys:
            digest = int.from_bytes(hashlib.blake2b(key, digest_size=16).digest())
            if digest not in self.seen:
                self.seen.add(digest)
                fresh.append(key)
        return fresh


async def _dump_page(client: Redis, keys: list[bytes], tally: _Tally) -> bytes:
    """One round trip for a SCAN page: the server's clock, then DUMP and PTTL of each key."""
    pipe = client.pipeline(transaction=False)
    pipe.execute_command("TIME")
    for key in keys:
        pipe.execute_command("DUMP", key)
        pipe.execute_command("PTTL", key)
    (seconds, micros), *replies = await pipe.execute()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    out = bytearray()
    for key, payload, pttl in zip(keys, replies[0::2], replies[1::2], strict=True):
        if payload is None or pttl == -2:
            tally.vanished += 1
            continue
        out += _record(key, now_ms + pttl if pttl >= 0 else NO_EXPIRY, payload)
        tally.keys += 1
    return bytes(out)


async def _export_stream(
    client: Redis, server: _Server, p: ExportParams, tally: _Tally
) -> AsyncIterator[bytes]:
    version = (await _call(client, "INFO", "server"))["redis_version"]
    seconds, micros = await _call(client, "TIME")
    meta = {"redis_version": str(version), "db": server.db, "match": p.match}
    yield _header({**meta, "exported_at_ms": int(seconds) * 1000 + int(micros) // 1000})
    cursor = 0
    while True:
        cursor, keys = await _call(client, "SCAN", cursor, "MATCH", p.match, "COUNT", p.count)
        if fresh := tally.unseen(keys):
            yield await _dump_page(client, fresh, tally)
        if int(cursor) == 0:
            break
    yield b"E" + _COUNT.pack(tally.keys)


@function("redis.export")
async def export(ctx: Context, p: ExportParams) -> ExportResult:
    """Stream every key matching ``match`` in ``db`` (DUMP + expiry) through gzip to ``to``.

    Consistent per key, not as of one instant: keys written during the export are seen
    before or after the write. Pause writers first when that matters.
    """
    tally = _Tally()
    async with (
        _connect(p.url, p.db) as (client, server),
        _closing(_export_stream(client, server, p, tally)) as records,
    ):
        stored = await upload_stream(
            ctx, p.to, gzip_stream(records), part_size=p.part_size, content_type="application/gzip"
        )
    ctx.logger.info("exported %d keys of %s to %s", tally.keys, server.name, stored.url)
    return ExportResult(
        url=stored.url,
        keys=tally.keys,
        vanished=tally.vanished,
        bytes=stored.bytes,
        sha256=stored.sha256,
        parts=stored.parts,
    )


# --- redis.import ------------------------------------------------------------------------


class RenamePrefix(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: str = Field(alias="from")  # "" adds ``to`` in front of every key
    to: str


class ImportParams(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    url: SecretStr
    source: str = Field(alias="from", pattern=r"^s3://")
    db: int | None = Field(default=None, ge=0)  # default: the URL's /N, else 0
    replace: bool = False  # overwrite existing keys instead of failing with BUSYKEY
    rename_prefix: RenamePrefix | None = None  # keys starting with `from` get `to` instead
    batch: int = Field(default=1000, ge=1, le=100_000)  # RESTOREs per pipeline
    # The export step's sha256: known only once all is read, so a mismatch fails the step
    # after the restore (gzip's CRC and the end record catch corruption on the way).
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class ImportResult(BaseModel):
    url: str
    keys: int  # restored
    expired: int  # skipped: their TTL ran out between export and import
    renamed: int
    bytes: int  # of the object read
    sha256: str  # of the object read


@dataclass
class _Restorer:
    """RESTOREs entries in pipelined batches and keeps the counts."""

    client: Redis
    p: ImportParams
    server: _Server
    source_version: str
    keys: int = 0
    expired: int = 0
    renamed: int = 0
    busy: int = 0
    first_busy: bytes = b""
    pending: list[_Entry] = field(default_factory=list)
    pending_bytes: int = 0

    async def add(self, entry: _Entry) -> None:
        self.pending.append(self._renamed(entry))
        self.pending_bytes += len(entry.payload)
        if len(self.pending) >= self.p.batch or self.pending_bytes >= _RESTORE_BATCH_BYTES:
            await self.flush()

    def _renamed(self, entry: _Entry) -> _Entry:
        rule = self.p.rename_prefix
        if rule is None or not entry.key.startswith(old := rule.from_.encode()):
            return entry
        self.renamed += 1
        return _Entry(rule.to.encode() + entry.key[len(old) :], entry.expire_at, entry.payload)

    async def flush(self) -> None:
        entries, self.pending, self.pending_bytes = self.pending, [], 0
        seconds, micros = await _call(self.client, "TIME")
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        # Expired entries are skipped here, not left to RESTORE: Redis would answer OK for
        # them and, with REPLACE, delete the target's key of that name.
        live = [e for e in entries if e.expire_at == NO_EXPIRY or e.expire_at > now_ms]
        self.expired += len(entries) - len(live)
        if not live:
            return
        pipe = self.client.pipeline(transaction=False)
        for entry in live:
            args: list[Any] = [entry.key, max(entry.expire_at, 0), entry.payload]
            args += ["REPLACE"] if self.p.replace else []
            args += ["ABSTTL"] if entry.expire_at != NO_EXPIRY else []  # absolute Unix ms
            pipe.execute_command("RESTORE", *args)
        for entry, answer in zip(live, await pipe.execute(raise_on_error=False), strict=True):
            self._account(entry, answer)

    def _account(self, entry: _Entry, answer: Any) -> None:
        if not isinstance(answer, Exception):
            self.keys += 1
            return
        if str(answer).startswith("BUSYKEY"):
            # Keep going: the error can then name every conflict, and a re-run with
            # replace completes the import.
            self.busy += 1
            self.first_busy = self.first_busy or entry.key
            return
        hint = ""
        if "payload version" in str(answer):
            hint = f" (exported from Redis {self.source_version}; DUMP payloads restore only"
            hint += " into the same or a newer version)"
        refused = self.server.scrub(str(answer))
        raise PermanentError(
            f"{self.server.name}: RESTORE {_show(entry.key)}: {refused}{hint} "
            f"({self.keys} keys restored before)"
        )

    def interrupted(self, exc: RedisError) -> None:
        """A lost connection is retryable, unless keys were restored without ``replace``:
        a retry would then fail on its own keys with BUSYKEY."""
        if self.keys and not self.p.replace:
            raise PermanentError(
                f"{self.server.name}: connection lost after {self.keys} keys were restored "
                f"({self.server.scrub(str(exc))}); import again with replace: true"
            ) from None

    def check_busy(self) -> None:
        if self.busy:
            raise PermanentError(
                f"{self.server.name}: {self.busy} keys already existed and were not restored "
                f"(first: {_show(self.first_busy)}); {self.keys} keys were restored; "
                "import with replace: true to overwrite"
            )


def _show(key: bytes, limit: int = 100) -> str:
    """A key name for a message: readable, binary-safe, bounded."""
    text = key[:limit].decode("utf-8", "backslashreplace")
    return repr(text + ("..." if len(key) > limit else ""))


@dataclass
class _Digest:
    """sha256 and size of the object as it is read."""

    sha256: Any = field(default_factory=hashlib.sha256)
    size: int = 0

    async def through(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            self.sha256.update(chunk)
            self.size += len(chunk)
            yield chunk


async def _restore(p: ImportParams, reader: _Reader, source_version: str) -> _Restorer:
    async with _connect(p.url, p.db) as (client, server):
        restorer = _Restorer(client, p, server, source_version)
        try:
            async with _closing(reader.entries()) as entries:
                async for entry in entries:
                    await restorer.add(entry)
            await restorer.flush()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            restorer.interrupted(exc)
            raise
    return restorer


@function("redis.import")
async def import_(ctx: Context, p: ImportParams) -> ImportResult:
    """RESTORE an export into ``db`` with each key's remaining TTL.

    Existing keys fail the step with BUSYKEY unless ``replace`` is set; all other keys
    are restored all the same, so a re-run with ``replace: true`` completes the import.
    """
    digest = _Digest()
    async with (
        _closing(download_stream(ctx, p.source)) as raw,
        _closing(digest.through(raw)) as hashed,
        _closing(gunzip_stream(hashed)) as plain,
    ):
        reader = _Reader(plain)
        try:
            # The header first: a wrong object fails before anything touches the target.
            meta = await reader.header()
            restorer = await _restore(p, reader, str(meta.get("redis_version", "?")))
        except zlib.error:
            raise PermanentError(f"{p.source} is not a valid gzip stream") from None
    restorer.check_busy()
    sha256 = digest.sha256.hexdigest()
    if p.sha256 is not None and sha256 != p.sha256:
        raise PermanentError(f"{p.source}: sha256 {sha256} is not the expected {p.sha256}")
    ctx.logger.info("restored %d keys into %s", restorer.keys, restorer.server.name)
    return ImportResult(
        url=p.source,
        keys=restorer.keys,
        expired=restorer.expired,
        renamed=restorer.renamed,
        bytes=digest.size,
        sha256=sha256,
    )
