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

**Export format** (``mongodb.export`` writes it, ``mongodb.import`` reads it), below the
``to`` prefix::

    <to>/manifest.json                  written last: what the export holds
    <to>/<db>/<collection>.bson[.gz]    format bson: the documents' BSON, concatenated
    <to>/<db>/<collection>.jsonl[.gz]   format jsonl: one canonical Extended JSON v2
                                        document per line (type-exact: Int64, Decimal128...)

A ``.bson`` object is the same byte stream as a mongodump ``.bson`` file. Collection names
are percent-encoded in keys. The manifest is JSON (see :class:`Manifest`): format,
compression and, per collection, its database, name, ``path`` relative to the manifest
(an export can be copied elsewhere and still import), document count, stored ``bytes`` and
``sha256`` (of the object as stored), and the collection ``options`` and ``indexes`` as
canonical Extended JSON. Views (no data of their own) are not exported, ``system.*``
collections only when named.

Documents stream from a cursor (``batch_size`` per getMore) through optional gzip into an
S3 multipart upload, and back through ``insert_many`` batches: never a whole collection in
memory. An export is point-in-time across collections only while writes are blocked (run
it under ``fsync_lock``); otherwise each collection is read as it is at that moment.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import quote, unquote, urlsplit

from bson import json_util
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.errors import BSONError
from bson.raw_bson import RawBSONDocument
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    BulkWriteError,
    ConfigurationError,
    InvalidName,
    OperationFailure,
    PyMongoError,
)

from functions.procstream import gunzip_stream, gzip_stream
from functions.sdk import Context, FunctionError, PermanentError, RetryableError, function
from functions.storage import S3Url, download_stream, upload_stream

Client = AsyncMongoClient[dict[str, Any]]

SYSTEM_DATABASES = frozenset({"admin", "config", "local"})
CHUNK = 256 * 1024  # documents are joined into chunks of about this size for the upload
INSERT_BYTES = 16 * 1024 * 1024  # an insert batch ends here even below batch_size
MAX_DOCUMENT = 16 * 1024 * 1024 + 16 * 1024  # BSON limit plus mongod's internal slack
MAX_MANIFEST = 64 * 1024 * 1024
# Canonical Extended JSON keeps every BSON type distinct (Int32/Int64/Double, Decimal128,
# binary subtypes); DATETIME_AUTO keeps dates outside Python's range instead of failing.
EJSON = json_util.CANONICAL_JSON_OPTIONS.with_options(
    datetime_conversion=DatetimeConversion.DATETIME_AUTO
)
DECODED: CodecOptions[dict[str, Any]] = CodecOptions(
    document_class=dict, datetime_conversion=DatetimeConversion.DATETIME_AUTO
)
RAW: CodecOptions[RawBSONDocument] = CodecOptions(document_class=RawBSONDocument)
NOT_LOCKED = 20  # IllegalOperation: "fsyncUnlock called when not locked"
NAMESPACE_EXISTS = 48
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


class ExportedCollection(BaseModel):
    database: str
    collection: str
    count: int
    bytes: int
    sha256: str  # of the object as stored (compressed, if gzip)


class CollectionObject(ExportedCollection):
    url: str


class ExportResult(BaseModel):
    url: str  # the manifest
    format: str
    compression: str
    count: int
    bytes: int
    collections: list[CollectionObject]


class ManifestEntry(ExportedCollection):
    path: str  # relative to the manifest
    options: dict[str, Any]  # canonical Extended JSON
    indexes: list[dict[str, Any]]  # canonical Extended JSON


class Manifest(BaseModel):
    kind: Literal["snaphook.mongodb.export"] = "snaphook.mongodb.export"
    version: Literal[1] = 1
    format: Literal["bson", "jsonl"]
    compression: Literal["gzip", "none"]
    created_at: datetime
    collections: list[ManifestEntry]


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


# --- export ---------------------------------------------------------------------------


def _to_ejson(value: Any) -> Any:
    return json.loads(json_util.dumps(value, json_options=EJSON))


def _from_ejson(value: Any) -> Any:
    return json_util.loads(json.dumps(value), json_options=EJSON)


async def _databases(client: Client, wanted: list[str]) -> list[str]:
    present = await client.list_database_names()
    if not wanted:
        return sorted(name for name in present if name not in SYSTEM_DATABASES)
    missing = [name for name in wanted if name not in present]
    if missing:
        raise PermanentError(f"export: no database {', '.join(missing)} on the server")
    return wanted


async def _collections(db: AsyncDatabase[dict[str, Any]], wanted: list[str]) -> list[Any]:
    """listCollections infos of the plain collections to export (views have no data)."""
    infos = {
        info["name"]: info
        async for info in await db.list_collections(filter={"type": "collection"})
    }
    if not wanted:
        return [infos[name] for name in sorted(infos) if not name.startswith("system.")]
    missing = [name for name in wanted if name not in infos]
    if missing:
        raise PermanentError(f"export: no collection {', '.join(missing)} in {db.name}")
    return [infos[name] for name in wanted]


