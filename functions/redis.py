"""Redis: a fresh RDB snapshot, and a streamed logical export/import of the keyspace.

``redis.bgsave`` gives a volume snapshot a ``dump.rdb`` as new as the pre event.
``redis.export`` / ``redis.import`` cover data that lives only in memory: each key is
DUMPed with its expiry and streamed through gzip to S3; the import RESTOREs the stream
into an empty instance, another DB number, or under another key prefix. Neither holds
more than one SCAN page of values in memory. Not for Redis Cluster (SCAN is per node).

This module holds the three functions; connecting is in :mod:`functions.redis_conn`, the
export's byte format in :mod:`functions.redis_format`, and the batched RESTORE of an
import in :mod:`functions.redis_restore`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from functions.procstream import gunzip_stream, gzip_stream
from functions.redis_conn import Server, call, connect
from functions.redis_format import NO_EXPIRY, Reader, end, header, record
from functions.redis_restore import Restorer
from functions.sdk import Context, PermanentError, RetryableError, function
from functions.storage import (
    DEFAULT_PART,
    MIN_PART,
    StreamTally,
    download_stream,
    upload_stream,
)

_T = TypeVar("_T")
_MARGIN = 0.25  # give up this long before the step's timeout, with a clearer message


# --- streams and polling -----------------------------------------------------------------


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
    info: dict[str, Any] = await call(client, "INFO", "persistence")
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
        seconds, _ = await call(client, "TIME")
        try:
            await call(client, "BGSAVE")
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
    async with connect(p.url) as (client, server):
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
        out += record(key, now_ms + pttl if pttl >= 0 else NO_EXPIRY, payload)
        tally.keys += 1
    return bytes(out)


async def _export_stream(
    client: Redis, server: Server, p: ExportParams, tally: _Tally
) -> AsyncIterator[bytes]:
    version = (await call(client, "INFO", "server"))["redis_version"]
    seconds, micros = await call(client, "TIME")
    meta = {"redis_version": str(version), "db": server.db, "match": p.match}
    yield header({**meta, "exported_at_ms": int(seconds) * 1000 + int(micros) // 1000})
    cursor = 0
    while True:
        cursor, keys = await call(client, "SCAN", cursor, "MATCH", p.match, "COUNT", p.count)
        if fresh := tally.unseen(keys):
            yield await _dump_page(client, fresh, tally)
        if int(cursor) == 0:
            break
    yield end(tally.keys)


@function("redis.export")
async def export(ctx: Context, p: ExportParams) -> ExportResult:
    """Stream every key matching ``match`` in ``db`` (DUMP + expiry) through gzip to ``to``.

    Consistent per key, not as of one instant: keys written during the export are seen
    before or after the write. Pause writers first when that matters.
    """
    tally = _Tally()
    async with (
        connect(p.url, p.db) as (client, server),
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


async def _restore(p: ImportParams, reader: Reader, source_version: str) -> Restorer:
    async with connect(p.url, p.db) as (client, server):
        rule = p.rename_prefix
        rename = None if rule is None else (rule.from_.encode(), rule.to.encode())
        restorer = Restorer(client, server, source_version, p.batch, p.replace, rename)
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
    digest = StreamTally()
    async with (
        _closing(download_stream(ctx, p.source)) as raw,
        _closing(digest.through(raw)) as hashed,
        _closing(gunzip_stream(hashed)) as plain,
    ):
        reader = Reader(plain)
        try:
            # The header first: a wrong object fails before anything touches the target.
            meta = await reader.header()
            restorer = await _restore(p, reader, str(meta.get("redis_version", "?")))
        except zlib.error:
            raise PermanentError(f"{p.source} is not a valid gzip stream") from None
    restorer.check_busy()
    sha256 = digest.sha256
    if p.sha256 is not None and sha256 != p.sha256:
        raise PermanentError(f"{p.source}: sha256 {sha256} is not the expected {p.sha256}")
    ctx.logger.info("restored %d keys into %s", restorer.keys, restorer.server.name)
    return ImportResult(
        url=p.source,
        keys=restorer.keys,
        expired=restorer.expired,
        renamed=restorer.renamed,
        bytes=digest.bytes,
        sha256=sha256,
    )
