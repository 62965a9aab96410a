"""NATS JetStream journal: runs, steps and leases in key-value buckets, shared by replicas.

Buckets (``<prefix>`` from the settings, each a JetStream stream ``KV_<bucket>``, history 1,
file storage, ``replicas`` copies; created idempotently at :meth:`NatsJournal.open`, and an
existing bucket's replica count is changed to the configured one)::

    <prefix>_events   sha256(source, event id) -> run id       the idempotency index
    <prefix>_runs     <run id>                 -> run record + its step plan
    <prefix>_steps    <run id>.<step name>     -> step record, once the step first changes
    <prefix>_leases   <lease id>               -> lease record

Ids that are not plain ``[A-Za-z0-9_-]+`` are escaped (``kvcodec.key_token``).

Exactly once, across replicas. Every conditional write is a revision-checked write: ``create``
(only if the key does not exist) or ``update`` with the revision that was read. Read-modify-
write (``update_run``, ``update_step``) retries on a conflict; compare-and-set
(``claim_step``, ``transition_lease``) re-reads and re-checks its condition, so exactly one
caller in any number of processes wins. Reads are not "direct gets": they go to the stream
leader, so a replica reads what another replica's acknowledged write left there.

Accepting an event, crash-safely. ``accept`` first creates the idempotency key (value: the
run id) -- exactly one caller wins it -- then creates the run record, which carries the
step plan (the initial step records, in blueprint order). The run record is the single
commit point: a run exists, with all its steps, once that one write is done, and readers
never see a half-accepted run. Step keys are written lazily, on a step's first change; a
missing step key reads as the plan's initial record. If a process dies (or its caller is
cancelled) after the index write but before the run write, the next ``accept`` of the same
(source, id) finds the index pointing at a missing run and writes that run itself, under the
indexed run id: the run record's ``create`` decides between it and a merely slow first
writer, so the run is written once, and whoever wrote it gets ``created=True`` (its
returned run carries the indexed run id, which may differ from the one it passed).
Nothing is ever written for a losing caller, so nothing needs cleaning up.

Queries. ``get_run``, ``find_run``, ``get_steps``, ``get_lease`` read the buckets (``get_steps``:
one read per step, concurrently; step plans are immutable and cached). ``list_runs``,
``unfinished_runs``, ``find_leases`` and ``expired_leases`` select from in-memory indexes
(``kvindex.KvIndex``) of the runs and leases buckets and then read the selected records,
re-checking the filter on the fresh values. Cost: start-up reads every run and lease record
once; memory is about 150 bytes per run and per lease (a million runs: ~150 MB per
replica); a query costs a scan of the summaries plus one read per returned record. The
indexes reflect this process's writes at once and other replicas' within the watch's
latency, so a listing may briefly miss another replica's newest change; every decision that
matters (claiming a step, releasing a lease) is a compare-and-set on the bucket itself.

Errors. Every NATS failure (no servers, timeouts, JetStream unavailable, a rejected bucket
configuration) surfaces as :class:`~dispatcher.errors.JournalError`; no NATS exception
type escapes. Server URLs in messages have their credentials removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Final, TypeVar

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from dispatcher.errors import JournalError
from dispatcher.journal import (
    LeaseRecord,
    LeaseStatus,
    RunRecord,
    RunStatus,
    StepRecord,
    StepStatus,
)
from dispatcher.journal.fields import LEASES, RUNS, STEPS, Body, some
from dispatcher.journal.jetstream import (
    NATS_ERRORS,
    Conflict,
    connect,
    describe,
    ensure_bucket,
    public_url,
    read,
    write,
)
from dispatcher.journal.kvcodec import (
    LeaseSummary,
    RunSummary,
    StoredRun,
    idempotency_key,
    key_token,
    lease_summary,
    pack,
    summarize_lease,
    summarize_run,
    unpack,
)
from dispatcher.journal.kvindex import ChangeFeed, KvIndex

__all__ = ["NatsJournal"]

log = logging.getLogger("snaphook.journal")

T = TypeVar("T")

_CAS_ATTEMPTS: Final = 64  # conflicting writes in a row before giving up
_FETCH_CONCURRENCY: Final = 64  # reads in flight per query
_PLAN_CACHE: Final = 4096  # step plans of recent runs (immutable once accepted)


@dataclass(frozen=True)
class _Buckets:
    events: KeyValue
    runs: KeyValue
    steps: KeyValue
    leases: KeyValue


async def _gather(calls: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run ``calls`` with bounded concurrency; on a failure the rest are cancelled."""
    gate = asyncio.Semaphore(_FETCH_CONCURRENCY)

    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await call()

    tasks = [asyncio.ensure_future(one(call)) for call in calls]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _owner(index: KeyValue.Entry) -> str:
    """The run id an idempotency key names."""
    try:
        return (index.value or b"").decode()
    except UnicodeDecodeError:
        raise JournalError("stored idempotency entry is not a run id") from None


