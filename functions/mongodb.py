"""``mongodb.*``: fsync lock/unlock around a snapshot, and a streaming logical export/import.

All four functions use pymongo's async driver (``AsyncMongoClient``), one short-lived client
per call.

**fsyncLock is not session-bound.** ``fsync {lock: true}`` locks the *server* against writes
until as many ``fsyncUnlock`` commands arrived as locks were taken, whoever sends them; the
lock outlives the client (and the dispatcher process) that took it. So ``fsync_lock`` holds
nothing in memory (no ``ctx.hold``): its lease's release function, ``fsync_unlock``, opens a
fresh connection, and the lease reaper can unlock after a dispatcher crash. ``fsync_unlock``
unlocks until the lock count reaches 0, because a lease cannot tell its lock from another:
a lock step retried after a lost answer holds two, and the safety property (no code path
leaves the database frozen) outranks a foreign lock holder.

``mongodb.export`` streams collections to S3 as BSON or JSONL objects with a manifest, and
``mongodb.import`` streams them back; the format and that streaming are described and
implemented in :mod:`functions.mongodb_export`. This module holds the four functions, their
parameters and results, and the connection they share.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pymongo import AsyncMongoClient
from pymongo.errors import (
    BulkWriteError,
    ConfigurationError,
    InvalidName,
    OperationFailure,
    PyMongoError,
)

from functions.mongodb_export import (
    ExportedCollection,
    Manifest,
    ManifestEntry,
    collections_to_export,
    databases_to_export,
    export_collection,
    import_collection,
    read_manifest,
    select_entries,
    write_manifest,
)
from functions.sdk import Context, FunctionError, PermanentError, RetryableError, function
from functions.storage import S3Url

Client = AsyncMongoClient[dict[str, Any]]

NOT_LOCKED = 20  # IllegalOperation: "fsyncUnlock called when not locked"
# Failures no retry can fix: bad input, refused credentials, conflicting data.
PERMANENT_CODES = frozenset({2, 9, 11, 13, 18, 20, 26, 59, 121, 11000})


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uri: SecretStr  # mongodb:// or mongodb+srv://, credentials included; never logged
    # Seconds to find the server and connect; the step's timeout bounds the whole call.
    connect_timeout: float = Field(default=30.0, gt=0, le=600)


class LockParams(_Params):
    pass


class LockResult(BaseModel):
    lock_count: int  # as the server reports it after our lock
    shared: bool  # lock_count > 1: another client holds a lock as well


class UnlockParams(_Params):
    lease: str = ""  # the lease being released; filled in by the dispatcher
    max_unlocks: int = Field(default=100, ge=1, le=10_000)  # bound on the unlock loop


class UnlockResult(BaseModel):
    unlocked: bool  # False: the server was not locked (nothing to do)
    unlocks: int  # fsyncUnlock commands that succeeded
    lock_count: int  # after the last one: 0
    reason: str = ""


# What mongod accepts as a database name (no path or namespace separators).
DatabaseName = Annotated[str, Field(pattern=r'^[^/\\. "$*<>:|?\x00]{1,63}$')]


def _names(value: Any) -> Any:
    """Templates render to strings: accept ``"a,b"`` for a list of names too."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class ExportParams(_Params):
    to: str = Field(min_length=6)  # s3://bucket/prefix; the export is written below it
    databases: list[DatabaseName] = Field(default_factory=list)  # empty: all but system ones
    # Empty: every collection of each database; else these, each of which must exist.
    collections: list[str] = Field(default_factory=list)
    format: Literal["bson", "jsonl"] = "bson"
    gzip: bool = True
    batch_size: int = Field(default=1000, ge=1, le=100_000)  # documents per getMore

    @field_validator("databases", "collections", mode="before")
    @classmethod
    def split_names(cls, value: Any) -> Any:
        return _names(value)


class ImportParams(_Params):
    from_: str = Field(alias="from", min_length=6)  # the manifest's URL, or the export prefix
    database: DatabaseName  # the target database
    source_database: DatabaseName | Literal[""] = ""  # which exported one; empty: the only one
    collections: list[str] = Field(default_factory=list)  # empty: all of them
    drop: bool = False  # drop each target collection first
    batch_size: int = Field(default=1000, ge=1, le=100_000)  # documents per insert_many
    bypass_document_validation: bool = False

    @field_validator("collections", mode="before")
    @classmethod
    def split_names(cls, value: Any) -> Any:
        return _names(value)