@dataclass
class _Tally:
    count: int = 0


async def _documents_bytes(
    coll: AsyncCollection[Any], fmt: str, batch_size: int, tally: _Tally
) -> AsyncGenerator[bytes, None]:
    """The collection in export format, in chunks of about CHUNK bytes."""
    cursor = coll.find({}, batch_size=batch_size)
    pending: list[bytes] = []
    size = 0
    try:
        async for doc in cursor:
            data = doc.raw if fmt == "bson" else _jsonl(doc)
            pending.append(data)
            size += len(data)
            tally.count += 1
            if size >= CHUNK:
                yield b"".join(pending)
                pending, size = [], 0
    finally:
        await cursor.close()  # also when the upload fails mid-way
    if pending:
        yield b"".join(pending)


def _jsonl(doc: Mapping[str, Any]) -> bytes:
    return json_util.dumps(doc, json_options=EJSON).encode() + b"\n"


def _object_key(db: str, name: str, fmt: str, gzip: bool) -> str:
    return f"{db}/{quote(name, safe='')}.{fmt}" + (".gz" if gzip else "")


async def _export_collection(
    ctx: Context, db: AsyncDatabase[dict[str, Any]], info: Any, p: ExportParams, prefix: S3Url
) -> ManifestEntry:
    name = info["name"]
    codec: CodecOptions[Any] = RAW if p.format == "bson" else DECODED
    coll: AsyncCollection[Any] = db.get_collection(name, codec_options=codec)
    indexes = [dict(index) async for index in await db[name].list_indexes()]
    path = _object_key(db.name, name, p.format, p.gzip)
    tally = _Tally()
    kind = "application/gzip" if p.gzip else "application/octet-stream"
    # aclosing: a failed upload closes the cursor now, while the client is still open.
    async with aclosing(_documents_bytes(coll, p.format, p.batch_size, tally)) as chunks:
        body = gzip_stream(chunks) if p.gzip else chunks
        stored = await upload_stream(ctx, f"{prefix}/{path}", body, content_type=kind)
    ctx.logger.info(
        "exported %s.%s: %d documents, %d bytes", db.name, name, tally.count, stored.bytes
    )
    return ManifestEntry(
        database=db.name,
        collection=name,
        count=tally.count,
        bytes=stored.bytes,
        sha256=stored.sha256,
        path=path,
        options=_to_ejson(info.get("options", {})),
        indexes=_to_ejson(indexes),
    )


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


@function("mongodb.export")
async def export(ctx: Context, p: ExportParams) -> ExportResult:
    """Stream collections to S3 as BSON or JSONL, one object each, then the manifest."""
    prefix = S3Url.parse(p.to.rstrip("/"))
    entries: list[ManifestEntry] = []
    async with _connect(ctx, p, "export") as client:
        for db_name in await _databases(client, p.databases):
            db = client[db_name]
            for info in await _collections(db, p.collections):
                entries.append(await _export_collection(ctx, db, info, p, prefix))
    manifest = Manifest(
        format=p.format,
        compression="gzip" if p.gzip else "none",
        created_at=datetime.now(UTC),
        collections=entries,
    )
    url = f"{prefix}/manifest.json"
    body = manifest.model_dump_json(indent=1).encode()
    await upload_stream(ctx, url, _one(body), content_type="application/json")
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


# --- import ---------------------------------------------------------------------------


async def _read_manifest(ctx: Context, url: str) -> Manifest:
    data = bytearray()
    async for chunk in download_stream(ctx, url):
        data += chunk
        if len(data) > MAX_MANIFEST:
            raise PermanentError(f"import: {url} is too large for a manifest")
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as exc:
        count = exc.error_count()
        raise PermanentError(
            f"import: {url} is not a MongoDB export manifest ({count} problems)"
        ) from None


def _select(manifest: Manifest, p: ImportParams) -> list[ManifestEntry]:
    sources = sorted({entry.database for entry in manifest.collections})
    source = p.source_database
    if not source:
        if len(sources) > 1:
            raise PermanentError(
                f"import: the export holds {', '.join(sources)}: set source_database"
            )
        source = sources[0] if sources else ""
    elif source not in sources:
        raise PermanentError(f"import: the export holds no database {source}")
    entries = {e.collection: e for e in manifest.collections if e.database == source}
    missing = [name for name in p.collections if name not in entries]
    if missing:
        raise PermanentError(
            f"import: the export holds no collection {', '.join(missing)} in {source}"
        )
    return [entries[name] for name in p.collections or entries]


async def _verified(ctx: Context, url: str, entry: ManifestEntry) -> AsyncIterator[bytes]:
    """The object's bytes; at the end, a size or checksum other than the manifest's fails."""
    digest, size = hashlib.sha256(), 0
    async for chunk in download_stream(ctx, url):
        digest.update(chunk)
        size += len(chunk)
        yield chunk
    if (size, digest.hexdigest()) != (entry.bytes, entry.sha256):
        raise PermanentError(
            f"import: {url} does not match the manifest (sha256 or size differs): the export "
            f"is damaged; {entry.collection} is partly imported"
        )


