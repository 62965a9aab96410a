"""Accepted runs on a NATS JetStream stream, executed by whichever replica pulls them.

Layout, ``<p>`` being ``settings.nats_prefix`` (docs/scale-out.md has the operator's view):

* stream ``<p>_EVENTS`` (work-queue retention, subjects ``<p>.runs.>``): one message
  ``{"run_id": ...}`` per accepted run on ``<p>.runs.<run_id>``, published with a
  ``Nats-Msg-Id`` made of the event's (source, id), so an event redelivered within the
  duplicate window queues nothing more;
* durable pull consumer ``<p>_runners``, shared by every replica: explicit ack,
  ``ack_wait``, ``max_deliver``, ``max_ack_pending``;
* key-value bucket ``<p>_OWNERS``: ``run_id → {replica, seq}``, TTL ``ack_wait``, held
  by the replica executing the run (:mod:`dispatcher.run_owners`).

A message is acknowledged when its run is **final**, not when the phase is decided: the
queue never resumes runs from the journal (every replica would), so the unacknowledged
message is the only thing that brings a run back after its replica dies, and the
finalizers and lease releases after a decision need bringing back as much as the steps
before it. Long runs keep their message with ``in_progress`` heartbeats every third of
``ack_wait``.

A redelivery says only that the holder stopped heartbeating: usually it died, but it may
be alive and cut off from NATS for a while, and an event sent again after the duplicate
window is a second message for the same run. The runner fails a step it finds
``running`` as interrupted, which is right only if its replica is gone; so a replica
executes a run only once it holds the run's owner record (compare-and-set), which a live
owner refreshes with every heartbeat and a dead one lets expire. Whoever gets the message
of a run owned elsewhere holds it and waits for the record to expire or the run to end;
a second message for an owned run is acknowledged at once (the owner holds the first).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import nats.errors
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    Header,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.client import JetStreamContext
from nats.js.errors import BadRequestError, NotFoundError, ServiceUnavailableError

from dispatcher.errors import JournalError
from dispatcher.journal import Journal, RunRecord, StepRecord
from dispatcher.run_owners import Owner, RunOwners
from dispatcher.runner import Runner
from dispatcher.settings import Settings

log = logging.getLogger("snaphook.queue")

FETCH_WAIT = 1.0  # a pull request lingers this long; also how fast close() stops fetching
FETCH_BATCH = 64  # at most this many messages per pull, within the free run slots
RETRY_PAUSE = 1.0  # after a failed pull or watch, before the next one
SET_UP_ATTEMPTS = 3  # of creating the stream, consumer and bucket, on timeouts
STREAM_EXISTS = 10058  # "stream name already in use with a different configuration"


class QueueJournal(Journal, Protocol):
    """A journal on NATS that shares its connection and tells which runs changed."""

    @property
    def js(self) -> JetStreamContext: ...

    def watch_runs(self) -> AsyncIterator[str]:
        """Ids of runs whose record changed, on any replica, from now on."""
        ...


@dataclass(frozen=True)
class QueueConfig:
    prefix: str
    replicas: int  # of the stream and the owners bucket
    ack_wait: float
    dedup_window: float
    max_deliver: int
    max_ack_pending: int
    max_concurrent_runs: int  # of this replica

    @classmethod
    def from_settings(cls, settings: Settings) -> QueueConfig:
        return cls(
            prefix=settings.nats_prefix,
            replicas=settings.nats_replicas,
            ack_wait=settings.nats_ack_wait,
            dedup_window=settings.nats_dedup_window,
            max_deliver=settings.nats_max_deliver,
            max_ack_pending=settings.nats_max_ack_pending,
            max_concurrent_runs=settings.max_concurrent_runs,
        )

    @property
    def stream(self) -> str:
        return f"{self.prefix}_EVENTS"

    @property
    def consumer(self) -> str:
        return f"{self.prefix}_runners"

    @property
    def heartbeat(self) -> float:
        return self.ack_wait / 3

    def subject(self, run_id: str) -> str:
        return f"{self.prefix}.runs.{run_id}"


def message_id(source: str, event_id: str) -> str:
    """The dedup key of an event: a digest, as header values must be one short line."""
    return hashlib.sha256(json.dumps([source, event_id]).encode()).hexdigest()


@dataclass
class Delivery:
    """A message this replica holds: heartbeated until acked, naked or given up."""

    msg: Msg
    run_id: str
    seq: int  # stream sequence: the same for every redelivery of one message
    owner: Owner | None = None  # set while this replica owns the run
    execution: asyncio.Task[None] | None = None
    lost: bool = False  # the owner record went to another replica: hands off the message
    extra: list[Msg] = field(default_factory=list)  # later deliveries of the same message


class NatsQueue:
    """The :class:`dispatcher.queueing.RunQueue` of several replicas on one JetStream."""

    def __init__(self, journal: QueueJournal, config: QueueConfig) -> None:
        self._journal = journal
        self._config = config
        self._runner: Runner | None = None
        self._owners: RunOwners | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        self._held: dict[str, Delivery] = {}  # by run id
        self._handlers: set[asyncio.Task[None]] = set()
        self._notifications: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._slot_freed = asyncio.Event()
        self._closing = False

    # -- RunQueue ---------------------------------------------------------------------

    async def start(self, runner: Runner) -> int:
        """Create the stream, consumer and owners bucket (idempotently) and start pulling.

        Resumes nothing from the journal: every replica would. Unfinished runs come back
        as redeliveries of their unacknowledged messages.
        """
        self._runner = runner
        for attempt in range(1, SET_UP_ATTEMPTS + 1):
            try:
                await self._set_up(self._journal.js)
                break
            except (nats.errors.TimeoutError, ServiceUnavailableError) as exc:
                # A cluster busy electing leaders (replicas starting together): once more.
                if attempt == SET_UP_ATTEMPTS:
                    raise JournalError(f"NATS run queue {self._config.stream}: {exc}") from None
                log.warning("run queue set-up failed; retrying", extra={"error": str(exc)})
                await asyncio.sleep(RETRY_PAUSE)
            except nats.errors.Error as exc:
                raise JournalError(f"NATS run queue {self._config.stream}: {exc}") from None
        self._loops = [
            asyncio.create_task(self._fetch_loop(), name="nats queue fetch"),
            asyncio.create_task(self._heartbeat_loop(), name="nats queue heartbeat"),
            asyncio.create_task(self._watch_loop(), name="nats queue watch"),
        ]
        log.info(
            "run queue started",
            extra={"stream": self._config.stream, "consumer": self._config.consumer},
        )
        return 0

    async def enqueue(self, run: RunRecord, steps: list[StepRecord], *, created: bool) -> None:
        """Publish the run and wait for JetStream's acknowledgement (so before the 2xx).

        A duplicate (``created=False``) is published again: if the first publish was lost
        in a crash, this one queues the run; if not, JetStream drops it as a duplicate
        (within the window; after it, the consumer acknowledges the second message).
        """
        payload = json.dumps({"run_id": run.run_id}).encode()
        headers = {Header.MSG_ID.value: message_id(run.source, run.event_id)}
        try:
            await self._journal.js.publish(
                self._config.subject(run.run_id),
                payload,
                headers=headers,
                stream=self._config.stream,
            )
        except nats.errors.Error as exc:
            raise JournalError(f"cannot queue run {run.run_id} on NATS: {exc}") from None

    async def close(self, grace: float) -> None:
        """Stop pulling; let held runs finish for ``grace`` seconds; give the rest back."""
        self._closing = True
        self._slot_freed.set()
        await asyncio.gather(self._stop_fetching(), self._drain(grace))
        for task in [*self._loops, *self._notifications]:
            task.cancel()
        await asyncio.gather(*self._loops, *self._notifications, return_exceptions=True)
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
        if self._runner is not None:
            await self._runner.close(0)

    async def _stop_fetching(self) -> None:
        fetch = self._loops[0] if self._loops else None
        if fetch is None:
            return
        # The pull in flight expires within FETCH_WAIT; cancelling it instead could strand
        # a message sent to an inbox nobody reads any more, until ack_wait.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(fetch), FETCH_WAIT + 1)

    async def _drain(self, grace: float) -> None:
        handlers = list(self._handlers)
        if not handlers:
            return
        _, pending = await asyncio.wait(handlers, timeout=grace)
        for task in pending:
            task.cancel()  # gives its message back for another replica
        await asyncio.gather(*pending, return_exceptions=True)

    # -- set-up -------------------------------------------------------------------------

    async def _set_up(self, js: JetStreamContext) -> None:
        await self._ensure_stream(js)
        await self._ensure_consumer(js)
        self._owners = await RunOwners.open(
            js,
            f"{self._config.prefix}_OWNERS",
            ttl=self._config.ack_wait,
            replicas=self._config.replicas,
        )
        self._sub = await js.pull_subscribe_bind(
            durable=self._config.consumer, stream=self._config.stream
        )

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        """Create the stream, or adopt it: what an operator set (placement, limits) stays;
        the replicas and duplicate window become the configured ones."""
        name, subjects = self._config.stream, [f"{self._config.prefix}.runs.>"]
        for _ in range(2):  # a second pass if another replica created it meanwhile
            try:
                info = await js.stream_info(name)
            except NotFoundError:
                config = StreamConfig(
                    name=name,
                    description="snaphook: accepted runs, until final",
                    subjects=subjects,
                    retention=RetentionPolicy.WORK_QUEUE,
                    storage=StorageType.FILE,
                    num_replicas=self._config.replicas,
                    duplicate_window=self._config.dedup_window,
                )
                try:
                    await js.add_stream(config)
                except BadRequestError as exc:
                    if exc.err_code == STREAM_EXISTS:
                        continue
                    raise
                return
            current = info.config
            if current.retention != RetentionPolicy.WORK_QUEUE or current.subjects != subjects:
                raise JournalError(
                    f"stream {name} exists but is not snaphook's run queue (work-queue "
                    f"retention on {subjects[0]}); remove it or choose another nats_prefix"
                )
            wanted = current.evolve(
                num_replicas=self._config.replicas, duplicate_window=self._config.dedup_window
            )
            if wanted != current:
                await js.update_stream(wanted)
            return
        raise JournalError(f"stream {name} keeps changing while it is being created")

    async def _ensure_consumer(self, js: JetStreamContext) -> None:
        # Creating a durable consumer again updates what may change (ack_wait, limits).
        await js.add_consumer(
            self._config.stream,
            ConsumerConfig(
                durable_name=self._config.consumer,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self._config.ack_wait,
                max_deliver=self._config.max_deliver,
                max_ack_pending=self._config.max_ack_pending,
                filter_subject=f"{self._config.prefix}.runs.>",
            ),
        )

    # -- pulling ------------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        assert self._sub is not None
        while not self._closing:
            free = self._config.max_concurrent_runs - len(self._handlers)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                msgs = await self._sub.fetch(min(free, FETCH_BATCH), timeout=FETCH_WAIT)
            except TimeoutError:
                continue  # nothing queued
            except nats.errors.Error as exc:
                log.warning("pulling runs failed; retrying", extra={"error": str(exc)})
                await asyncio.sleep(RETRY_PAUSE)
                continue
            if self._closing:  # pulled while close() began: another replica takes them
                await asyncio.gather(*(_quietly(msg.nak()) for msg in msgs))
                return
            for msg in msgs:
                self._spawn(self._handlers, self._deliver(msg), done=self._slot_freed.set)

    def _spawn(
        self,
        tasks: set[asyncio.Task[None]],
        work: Awaitable[None],
        done: Callable[[], None] | None = None,
    ) -> None:
        task = asyncio.ensure_future(work)
        tasks.add(task)

        def finished(t: asyncio.Task[None]) -> None:
            tasks.discard(t)
            if done is not None:
                done()

        task.add_done_callback(finished)

    # -- one message ----------------------------------------------------------------------

    async def _deliver(self, msg: Msg) -> None:
        run_id = _run_id_of(msg)
        if run_id is None:
            log.error("unreadable run message dropped", extra={"subject": msg.subject})
            await _quietly(msg.term())
            return
        seq = msg.metadata.sequence.stream
        held = self._held.get(run_id)
        if held is not None:
            await self._again(held, msg, seq)
            return
        delivery = Delivery(msg, run_id, seq)
        self._held[run_id] = delivery
        try:
            await self._handle(delivery)
        except asyncio.CancelledError:
            if not delivery.lost:  # close(): another replica takes it from here
                await self._give_back(delivery, delay=None)
            raise
        except Exception:
            # NATS or the journal failed us: the message comes back a little later.
            log.exception("run message not handled; retrying", extra={"run_id": run_id})
            if not delivery.lost:
                await self._give_back(delivery, delay=self._config.heartbeat)
        finally:
            self._held.pop(run_id, None)

    async def _again(self, held: Delivery, msg: Msg, seq: int) -> None:
        if seq == held.seq:
            # Our own message, redelivered because a heartbeat did not arrive in time:
            # heartbeat both deliveries; the ack of either settles the message.
            held.extra.append(msg)
        else:
            # A second message for a run this replica holds: ours stays until final.
            await _quietly(msg.ack())

    async def _handle(self, delivery: Delivery) -> None:
        # No journal read first: the runner reads the run anyway and returns at once if it
        # is final already (a message sent again after the dedup window).
        if await self._take(delivery):
            await self._execute(delivery)

    async def _take(self, delivery: Delivery) -> bool:
        """Own the run, waiting while another live replica owns it; ``False``: done here."""
        assert self._owners is not None
        while True:
            owner, current = await self._owners.take(delivery.run_id, delivery.seq)
            if owner is not None:
                delivery.owner = owner
                return True
            if current is not None and current.seq != delivery.seq:
                # A second message for the run; its owner holds the first until final.
                await _quietly(delivery.msg.ack())
                return False
            # Its owner stopped heartbeating this very message (dead, or cut off from
            # NATS): keep the message and wait for the record to expire or the run to end.
            await asyncio.sleep(self._config.heartbeat / 2)
            run = await self._journal.get_run(delivery.run_id)
            if run is None or run.status.final:
                await _quietly(delivery.msg.ack())
                return False

    async def _execute(self, delivery: Delivery) -> None:
        assert self._runner is not None and delivery.owner is not None
        log.info(
            "run taken",
            extra={
                "run_id": delivery.run_id,
                "delivered": delivery.msg.metadata.num_delivered,
            },
        )
        execution = asyncio.create_task(self._runner.execute(delivery.run_id))
        delivery.execution = execution
        try:
            await execution
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not delivery.lost or (current is not None and current.cancelling()):
                raise  # close(): _deliver gives the message back
        if delivery.lost:
            log.warning("run lost to another replica", extra={"run_id": delivery.run_id})
            return  # the message is the new owner's now: neither ack nor nak it
        run = await self._journal.get_run(delivery.run_id)
        if run is not None and run.status.final:
            for msg in [delivery.msg, *delivery.extra]:
                await _quietly(msg.ack())
            await self._owners_release(delivery)
            return
        if run is None:
            # Journaled before it was published, so the journal lost it: tried again
            # later, dropped after max_deliver.
            log.warning("queued run not in the journal", extra={"run_id": delivery.run_id})
        # Given up here (a journal outage; a step claimed elsewhere): try again later.
        await self._give_back(delivery, delay=self._config.heartbeat)

    async def _give_back(self, delivery: Delivery, *, delay: float | None) -> None:
        await _quietly(delivery.msg.nak(delay=delay))
        await self._owners_release(delivery)

    async def _owners_release(self, delivery: Delivery) -> None:
        if self._owners is not None and delivery.owner is not None:
            await self._owners.release(delivery.owner)
            delivery.owner = None

    # -- heartbeats ---------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.heartbeat)
            held = list(self._held.values())
            await asyncio.gather(*(self._beat(d) for d in held), return_exceptions=True)

    async def _beat(self, delivery: Delivery) -> None:
        for msg in [delivery.msg, *delivery.extra]:
            await _quietly(msg.in_progress())
        if delivery.owner is None or self._owners is None:
            return
        refreshed = await self._owners.refresh(delivery.owner)
        if refreshed is None:
            return  # NATS unreachable: the record lives on until its TTL; next beat
        if not refreshed:
            # Cut off for longer than the TTL: another replica took the run over.
            delivery.lost = True
            delivery.owner = None
            if delivery.execution is not None:
                delivery.execution.cancel()

    # -- changes made by other replicas -------------------------------------------------

    async def _watch_loop(self) -> None:
        assert self._runner is not None
        runner = self._runner
        while True:
            try:
                async for run_id in self._journal.watch_runs():
                    self._spawn(self._notifications, runner.notify(run_id))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("watching runs failed; retrying", extra={"error": str(exc)})
            await asyncio.sleep(RETRY_PAUSE)


def _run_id_of(msg: Msg) -> str | None:
    try:
        body: Any = json.loads(msg.data)
    except ValueError:
        return None
    run_id = body.get("run_id") if isinstance(body, dict) else None
    return run_id if isinstance(run_id, str) and run_id else None


async def _quietly(ack: Awaitable[None]) -> None:
    """Send an ack/nak/heartbeat; a lost one is a redelivery later, never an error here."""
    try:
        await ack
    except nats.errors.Error as exc:
        log.warning("acknowledging a run message failed", extra={"error": str(exc)})
