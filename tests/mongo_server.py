"""A protocol-level fake MongoDB server: a test double for the ``mongodb.*`` functions.

No MongoDB server can be installed on the development machines, so the tests run the real
driver (``pymongo.AsyncMongoClient``) against this small asyncio TCP server. It speaks the
wire protocol for real — OP_MSG (opcode 2013) framing with both section kinds, BSON from
the ``bson`` package that ships with pymongo — so the driver's handshake, serialisation,
cursor batching and error paths are all exercised. pymongo 4.20 sends even its first
handshake (``isMaster`` with ``helloOk``) as OP_MSG, so legacy OP_QUERY is not spoken: a
connection sending anything else is closed.

Behaviour copied from a real standalone mongod (maxWireVersion 21, i.e. MongoDB 7.0):

* ``fsync {lock: true}`` increments a lock count and answers ``{info, lockCount, seeAlso}``;
  ``fsyncUnlock`` decrements it, and with no lock answers IllegalOperation (code 20)
  ``"fsyncUnlock called when not locked"``. The lock belongs to the server, not to the
  connection: it outlives the client that took it, which is the point of the tests.
* While locked, writes (insert, create, createIndexes, drop) wait until the count is 0.
* ``currentOp`` carries ``fsyncLock: true`` only while locked.
* ``find`` answers a first batch of 101 documents by default, then ``getMore`` batches.
* Any login fails (AuthenticationFailed, code 18), as on a server with no such user.

Deliberately missing: query operators, sort, projection, updates, deletes, unique indexes
other than ``_id``, replica sets, compression, and checksums.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import bson
from bson.int64 import Int64
from bson.raw_bson import RawBSONDocument

OP_MSG = 2013
HEADER = struct.Struct("<iiii")  # messageLength, requestID, responseTo, opCode
MORE_TO_COME = 1 << 1  # the client expects no answer (unacknowledged write)
FIRST_BATCH = 101  # mongod's default size of a find's first batch
MAX_BATCH = 1000  # getMore without batchSize (mongod cuts at 16 MiB instead)
RAW = bson.CodecOptions(document_class=RawBSONDocument)

Reply = dict[str, Any]


class CommandError(Exception):
    """Answered as ``{ok: 0, errmsg, code, codeName}``, as mongod reports a failed command."""

    def __init__(self, code: int, name: str, message: str) -> None:
        super().__init__(message)
        self.reply = {"ok": 0.0, "errmsg": message, "code": code, "codeName": name}


@dataclass
class Collection:
    docs: list[RawBSONDocument] = field(default_factory=list)
    ids: set[bytes] = field(default_factory=set)  # encoded _id values, for duplicate keys
    options: dict[str, Any] = field(default_factory=dict)
    indexes: list[dict[str, Any]] = field(
        default_factory=lambda: [{"v": 2, "key": {"_id": 1}, "name": "_id_"}]
    )


@dataclass
class Cursor:
    ns: str
    docs: list[Any]
    position: int = 0

    def batch(self, size: int) -> list[Any]:
        chunk = self.docs[self.position : self.position + size]
        self.position += len(chunk)
        return chunk

    @property
    def exhausted(self) -> bool:
        return self.position >= len(self.docs)


class FakeMongo:
    """One in-memory standalone server on 127.0.0.1; ``await start()``, ``await close()``."""

    def __init__(self) -> None:
        self.databases: dict[str, dict[str, Collection]] = {}
        self.lock_count = 0
        self.blocked_writes = 0  # writes waiting for the fsync lock to go away
        self.commands: list[str] = []  # names of the commands received, in order
        # Open connections: id → the appname the client gave in its handshake.
        self.connections: dict[int, str] = {}
        self._unlocked = asyncio.Event()
        self._unlocked.set()
        self._cursors: dict[int, Cursor] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0
        self._handlers: dict[str, Callable[[dict[str, Any]], Awaitable[Reply]]] = {
            "hello": self._hello,
            "ismaster": self._hello,
            "ping": self._nothing,
            "endsessions": self._nothing,
            "buildinfo": self._build_info,
            "saslstart": self._login,
            "fsync": self._fsync,
            "fsyncunlock": self._fsync_unlock,
            "currentop": self._current_op,
            "listdatabases": self._list_databases,
            "listcollections": self._list_collections,
            "listindexes": self._list_indexes,
            "create": self._create,
            "createindexes": self._create_indexes,
            "drop": self._drop,
            "insert": self._insert,
            "find": self._find,
            "getmore": self._get_more,
            "killcursors": self._kill_cursors,
        }

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> FakeMongo:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):  # blocked writes would otherwise wait forever
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    def open_connections(self, app: str) -> int:
        return sum(1 for name in self.connections.values() if name == app)

    def collection(self, db: str, name: str) -> Collection:
        return self.databases.setdefault(db, {}).setdefault(name, Collection())

    # --- wire protocol ----------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn_id = next(self._ids)
        self.connections[conn_id] = ""
        try:
            while True:
                length, request_id, _, opcode = HEADER.unpack(await reader.readexactly(16))
                payload = await reader.readexactly(length - 16)
                if opcode != OP_MSG:
                    return  # not spoken here (see the module docstring): hang up
                flags, body, sequences = parse_op_msg(payload)
                reply = await self._command(conn_id, body, sequences)
                if not flags & MORE_TO_COME:
                    writer.write(encode_op_msg(next(self._ids), request_id, reply))
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client hung up
        finally:
            del self.connections[conn_id]
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _command(
        self, conn_id: int, body: dict[str, Any], sequences: dict[str, list[Any]]
    ) -> Reply:
        name = next(iter(body))
        self.commands.append(name)
        handler = self._handlers.get(name.lower())
        if "client" in body:  # the handshake names the application
            self.connections[conn_id] = body["client"].get("application", {}).get("name", "")
        try:
            if handler is None:
                raise CommandError(59, "CommandNotFound", f"no such command: '{name}'")
            reply = await handler({**body, **sequences})
        except CommandError as exc:
            return exc.reply
        except Exception as exc:  # a bug here: show it to the test, do not drop the connection
            return CommandError(8, "UnknownError", f"fake server: {exc!r}").reply
        return {**reply, "ok": 1.0}

    # --- server commands --------------------------------------------------------------

    async def _hello(self, cmd: dict[str, Any]) -> Reply:
        primary = "isWritablePrimary" if "hello" in cmd else "ismaster"
        return {
            primary: True,
            "helloOk": True,
            "maxBsonObjectSize": 16 * 1024 * 1024,
            "maxMessageSizeBytes": 48_000_000,
            "maxWriteBatchSize": 100_000,
            "localTime": datetime.now(UTC),
            "logicalSessionTimeoutMinutes": 30,
            "connectionId": 1,
            "minWireVersion": 0,
            "maxWireVersion": 21,
            "readOnly": False,
        }

    async def _nothing(self, cmd: dict[str, Any]) -> Reply:
        return {}

    async def _build_info(self, cmd: dict[str, Any]) -> Reply:
        return {"version": "7.0.0", "versionArray": [7, 0, 0, 0], "maxBsonObjectSize": 16 << 20}

    async def _login(self, cmd: dict[str, Any]) -> Reply:
        raise CommandError(18, "AuthenticationFailed", "Authentication failed.")

    async def _fsync(self, cmd: dict[str, Any]) -> Reply:
        if not cmd.get("lock"):
            return {"numFiles": 1}
        self.lock_count += 1
        self._unlocked.clear()
        return {
            "info": "now locked against writes, use db.fsyncUnlock() to unlock",
            "lockCount": Int64(self.lock_count),
            "seeAlso": "http://dochub.mongodb.org/core/fsynccommand",
        }

    async def _fsync_unlock(self, cmd: dict[str, Any]) -> Reply:
        if self.lock_count == 0:
            raise CommandError(20, "IllegalOperation", "fsyncUnlock called when not locked")
        self.lock_count -= 1
        if self.lock_count == 0:
            self._unlocked.set()
        return {"info": "fsyncUnlock completed", "lockCount": Int64(self.lock_count)}

    async def _current_op(self, cmd: dict[str, Any]) -> Reply:
        if self.lock_count == 0:
            return {"inprog": []}
        info = "use db.fsyncUnlock() to terminate the fsync write/snapshot lock"
        return {"inprog": [], "fsyncLock": True, "info": info}

    async def _writable(self) -> None:
        """Writes wait while the server is fsync-locked, as under mongod's global read lock."""
        self.blocked_writes += 1
        try:
            while self.lock_count > 0:
                await self._unlocked.wait()
        finally:
            self.blocked_writes -= 1

    # --- catalog ----------------------------------------------------------------------

    async def _list_databases(self, cmd: dict[str, Any]) -> Reply:
        names = sorted(self.databases)
        return {
            "databases": [{"name": n, "sizeOnDisk": 0, "empty": False} for n in names],
            "totalSize": 0,
        }

    async def _list_collections(self, cmd: dict[str, Any]) -> Reply:
        db = cmd["$db"]
        infos = [
            {"name": name, "type": "collection", "options": coll.options, "info": {}}
            for name, coll in self.databases.get(db, {}).items()
        ]
        wanted = cmd.get("filter") or {}
        infos = [i for i in infos if all(i.get(k) == v for k, v in wanted.items())]
        return self._open_cursor(f"{db}.$cmd.listCollections", infos, cmd.get("cursor", {}))

    async def _list_indexes(self, cmd: dict[str, Any]) -> Reply:
        coll = self._existing(cmd["$db"], cmd["listIndexes"])
        ns = f"{cmd['$db']}.{cmd['listIndexes']}"
        return self._open_cursor(ns, list(coll.indexes), cmd.get("cursor", {}))

    async def _create(self, cmd: dict[str, Any]) -> Reply:
        await self._writable()
        db, name = cmd["$db"], cmd["create"]
        if name in self.databases.get(db, {}):
            raise CommandError(48, "NamespaceExists", f"Collection {db}.{name} already exists.")
        ignored = {"create", "$db", "lsid", "$readPreference", "writeConcern"}
        self.collection(db, name).options = {k: v for k, v in cmd.items() if k not in ignored}
        return {}

    async def _create_indexes(self, cmd: dict[str, Any]) -> Reply:
        await self._writable()
        coll = self.collection(cmd["$db"], cmd["createIndexes"])
        before = len(coll.indexes)
        known = {index["name"] for index in coll.indexes}
        coll.indexes += [{"v": 2, **i} for i in cmd["indexes"] if i["name"] not in known]
        return {"numIndexesBefore": before, "numIndexesAfter": len(coll.indexes)}

    async def _drop(self, cmd: dict[str, Any]) -> Reply:
        await self._writable()
        db = self.databases.get(cmd["$db"], {})
        if db.pop(cmd["drop"], None) is None:
            raise CommandError(26, "NamespaceNotFound", "ns not found")
        return {"ns": f"{cmd['$db']}.{cmd['drop']}", "nIndexesWas": 1}

    def _existing(self, db: str, name: str) -> Collection:
        try:
            return self.databases[db][name]
        except KeyError:
            raise CommandError(26, "NamespaceNotFound", f"ns does not exist: {db}.{name}") from None

    # --- documents --------------------------------------------------------------------

    async def _insert(self, cmd: dict[str, Any]) -> Reply:
        await self._writable()
        coll = self.collection(cmd["$db"], cmd["insert"])
        inserted = 0
        for index, given in enumerate(cmd.get("documents", [])):
            doc = (
                given if isinstance(given, RawBSONDocument) else RawBSONDocument(bson.encode(given))
            )
            key = bson.encode({"_id": doc.get("_id")})
            if key in coll.ids:
                message = f"E11000 duplicate key error collection: {cmd['$db']}.{cmd['insert']}"
                error = {"index": index, "code": 11000, "errmsg": message}
                return {"n": inserted, "writeErrors": [error]}
            coll.ids.add(key)
            coll.docs.append(doc)
            inserted += 1
        return {"n": inserted}

    async def _find(self, cmd: dict[str, Any]) -> Reply:
        db, name = cmd["$db"], cmd["find"]
        docs = list(self.databases.get(db, {}).get(name, Collection()).docs)
        wanted = cmd.get("filter") or {}
        docs = [d for d in docs if all(d.get(k) == v for k, v in wanted.items())]
        if cmd.get("limit"):
            docs = docs[: cmd["limit"]]
        spec = {"batchSize": cmd.get("batchSize", FIRST_BATCH)}
        if cmd.get("singleBatch"):
            spec["batchSize"] = len(docs)
        return self._open_cursor(f"{db}.{name}", docs, spec)

    def _open_cursor(self, ns: str, docs: list[Any], spec: dict[str, Any]) -> Reply:
        cursor = Cursor(ns, docs)
        batch = cursor.batch(spec.get("batchSize", FIRST_BATCH))
        cursor_id = 0
        if not cursor.exhausted:
            cursor_id = next(self._ids)
            self._cursors[cursor_id] = cursor
        return {"cursor": {"id": Int64(cursor_id), "ns": ns, "firstBatch": batch}}

    async def _get_more(self, cmd: dict[str, Any]) -> Reply:
        cursor_id = int(cmd["getMore"])
        cursor = self._cursors.get(cursor_id)
        if cursor is None:
            raise CommandError(43, "CursorNotFound", f"cursor id {cursor_id} not found")
        batch = cursor.batch(cmd.get("batchSize") or MAX_BATCH)
        if cursor.exhausted:
            del self._cursors[cursor_id]
            cursor_id = 0
        return {"cursor": {"id": Int64(cursor_id), "ns": cursor.ns, "nextBatch": batch}}

    async def _kill_cursors(self, cmd: dict[str, Any]) -> Reply:
        ids = [int(i) for i in cmd["cursors"]]
        killed = [Int64(i) for i in ids if self._cursors.pop(i, None) is not None]
        missing = [Int64(i) for i in ids if i not in killed]
        return {"cursorsKilled": killed, "cursorsNotFound": missing, "cursorsAlive": []}


def parse_op_msg(payload: bytes) -> tuple[int, dict[str, Any], dict[str, list[Any]]]:
    """flagBits, the body (section kind 0) and document sequences (kind 1) by identifier.

    Sequence documents stay raw BSON, so inserted documents are stored byte for byte.
    """
    (flags,) = struct.unpack_from("<I", payload)
    position, body, sequences = 4, {}, {}
    while position < len(payload):
        kind = payload[position]
        position += 1
        (size,) = struct.unpack_from("<i", payload, position)
        if kind == 0:
            body = bson.decode(payload[position : position + size])
        else:
            end = payload.index(b"\0", position + 4)
            identifier = payload[position + 4 : end].decode()
            docs = payload[end + 1 : position + size]
            sequences[identifier] = bson.decode_all(docs, RAW)
        position += size
    return flags, body, sequences


def encode_op_msg(request_id: int, response_to: int, reply: Reply) -> bytes:
    body = b"\0\0\0\0" + b"\0" + bson.encode(reply)  # flagBits 0, one kind-0 section
    return HEADER.pack(16 + len(body), request_id, response_to, OP_MSG) + body