class CollectionObject(ExportedCollection):
    url: str


class ExportResult(BaseModel):
    url: str  # the manifest
    format: str
    compression: str
    count: int
    bytes: int
    collections: list[CollectionObject]


class ImportedCollection(BaseModel):
    collection: str
    source: str  # <database>.<collection> in the export
    count: int


class ImportResult(BaseModel):
    database: str
    count: int
    collections: list[ImportedCollection]


# --- connections and errors -----------------------------------------------------------


def _scrub(text: str, uri: str) -> str:
    """``text`` without the URI's password: driver messages may quote a URI they reject."""
    try:
        password = urlsplit(uri).password
    except ValueError:
        password = None
    for secret in filter(None, {uri, password, unquote(password or "")}):
        text = text.replace(secret, "***")
    return re.sub(r"(mongodb(?:\+srv)?://)[^@/\s]*@", r"\1***@", text)


def _failure(action: str, exc: PyMongoError, uri: str) -> FunctionError:
    code = exc.code if isinstance(exc, OperationFailure) else None
    message = str(exc)
    if isinstance(exc, BulkWriteError) and exc.details.get("writeErrors"):
        first = exc.details["writeErrors"][0]
        code, message = first.get("code"), str(first.get("errmsg", message))
    text = _scrub(f"{action}: {type(exc).__name__}: {message}", uri)[:1000]
    if isinstance(exc, ConfigurationError | InvalidName) or code in PERMANENT_CODES:
        return PermanentError(text)
    return RetryableError(text)  # network, server selection, elections, time limits


def _client(uri: str, millis: int) -> Client:
    # pymongo only warns about an invalid URI option and ignores it: `tls=ture` would
    # connect in plain text. Such a warning fails the call instead. (No await in here, so
    # no other coroutine runs while the warning filters are swapped.)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        client: Client = AsyncMongoClient(
            uri, appname="snaphook", serverSelectionTimeoutMS=millis, connectTimeoutMS=millis
        )
    problems = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if problems:
        # The client has not connected yet (the async client connects on first use).
        raise ConfigurationError("; ".join(problems))
    return client


@asynccontextmanager
async def _connect(ctx: Context, p: _Params, action: str) -> AsyncIterator[Client]:
    """A client for one call; driver errors inside the block become function errors."""
    uri = p.uri.get_secret_value()
    millis = int(1000 * min(p.connect_timeout, max(ctx.remaining(), 1.0)))
    try:
        client = _client(uri, millis)
    except (PyMongoError, ValueError, TypeError) as exc:  # the URI parser raises all three
        message = f"{action}: invalid connection string: {type(exc).__name__}: {exc}"
        raise PermanentError(_scrub(message, uri)[:1000]) from None
    try:
        yield client
    except PyMongoError as exc:
        raise _failure(action, exc, uri) from None
    finally:
        await client.close()


# --- fsync lock -----------------------------------------------------------------------


async def _fsync_locked(client: Client) -> bool:
    # mongod adds ``fsyncLock: true`` to any currentOp answer while locked; $ownOps keeps
    # the list of operations (which we do not need) short.
    reply = await client.admin.command({"currentOp": 1, "$ownOps": True})
    return bool(reply.get("fsyncLock", False))


@function("mongodb.fsync_lock")
async def fsync_lock(ctx: Context, p: LockParams) -> LockResult:
    """Flush to disk and block writes (``fsync {lock: true}``) until ``fsync_unlock``."""
    async with _connect(ctx, p, "fsync lock") as client:
        reply = await client.admin.command({"fsync": 1, "lock": True})
        count = int(reply.get("lockCount", 1))
        if not await _fsync_locked(client):
            raise RetryableError("fsync lock: answered ok, but currentOp shows no fsyncLock")
    if count > 1:
        # A foreign lock, or our own from an attempt whose answer was lost; either way
        # fsync_unlock unlocks them all.
        ctx.logger.warning("fsync lock count is %d: another lock is held too", count)
    else:
        ctx.logger.info("fsync-locked against writes")
    return LockResult(lock_count=count, shared=count > 1)