class NatsJournal:
    """The :class:`~dispatcher.journal.Journal` on NATS JetStream key-value buckets.

    ``servers``: one URL, a comma-separated list or a list (a cluster's seed servers).
    ``nc``: an already connected client to use (and leave open) instead of connecting.
    The connection and JetStream context are public (:attr:`nc`, :attr:`js`) so that the
    JetStream run queue shares them.
    """

    def __init__(
        self,
        servers: list[str] | str,
        *,
        prefix: str = "snaphook",
        replicas: int = 1,
        nc: Client | None = None,
        timeout: float = 5.0,
    ) -> None:
        listed = servers.split(",") if isinstance(servers, str) else list(servers)
        self.servers = [s.strip() for s in listed if s.strip()]
        if not self.servers and nc is None:
            raise ValueError("no NATS server URL given")
        if not prefix or not all(c.isascii() and (c.isalnum() or c in "_-") for c in prefix):
            raise ValueError(f"NATS prefix must match [A-Za-z0-9_-]+, not {prefix!r}")
        if not 1 <= replicas <= 5:
            raise ValueError(f"replicas must be between 1 and 5, not {replicas}")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.prefix = prefix
        self.replicas = replicas
        self.timeout = timeout
        self._given_nc = nc
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._buckets: _Buckets | None = None
        self._state = "new"  # -> open -> closing -> closed
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._changes = ChangeFeed()
        self._runs = KvIndex(f"{prefix}_runs", summarize_run, self._run_changed)
        self._leases = KvIndex(f"{prefix}_leases", summarize_lease)
        self._plans: OrderedDict[str, list[Body]] = OrderedDict()
        self._resuming: asyncio.Task[None] | None = None

    # --- lifecycle

    @property
    def buckets(self) -> tuple[str, ...]:
        """Names of the key-value buckets this journal uses."""
        return tuple(f"{self.prefix}_{name}" for name in ("events", "runs", "steps", "leases"))

    @property
    def nc(self) -> Client:
        if self._nc is None:
            raise JournalError("journal is not open")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise JournalError("journal is not open")
        return self._js

    async def open(self) -> None:
        """Connect (unless given a connection), create or adopt the buckets, load indexes."""
        if self._state != "new":
            raise JournalError("journal was already opened")
        self._state = "opening"
        where = ", ".join(public_url(s) for s in self.servers) or "the given connection"
        try:
            self._nc = self._given_nc or await connect(
                self.servers, self.timeout, self._reconnected
            )
            self._js = self._nc.jetstream(timeout=self.timeout)
            events, runs, steps, leases = [
                await ensure_bucket(self._js, name, self.replicas) for name in self.buckets
            ]
            self._buckets = _Buckets(events, runs, steps, leases)
            for index in (self._runs, self._leases):
                await index.start(self._js, timeout=self.timeout * 12)
        except BaseException as exc:
            await self._shut()
            self._state = "closed"
            if isinstance(exc, NATS_ERRORS):
                message = f"cannot open the journal on NATS at {where}: {describe(exc)}"
                raise JournalError(message) from exc
            if isinstance(exc, JournalError):
                raise JournalError(f"cannot open the journal on NATS at {where}: {exc}") from None
            raise
        self._state = "open"

    async def close(self) -> None:
        """Let calls in progress finish, then stop the watches and close the connection
        (unless it was given). Idempotent."""
        if self._state in ("new", "closed"):
            self._state = "closed"
            return
        if self._state == "closing":
            await self._idle.wait()
            return
        self._state = "closing"
        await self._idle.wait()
        await self._shut()
        self._state = "closed"

    def _reconnected(self) -> None:
        if self._state == "open" and self._resuming is None:
            self._resuming = asyncio.ensure_future(self._resume())

    async def _resume(self) -> None:
        try:
            for index in (self._runs, self._leases):
                await index.resume()
        except NATS_ERRORS as exc:  # the heartbeat check re-creates the consumer later
            log.warning("journal indexes could not resume after a reconnect: %s", describe(exc))
        finally:
            self._resuming = None

    async def _shut(self) -> None:
        if self._resuming is not None:
            self._resuming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resuming
        self._changes.close()
        for index in (self._runs, self._leases):
            await index.stop()
        nc, self._nc, self._js, self._buckets = self._nc, None, None, None
        if nc is not None and nc is not self._given_nc:
            with contextlib.suppress(*NATS_ERRORS):
                await nc.close()

    @contextlib.asynccontextmanager
    async def _using(self, label: str) -> AsyncIterator[_Buckets]:
        """The buckets for one call, which close() waits for; NATS errors -> JournalError."""
        if self._state != "open" or self._buckets is None:
            state = "closed" if self._state in ("closing", "closed") else "not open"
            raise JournalError(f"journal is {state}")
        self._busy += 1
        self._idle.clear()
        try:
            yield self._buckets
        except NATS_ERRORS as exc:
            raise JournalError(f"journal {label} failed: {describe(exc)}") from exc
        finally:
            self._busy -= 1
            if self._busy == 0:
                self._idle.set()

    async def _retrying(self, label: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt`` until it does not hit a write conflict (jittered backoff)."""
        for n in range(_CAS_ATTEMPTS):
            try:
                return await attempt()
            except Conflict:
                await asyncio.sleep(random.uniform(0, min(0.05, 0.0005 * 2**n)))
        raise JournalError(f"journal {label} gave up: the record kept changing under it")

    # --- runs

    async def accept(self, run: RunRecord, steps: list[StepRecord]) -> tuple[RunRecord, bool]:
        if any(step.run_id != run.run_id for step in steps):
            raise ValueError(f"all steps must belong to run {run.run_id!r}")
        names = [step.name for step in steps]
        if len(set(names)) != len(names):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"duplicate step name(s): {', '.join(duplicates)}")
        body, plan = RUNS.dump(run), [STEPS.dump(step) for step in steps]
        pack("run", body, steps=plan)  # refuse what JSON cannot hold before writing anything
        key = idempotency_key(run.source, run.event_id)
        async with self._using("accept") as b:
            try:
                order = await b.events.create(key, run.run_id.encode())
                owner = run.run_id
            except Conflict:
                index = await read(b.events, key)
                if index is None or index.revision is None:
                    raise JournalError("the event's idempotency key changed; retry") from None
                owner, order = _owner(index), index.revision
                existing = await self._stored_run(b, owner)
                if existing is not None:
                    return await self._same_event(b, key, order, run, existing), False
            # The index names ``owner`` and its run record is missing: write it (the commit
            # point), as the first writer or in its place if it died before this write.
            body = {**body, "run_id": owner}
            plan = [{**step, "run_id": owner} for step in plan]
            stored = StoredRun(body, plan, order, 0)
            try:
                revision = await b.runs.create(key_token(owner), stored.pack(body))
            except Conflict:
                existing = await self._stored_run(b, owner)
                if existing is None:
                    raise JournalError(f"run {owner!r} changed while being accepted") from None
                return await self._same_event(b, key, order, run, existing), False
            self._runs.put(key_token(owner), revision, stored.summary())
            self._remember_plan(owner, plan)
            return RUNS.load(body), True

    async def _same_event(
        self, b: _Buckets, key: str, order: int, run: RunRecord, existing: StoredRun
    ) -> RunRecord:
        """The existing run if it is this event's; a run id reused for another event is a
        caller bug: the index entry is dropped (so a retry can succeed) and it fails."""
        stored = RUNS.load(existing.body)
        if (stored.source, stored.event_id) == (run.source, run.event_id):
            return stored
        # Best effort, revision-checked: only the entry that points at the wrong run.
        with contextlib.suppress(*NATS_ERRORS):
            await b.events.delete(key, last=order)
        raise JournalError(f"run id {stored.run_id!r} already belongs to another event")

    async def _stored_run(self, b: _Buckets, run_id: str) -> StoredRun | None:
        entry = await read(b.runs, key_token(run_id))
        if entry is None:
            return None
        stored = StoredRun.parse(entry.value, entry.revision or 0)
        self._remember_plan(run_id, stored.plan)
        return stored

    def _remember_plan(self, run_id: str, plan: list[Body]) -> None:
        self._plans[run_id] = plan
        self._plans.move_to_end(run_id)
        while len(self._plans) > _PLAN_CACHE:
            self._plans.popitem(last=False)

    async def get_run(self, run_id: str) -> RunRecord | None:
        async with self._using("get_run") as b:
            stored = await self._stored_run(b, run_id)
        return None if stored is None else RUNS.load(stored.body)

    async def find_run(self, source: str, event_id: str) -> RunRecord | None:
        async with self._using("find_run") as b:
            index = await read(b.events, idempotency_key(source, event_id))
            if index is None:
                return None
            stored = await self._stored_run(b, _owner(index))
        if stored is None:  # accepted half-way: not a run (yet)
            return None
        run = RUNS.load(stored.body)
        return run if (run.source, run.event_id) == (source, event_id) else None

    async def list_runs(
        self, *, limit: int = 50, status: RunStatus | None = None
    ) -> list[RunRecord]:
        if limit < 0:
            raise ValueError("limit must not be negative")
        wanted = None if status is None else RunStatus(status)

        def matches(current: RunStatus) -> bool:
            return wanted is None or current is wanted

        async with self._using("list_runs") as b:
            chosen = heapq.nlargest(
                limit,
                (s for s in self._runs.values() if matches(s.status)),
                key=lambda s: (s.created_at, s.order),
            )
            runs = await self._fetch_runs(b, chosen)
        return [run for run in runs if matches(run.status)]

    async def unfinished_runs(self) -> list[RunRecord]:
        async with self._using("unfinished_runs") as b:
            chosen = sorted(
                (s for s in self._runs.values() if not s.status.final),
                key=lambda s: (s.created_at, s.order),
            )
            runs = await self._fetch_runs(b, chosen)
        return [run for run in runs if not run.status.final]

    async def _fetch_runs(self, b: _Buckets, chosen: Iterable[RunSummary]) -> list[RunRecord]:
        found = await _gather([partial(self._stored_run, b, s.run_id) for s in chosen])
        runs = []
        for stored in found:
            if stored is not None:
                self._runs.put(key_token(stored.body["run_id"]), stored.revision, stored.summary())
                runs.append(RUNS.load(stored.body))
        return runs

    async def update_run(self, run_id: str, **changes: Any) -> None:
        encoded = RUNS.changes(changes)

        async def attempt() -> None:
            stored = await self._stored_run(b, run_id)
            if stored is None:
                raise JournalError(f"unknown run {run_id!r}")
            body = {**stored.body, **encoded, "updated_at": time.time()}
            revision = await write(b.runs, key_token(run_id), stored.pack(body), stored.revision)
            self._runs.put(key_token(run_id), revision, stored.summary(body))

        async with self._using("update_run") as b:
            await self._retrying("update_run", attempt)

    def _run_changed(self, summary: RunSummary) -> None:
        self._changes.publish(summary.run_id)

    async def watch_runs(self) -> AsyncIterator[str]:
        """Ids of runs whose record changes from now on, written by any replica (this one
        included): creations and updates, not the records that existed before.

        Changes come from the runs bucket's watch, so a replica that is not executing a run
        still learns that its decision landed, then reads it with :meth:`get_run`. Repeated
        changes of one run not yet consumed are coalesced into one id. Iteration ends when
        the journal closes. It starts listening when iteration starts: to wait for a
        milestone without a race, start iterating first, then read the run.
        """
        if self._state != "open":
            raise JournalError("journal is not open")
        async for run_id in self._changes.items():
            yield run_id

    # --- steps

    async def get_steps(self, run_id: str) -> list[StepRecord]:
        async with self._using("get_steps") as b:
            plan = await self._plan(b, run_id)
            if plan is None:
                return []
            entries = await _gather(
                [partial(read, b.steps, self._step_key(run_id, s["name"])) for s in plan]
            )
        return [
            STEPS.load(initial if entry is None else unpack("step", entry.value)["step"])
            for initial, entry in zip(plan, entries, strict=True)
        ]

    async def _plan(self, b: _Buckets, run_id: str) -> list[Body] | None:
        plan = self._plans.get(run_id)
        if plan is not None:
            return plan
        stored = await self._stored_run(b, run_id)
        return None if stored is None else stored.plan

    @staticmethod
    def _step_key(run_id: str, name: str) -> str:
        return f"{key_token(run_id)}.{key_token(name)}"

    async def _step(self, b: _Buckets, run_id: str, name: str) -> tuple[Body, int | None] | None:
        """A step's current body and revision (None: not written yet, the plan's initial
        record), or None for an unknown step."""
        entry = await read(b.steps, self._step_key(run_id, name))
        if entry is not None:
            return unpack("step", entry.value)["step"], entry.revision
        plan = await self._plan(b, run_id)
        initial = next((step for step in plan or [] if step["name"] == name), None)
        return None if initial is None else (initial, None)

    async def update_step(self, run_id: str, name: str, **changes: Any) -> None:
        encoded = STEPS.changes(some(changes))

        async def attempt() -> None:
            current = await self._step(b, run_id, name)
            if current is None:
                raise JournalError(f"unknown step {name!r} of run {run_id!r}")
            body, revision = current
            value = pack("step", {**body, **encoded})
            await write(b.steps, self._step_key(run_id, name), value, revision)

        async with self._using("update_step") as b:
            await self._retrying("update_step", attempt)

    async def claim_step(self, run_id: str, name: str, attempt: int, started_at: float) -> bool:
        async def once() -> bool:
            current = await self._step(b, run_id, name)
            if current is None:
                return False
            body, revision = current
            if body["status"] != StepStatus.PENDING.value or body["attempts"] >= attempt:
                return False
            claimed = {
                **body,
                "status": StepStatus.RUNNING.value,
                "attempts": int(attempt),
                "started_at": started if body.get("started_at") is None else body["started_at"],
            }
            value = pack("step", claimed)
            await write(b.steps, self._step_key(run_id, name), value, revision)
            return True

        started = float(started_at)
        async with self._using("claim_step") as b:
            return await self._retrying("claim_step", once)

    # --- leases

    async def put_lease(self, lease: LeaseRecord) -> None:
        # created_at 0.0 means unset, as in SQLite.
        body = LEASES.dump(replace(lease, created_at=lease.created_at or time.time()))
        value = pack("lease", body)
        key = key_token(lease.lease_id)
        async with self._using("put_lease") as b:
            try:
                revision = await b.leases.create(key, value)
            except Conflict:
                raise JournalError(f"lease {lease.lease_id!r} already exists") from None
        self._leases.put(key, revision, lease_summary(body))

    async def get_lease(self, lease_id: str) -> LeaseRecord | None:
        async with self._using("get_lease") as b:
            found = await self._lease(b, lease_id)
        return None if found is None else LEASES.load(found[0])

    async def _lease(self, b: _Buckets, lease_id: str) -> tuple[Body, int] | None:
        key = key_token(lease_id)
        entry = await read(b.leases, key)
        if entry is None or entry.revision is None:
            return None
        body: Body = unpack("lease", entry.value)["lease"]
        self._leases.put(key, entry.revision, lease_summary(body))
        return body, entry.revision

    async def find_leases(
        self,
        *,
        target: str | None = None,
        run_id: str | None = None,
        status: LeaseStatus | None = None,
    ) -> list[LeaseRecord]:
        wanted = None if status is None else LeaseStatus(status)

        def matches(s: LeaseSummary) -> bool:
            return (
                (target is None or s.target == target)
                and (run_id is None or s.run_id == run_id)
                and (wanted is None or s.status is wanted)
            )

        return await self._select_leases(
            "find_leases", matches, lambda s: (s.created_at, s.lease_id)
        )

    async def expired_leases(self, now: float) -> list[LeaseRecord]:
        now = float(now)

        def matches(s: LeaseSummary) -> bool:
            return s.status is LeaseStatus.OPEN and s.expires_at <= now

        return await self._select_leases(
            "expired_leases", matches, lambda s: (s.expires_at, s.created_at, s.lease_id)
        )

    async def _select_leases(
        self,
        label: str,
        matches: Callable[[LeaseSummary], bool],
        order: Callable[[LeaseSummary], tuple[Any, ...]],
    ) -> list[LeaseRecord]:
        """Leases matching in the index, read fresh and matched again, in ``order``
        (insertion order is not kept by the bucket: ties go by lease id)."""
        async with self._using(label) as b:
            chosen = sorted((s for s in self._leases.values() if matches(s)), key=order)
            found = await _gather([partial(self._lease, b, s.lease_id) for s in chosen])
        fresh = [(body, lease_summary(body)) for body, _ in filter(None, found)]
        return [LEASES.load(body) for body, summary in fresh if matches(summary)]

    async def transition_lease(self, lease_id: str, expected: LeaseStatus, **changes: Any) -> bool:
        encoded = LEASES.changes(some(changes))
        expected_value = LeaseStatus(expected).value
        key = key_token(lease_id)

        async def once() -> bool:
            found = await self._lease(b, lease_id)
            if found is None or found[0]["status"] != expected_value:
                return False
            body = {**found[0], **encoded}
            revision = await write(b.leases, key, pack("lease", body), found[1])
            self._leases.put(key, revision, lease_summary(body))
            return True

        async with self._using("transition_lease") as b:
            return await self._retrying("transition_lease", once)
