"""The file format of ``redis.export`` / ``redis.import``: its writer and reader.

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

Only bytes here: no Redis connection and no gzip (the functions in :mod:`functions.redis`
add both).
"""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from functions.sdk import PermanentError

MAGIC = b"SHKREDIS"
VERSION = 1
NO_EXPIRY = -1
_HEADER = struct.Struct(">8sHI")  # magic, version, meta_len
_KEY_LEN = struct.Struct(">I")
_VALUE = struct.Struct(">qQ")  # expire_at, payload_len
_COUNT = struct.Struct(">Q")


def header(meta: dict[str, Any]) -> bytes:
    blob = json.dumps(meta, sort_keys=True).encode()
    return _HEADER.pack(MAGIC, VERSION, len(blob)) + blob


def record(key: bytes, expire_at: int, payload: bytes) -> bytes:
    head = b"K" + _KEY_LEN.pack(len(key))
    return b"".join((head, key, _VALUE.pack(expire_at, len(payload)), payload))


def end(count: int) -> bytes:
    """The end record: how many records came before it."""
    return b"E" + _COUNT.pack(count)


@dataclass(frozen=True)
class Entry:
    key: bytes
    expire_at: int
    payload: bytes


class Reader:
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

    async def entries(self) -> AsyncIterator[Entry]:
        count = 0
        while (tag := await self._exactly(1)) == b"K":
            (size,) = _KEY_LEN.unpack(await self._exactly(_KEY_LEN.size))
            key = await self._exactly(size)
            expire_at, length = _VALUE.unpack(await self._exactly(_VALUE.size))
            yield Entry(key, expire_at, await self._exactly(length))
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
