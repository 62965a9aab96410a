"""The export format of ``mongodb.export`` / ``mongodb.import``, and the streaming of
collections into it and back out of it. The functions themselves, their parameters and
the connection they run on are in :mod:`functions.mongodb`.

``mongodb.export`` writes below its ``to`` prefix, ``mongodb.import`` reads::

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
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from urllib.parse import quote

from bson import json_util
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.errors import BSONError
from bson.raw_bson import RawBSONDocument
from pydantic import BaseModel, ValidationError
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure

from functions.procstream import gunzip_stream, gzip_stream
from functions.sdk import Context, PermanentError
from functions.storage import S3Url, download_stream, upload_stream

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
NAMESPACE_EXISTS = 48


class ExportedCollection(BaseModel):
    database: str
    collection: str
    count: int
    bytes: int
    sha256: str  # of the object as stored (compressed, if gzip)


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


# --- export ---------------------------------------------------------------------------


def _to_ejson(value: Any) -> Any:
    return json.loads(json_util.dumps(value, json_options=EJSON))


def _from_ejson(value: Any) -> Any:
    return json_util.loads(json.dumps(value), json_options=EJSON)


async def databases_to_export(
    client: AsyncMongoClient[dict[str, Any]], wanted: list[str]
) -> list[str]:
    present = await client.list_database_names()
    if not wanted:
        return sorted(name for name in present if name not in SYSTEM_DATABASES)
    missing = [name for name in wanted if name not in present]
    if missing:
        raise PermanentError(f"export: no database {', '.join(missing)} on the server")
    return wanted


async def collections_to_export(db: AsyncDatabase[dict[str, Any]], wanted: list[str]) -> list[Any]:
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


async def export_collection(
    ctx: Context,
    db: AsyncDatabase[dict[str, Any]],
    info: Any,
    prefix: S3Url,
    *,
    fmt: Literal["bson", "jsonl"],
    gzip: bool,
    batch_size: int,
) -> ManifestEntry:
    """Stream one collection (``info`` from :func:`collections_to_export`) to its object."""
    name = info["name"]
    codec: CodecOptions[Any] = RAW if fmt == "bson" else DECODED
    coll: AsyncCollection[Any] = db.get_collection(name, codec_options=codec)
    indexes = [dict(index) async for index in await db[name].list_indexes()]
    path = _object_key(db.name, name, fmt, gzip)
    tally = _Tally()
    kind = "application/gzip" if gzip else "application/octet-stream"
    # aclosing: a failed upload closes the cursor now, while the client is still open.
    async with aclosing(_documents_bytes(coll, fmt, batch_size, tally)) as chunks:
        body = gzip_stream(chunks) if gzip else chunks
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


async def write_manifest(ctx: Context, prefix: S3Url, manifest: Manifest) -> str:
    """Upload the manifest, after every collection's object; returns its URL."""
    url = f"{prefix}/manifest.json"
    body = manifest.model_dump_json(indent=1).encode()
    await upload_stream(ctx, url, _one(body), content_type="application/json")
    return url


# --- import ---------------------------------------------------------------------------


async def read_manifest(ctx: Context, url: str) -> Manifest:
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


def select_entries(
    manifest: Manifest, source_database: str, collections: list[str]
) -> list[ManifestEntry]:
    """The entries of the collections to import: those named, else all of one database."""
    sources = sorted({entry.database for entry in manifest.collections})
    source = source_database
    if not source:
        if len(sources) > 1:
            raise PermanentError(
                f"import: the export holds {', '.join(sources)}: set source_database"
            )
        source = sources[0] if sources else ""
    elif source not in sources:
        raise PermanentError(f"import: the export holds no database {source}")
    entries = {e.collection: e for e in manifest.collections if e.database == source}
    missing = [name for name in collections if name not in entries]
    if missing:
        raise PermanentError(
            f"import: the export holds no collection {', '.join(missing)} in {source}"
        )
    return [entries[name] for name in collections or entries]


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
    coll: AsyncCollection[Any],
    docs: AsyncIterator[tuple[Any, int]],
    batch_size: int,
    bypass_document_validation: bool,
) -> int:
    batch: list[Any] = []
    size = inserted = 0
    async for doc, length in docs:
        batch.append(doc)
        size += length
        if len(batch) >= batch_size or size >= INSERT_BYTES:
            await coll.insert_many(batch, bypass_document_validation=bypass_document_validation)
            inserted += len(batch)
            batch, size = [], 0
    if batch:
        await coll.insert_many(batch, bypass_document_validation=bypass_document_validation)
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


async def import_collection(
    ctx: Context,
    db: AsyncDatabase[dict[str, Any]],
    manifest: Manifest,
    entry: ManifestEntry,
    base: str,
    *,
    drop: bool,
    batch_size: int,
    bypass_document_validation: bool,
) -> int:
    """Stream one collection of the export (``base``: where its manifest is) into ``db``:
    the collection, its documents, then its indexes. Returns the documents imported."""
    await _prepare(db, entry, drop)
    chunks = _verified(ctx, f"{base}/{entry.path}", entry)
    if manifest.compression == "gzip":
        chunks = gunzip_stream(chunks)
    parse = _bson_documents if manifest.format == "bson" else _jsonl_documents
    async with aclosing(parse(chunks)) as docs:  # a failed insert stops the download now
        count = await _insert_all(
            db[entry.collection], docs, batch_size, bypass_document_validation
        )
    if count != entry.count:
        raise PermanentError(
            f"import: {entry.collection}: {count} documents read, the manifest says {entry.count}"
        )
    await _create_indexes(db, entry)
    ctx.logger.info(
        "imported %s.%s into %s: %d documents", entry.database, entry.collection, db.name, count
    )
    return count