async def _unlock_all(client: Client, limit: int) -> tuple[int, int]:
    """Unlock until the count is 0, at most ``limit`` times: (unlocks done, count left)."""
    done, count = 0, -1
    while done < limit and count != 0:
        try:
            reply = await client.admin.command("fsyncUnlock")
        except OperationFailure as exc:
            if exc.code == NOT_LOCKED or "not locked" in str(exc):
                return done, 0
            raise
        done += 1
        count = int(reply.get("lockCount", 0))
    return done, max(count, 0)


@function("mongodb.fsync_unlock")
async def fsync_unlock(ctx: Context, p: UnlockParams) -> UnlockResult:
    """Unlock until the server accepts writes again; "not locked" is success, not an error."""
    async with _connect(ctx, p, "fsync unlock") as client:
        unlocks, count = await _unlock_all(client, p.max_unlocks)
        still_locked = count > 0 or await _fsync_locked(client)
    if still_locked:
        # Someone locks as fast as we unlock, or max_unlocks is too small: try again.
        raise RetryableError(f"fsync unlock: still locked after {unlocks} unlocks")
    if unlocks == 0:
        ctx.logger.info("not fsync-locked: nothing to unlock (lease %s)", p.lease or "-")
        return UnlockResult(unlocked=False, unlocks=0, lock_count=0, reason="not locked")
    ctx.logger.info("fsync-unlocked after %d unlock(s) (lease %s)", unlocks, p.lease or "-")
    return UnlockResult(unlocked=True, unlocks=unlocks, lock_count=0)


# --- export and import ----------------------------------------------------------------


@function("mongodb.export")
async def export(ctx: Context, p: ExportParams) -> ExportResult:
    """Stream collections to S3 as BSON or JSONL, one object each, then the manifest."""
    prefix = S3Url.parse(p.to.rstrip("/"))
    entries: list[ManifestEntry] = []
    async with _connect(ctx, p, "export") as client:
        for db_name in await databases_to_export(client, p.databases):
            db = client[db_name]
            for info in await collections_to_export(db, p.collections):
                entry = await export_collection(
                    ctx, db, info, prefix, fmt=p.format, gzip=p.gzip, batch_size=p.batch_size
                )
                entries.append(entry)
    manifest = Manifest(
        format=p.format,
        compression="gzip" if p.gzip else "none",
        created_at=datetime.now(UTC),
        collections=entries,
    )
    url = await write_manifest(ctx, prefix, manifest)
    return ExportResult(
        url=url,
        format=manifest.format,
        compression=manifest.compression,
        count=sum(entry.count for entry in entries),
        bytes=sum(entry.bytes for entry in entries),
        collections=[_stored_at(entry, prefix) for entry in entries],
    )


def _stored_at(entry: ManifestEntry, prefix: S3Url) -> CollectionObject:
    fields = entry.model_dump(include=set(ExportedCollection.model_fields))
    return CollectionObject(**fields, url=f"{prefix}/{entry.path}")


@function("mongodb.import")
async def import_(ctx: Context, p: ImportParams) -> ImportResult:
    """Stream an export back into ``database``: collections, documents, then indexes."""
    url = p.from_.rstrip("/")
    if not url.endswith(".json"):
        url += "/manifest.json"
    base = url.rsplit("/", 1)[0]
    manifest = await read_manifest(ctx, url)
    entries = select_entries(manifest, p.source_database, p.collections)
    imported: list[ImportedCollection] = []
    async with _connect(ctx, p, "import") as client:
        db = client[p.database]
        for entry in entries:
            count = await import_collection(
                ctx,
                db,
                manifest,
                entry,
                base,
                drop=p.drop,
                batch_size=p.batch_size,
                bypass_document_validation=p.bypass_document_validation,
            )
            source = f"{entry.database}.{entry.collection}"
            imported.append(
                ImportedCollection(collection=entry.collection, source=source, count=count)
            )
    return ImportResult(
        database=p.database, count=sum(c.count for c in imported), collections=imported
    )
