"""Restoring the entries of a ``redis.export`` into a server, for ``redis.import``.

Entries are RESTOREd in pipelined batches (bounded in count and payload bytes) with their
absolute expiry, checked against the target's clock; keys that already exist are counted
and named at the end instead of stopping the import half-way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from functions.redis_conn import Server, call
from functions.redis_format import NO_EXPIRY, Entry
from functions.sdk import PermanentError

_RESTORE_BATCH_BYTES = 8 * 1024 * 1024  # flush a RESTORE pipeline at this much payload


@dataclass
class Restorer:
    """RESTOREs entries in pipelined batches and keeps the counts."""

    client: Redis
    server: Server
    source_version: str
    batch: int  # RESTOREs per pipeline
    replace: bool  # overwrite existing keys instead of counting them as busy
    rename: tuple[bytes, bytes] | None  # keys starting with the first get the second instead
    keys: int = 0
    expired: int = 0
    renamed: int = 0
    busy: int = 0
    first_busy: bytes = b""
    pending: list[Entry] = field(default_factory=list)
    pending_bytes: int = 0

    async def add(self, entry: Entry) -> None:
        self.pending.append(self._renamed(entry))
        self.pending_bytes += len(entry.payload)
        if len(self.pending) >= self.batch or self.pending_bytes >= _RESTORE_BATCH_BYTES:
            await self.flush()

    def _renamed(self, entry: Entry) -> Entry:
        if self.rename is None or not entry.key.startswith(old := self.rename[0]):
            return entry
        self.renamed += 1
        return Entry(self.rename[1] + entry.key[len(old) :], entry.expire_at, entry.payload)

    async def flush(self) -> None:
        entries, self.pending, self.pending_bytes = self.pending, [], 0
        seconds, micros = await call(self.client, "TIME")
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
            args += ["REPLACE"] if self.replace else []
            args += ["ABSTTL"] if entry.expire_at != NO_EXPIRY else []  # absolute Unix ms
            pipe.execute_command("RESTORE", *args)
        for entry, answer in zip(live, await pipe.execute(raise_on_error=False), strict=True):
            self._account(entry, answer)

    def _account(self, entry: Entry, answer: Any) -> None:
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
        if self.keys and not self.replace:
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