Documents = AsyncGenerator[tuple[Any, int], None]  # (document, its encoded size)


async def _bson_documents(chunks: AsyncIterator[bytes]) -> Documents:
    """Concatenated BSON documents (each starts with its int32 length) as raw documents."""
    buffer = bytearray()
    async for chunk in chunks:
        buffer += chunk
        start = 0
        while len(buffer) - start >= 4:
            size = int.from_bytes(buffer[start : start + 4], "little")
            if not 5 <= size <= MAX_DOCUMENT:
                raise PermanentError(f"import: corrupt BSON stream (document length {size})")
            if len(buffer) - start < size:
                break
            yield RawBSONDocument(bytes(buffer[start : start + size])), size
            start += size
        del buffer[:start]
    if buffer:
        raise PermanentError("import: the BSON stream ends inside a document")


async def _jsonl_documents(chunks: AsyncIterator[bytes]) -> Documents:
    buffer = b""
    line_number = 0
    async for chunk in chunks:
        *lines, buffer = (buffer + chunk).split(b"\n")
        for line in lines:
            line_number += 1
            try:
                doc = json_util.loads(line.decode(), json_options=EJSON)
            except (ValueError, TypeError, BSONError):  # UnicodeDecodeError is a ValueError
                raise PermanentError(f"import: line {line_number} is not Extended JSON") from None
            yield doc, len(line)
    if buffer.strip():
        raise PermanentError("import: the JSONL stream ends inside a line")


async def _insert_all(
    coll: AsyncCollection[Any], docs: AsyncIterator[tuple[Any, int]], p: ImportParams
) -> int:
    batch: list[Any] = []
    size = inserted = 0
    async for doc, length in docs:
        batch.append(doc)
        size += length
        if len(batch) >= p.batch_size or size >= INSERT_BYTES:
            await coll.insert_many(batch, bypass_document_validation=p.bypass_document_validation)
            inserted += len(batch)
            batch, size = [], 0
    if batch:
        await coll.insert_many(batch, bypass_document_validation=p.bypass_document_validation)
        inserted += len(batch)
    return inserted


async def _prepare(db: AsyncDatabase[dict[str, Any]], entry: ManifestEntry, drop: bool) -> None:
    """Drop (if asked) and create the collection with its exported options."""
    if drop:
        await db.drop_collection(entry.collection)
    try:
        await db.command({"create": entry.collection, **_from_ejson(entry.options)})
    except OperationFailure as exc:
        if exc.code != NAMESPACE_EXISTS:  # importing into an existing collection is fine
            raise


async def _create_indexes(db: AsyncDatabase[dict[str, Any]], entry: ManifestEntry) -> None:
    # After the data: building an index once is cheaper than maintaining it per insert.
    specs = [
        {k: v for k, v in spec.items() if k not in ("v", "ns")}
        for spec in _from_ejson(entry.indexes)
        if spec.get("name") != "_id_"
    ]
    if specs:
        await db.command({"createIndexes": entry.collection, "indexes": specs})


async def _import_collection(
    ctx: Context,
    db: AsyncDatabase[dict[str, Any]],
    manifest: Manifest,
    entry: ManifestEntry,
    p: ImportParams,
    base: str,
) -> ImportedCollection:
    await _prepare(db, entry, p.drop)
    chunks = _verified(ctx, f"{base}/{entry.path}", entry)
    if manifest.compression == "gzip":
        chunks = gunzip_stream(chunks)
    parse = _bson_documents if manifest.format == "bson" else _jsonl_documents
    async with aclosing(parse(chunks)) as docs:  # a failed insert stops the download now
        count = await _insert_all(db[entry.collection], docs, p)
    if count != entry.count:
        raise PermanentError(
            f"import: {entry.collection}: {count} documents read, the manifest says {entry.count}"
        )
    await _create_indexes(db, entry)
    ctx.logger.info(
        "imported %s.%s into %s: %d documents", entry.database, entry.collection, db.name, count
    )
    return ImportedCollection(
        collection=entry.collection, source=f"{entry.database}.{entry.collection}", count=count
    )


@function("mongodb.import")
async def import_(ctx: Context, p: ImportParams) -> ImportResult:
    """Stream an export back into ``database``: collections, documents, then indexes."""
    url = p.from_.rstrip("/")
    if not url.endswith(".json"):
        url += "/manifest.json"
    base = url.rsplit("/", 1)[0]
    manifest = await _read_manifest(ctx, url)
    entries = _select(manifest, p)
    imported: list[ImportedCollection] = []
    async with _connect(ctx, p, "import") as client:
        db = client[p.database]
        for entry in entries:
            imported.append(await _import_collection(ctx, db, manifest, entry, p, base))
    return ImportResult(
        database=p.database, count=sum(c.count for c in imported), collections=imported
    )
