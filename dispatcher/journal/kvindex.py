"""An in-memory index of one key-value bucket, kept current by a JetStream watch.

NATS KV has no secondary indexes, so "runs by status, newest first" or "open leases expired
by now" would mean reading every record. Instead each journal keeps a small summary of
every record (:class:`KvIndex`): it reads the latest value of each key once at start-up,
then follows every change through an ordered push consumer (the same mechanism as a KV
watch). Queries filter and sort the summaries in memory and fetch only the records they
return. The index is eventually consistent with other replicas' writes (typically a
millisecond behind) and exact for this process's own writes, which are applied as soon as
they are acknowledged.

:class:`ChangeFeed` fans the changes seen after start-up out to any number of iterators,
each with its own coalescing backlog: a slow reader holds one entry per distinct id, never
an unbounded queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from dispatcher.errors import JournalError

__all__ = ["ChangeFeed", "KvIndex"]

log = logging.getLogger("snaphook.journal")

M = TypeVar("M")

_KV_OPERATION: Final = "KV-Operation"  # header of delete and purge markers
_REMOVALS: Final = frozenset({"DEL", "PURGE"})
_HEARTBEAT: Final = 2.0  # seconds


class KvIndex(Generic[M]):
    """Latest summary (``M``) per key of one bucket.

    ``summarize`` turns a stored value into a summary; it may raise ``JournalError`` for an
    unreadable value, which is then left out (and logged). ``on_change`` is called with each
    summary that changed after the initial load.
    """

    def __init__(
        self,
        bucket: str,
        summarize: Callable[[bytes], M],
        on_change: Callable[[M], None] | None = None,
    ) -> None:
        self.bucket = bucket
        self._stream = f"KV_{bucket}"
        self._prefix = f"$KV.{bucket}."
        self._summarize = summarize
        self._on_change = on_change
        self._entries: dict[str, tuple[int, M]] = {}
        self._loaded_through = 0  # stream sequence the initial load must reach
        self._loaded = asyncio.Event()
        self._sub: JetStreamContext.PushSubscription | None = None
        self._js: JetStreamContext | None = None
        self._seen = 0  # stream sequence of the last change applied

    async def start(self, js: JetStreamContext, timeout: float) -> None:
        """Subscribe and return once every value stored before the call is indexed."""
        self._js = js
        info = await js.stream_info(self._stream)
        # The stream's last message is the latest of its key, so the load is complete when
        # that sequence (or a later one) has been seen.
        self._loaded_through = info.state.last_seq if info.state.messages else 0
        if self._loaded_through == 0:
            self._loaded.set()
        self._sub = await self._subscribe(api.ConsumerConfig(), api.DeliverPolicy.LAST_PER_SUBJECT)
        try:
            await asyncio.wait_for(self._loaded.wait(), timeout)
        except TimeoutError:
            await self.stop()
            raise JournalError(
                f"loading the index of bucket {self.bucket!r} took more than {timeout:g}s"
            ) from None

    async def resume(self) -> None:
        """Follow again from the first change not seen yet, on a new consumer: after a
        reconnect the server may have lost the old one (a restart), and nats-py would only
        notice after two missed heartbeats."""
        old, self._sub = self._sub, None
        if old is None:
            return  # not started, or stopped
        with contextlib.suppress(Exception):  # gone with the old connection, most likely
            await old.unsubscribe()
        start = api.ConsumerConfig(opt_start_seq=self._seen + 1)
        self._sub = await self._subscribe(start, api.DeliverPolicy.BY_START_SEQUENCE)

    async def _subscribe(
        self, config: api.ConsumerConfig, policy: api.DeliverPolicy
    ) -> JetStreamContext.PushSubscription:
        assert self._js is not None
        return await self._js.subscribe(
            f"{self._prefix}>",
            stream=self._stream,
            cb=self._receive,
            config=config,
            ordered_consumer=True,  # gap-free, re-created after stalls
            deliver_policy=policy,
            # Two missed heartbeats re-create the consumer, also when no reconnect told
            # us (nats-py's default, 5s, makes that 10-20s).
            idle_heartbeat=_HEARTBEAT,
        )

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # the connection may be gone already; nothing to undo
                log.debug("unsubscribing the %s index failed: %s", self.bucket, exc)

    def put(self, key: str, revision: int, summary: M) -> None:
        """Record a value this process wrote (or read) at ``revision``; older news is ignored."""
        current = self._entries.get(key)
        if current is None or current[0] < revision:
            self._entries[key] = (revision, summary)

    def values(self) -> Iterable[M]:
        return [summary for _, summary in self._entries.values()]

    async def _receive(self, msg: Msg) -> None:
        # Runs in the subscription's task: it must never raise, or the watch stops.
        try:
            self._apply(msg)
        except Exception:
            log.exception("index of bucket %s could not apply a change", self.bucket)

    def _apply(self, msg: Msg) -> None:
        revision = msg.metadata.sequence.stream
        self._seen = max(self._seen, revision)
        loaded = self._loaded.is_set()
        key = msg.subject.removeprefix(self._prefix)
        if msg.headers and msg.headers.get(_KV_OPERATION) in _REMOVALS:
            self._entries.pop(key, None)
        else:
            try:
                summary = self._summarize(msg.data)
            except JournalError as exc:
                log.warning("index of bucket %s skips key %s: %s", self.bucket, key, exc)
            else:
                self.put(key, revision, summary)
                if loaded and self._on_change is not None:
                    self._on_change(summary)
        if not loaded and revision >= self._loaded_through:
            self._loaded.set()


@dataclass(eq=False)
class _Reader:
    backlog: dict[str, None] = field(default_factory=dict)  # ordered set: coalesces repeats
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class ChangeFeed:
    """Ids published to every current reader, each id at most once per reader backlog."""

    def __init__(self) -> None:
        self._readers: set[_Reader] = set()
        self._closed = False

    def publish(self, item: str) -> None:
        for reader in self._readers:
            reader.backlog[item] = None
            reader.wake.set()

    def close(self) -> None:
        """End every iteration (after its backlog) and refuse new ones."""
        self._closed = True
        for reader in self._readers:
            reader.wake.set()

    async def items(self) -> AsyncIterator[str]:
        reader = _Reader()
        self._readers.add(reader)
        try:
            while True:
                while reader.backlog:
                    item = next(iter(reader.backlog))
                    del reader.backlog[item]
                    yield item
                if self._closed:
                    return
                reader.wake.clear()  # no await since the backlog was seen empty: no lost wake-up
                await reader.wake.wait()
        finally:
            self._readers.discard(reader)
