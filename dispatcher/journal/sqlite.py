"""SQLite journal: the embedded default backend.

One writer thread owns the connection and commits queued operations in groups (group
commit): concurrent callers share one fsync instead of paying one each, which is what makes
``synchronous=FULL`` affordable. Every operation runs in its own SAVEPOINT, so a failing one
(say, a duplicate lease id) is rolled back alone while the rest of its group commits. A
caller's future is resolved only after its group's COMMIT returned, so whatever a caller
was told succeeded survives a kill -9 (and, with FULL, a power loss).

Reads go through the same thread: simpler, and they always see every acknowledged write.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, Generic, Literal, TypeVar

from dispatcher.errors import JournalError
from dispatcher.journal import (
    LeaseRecord,
    LeaseStatus,
    RunRecord,
    RunStatus,
    StepRecord,
    StepStatus,
)
from dispatcher.journal.fields import LEASES, RUNS, STEPS, Encoder, RecordFields, optional, some

__all__ = ["SCHEMA_VERSION", "SQLiteJournal"]

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]

SCHEMA_VERSION: Final = 1

_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS runs (
        run_id TEXT PRIMARY KEY, source TEXT NOT NULL, event_id TEXT NOT NULL,
        type TEXT NOT NULL, subject TEXT NOT NULL, blueprint TEXT NOT NULL,
        failure_policy TEXT NOT NULL, status TEXT NOT NULL,
        created_at REAL NOT NULL, updated_at REAL NOT NULL,
        event TEXT NOT NULL, params TEXT NOT NULL, decision_timeout REAL,
        allowed INTEGER CHECK (allowed IN (0, 1)), reason TEXT NOT NULL DEFAULT '',
        UNIQUE (source, event_id))""",
    """CREATE TABLE IF NOT EXISTS steps (
        run_id TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
        name TEXT NOT NULL, position INTEGER NOT NULL, function TEXT NOT NULL,
        status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
        started_at REAL, finished_at REAL, outputs TEXT, error TEXT,
        PRIMARY KEY (run_id, name))""",
    """CREATE TABLE IF NOT EXISTS leases (
        lease_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, step TEXT NOT NULL,
        target TEXT NOT NULL, backup_id TEXT NOT NULL, release_function TEXT NOT NULL,
        release_with TEXT NOT NULL, context TEXT NOT NULL, expires_at REAL NOT NULL,
        status TEXT NOT NULL, created_at REAL NOT NULL, released_at REAL,
        released_by TEXT, error TEXT, release_outputs TEXT)""",
    # (status, created_at) serves both "runs by status" and its newest-first listing.
    "CREATE INDEX IF NOT EXISTS runs_status ON runs (status, created_at)",
    "CREATE INDEX IF NOT EXISTS runs_created ON runs (created_at DESC)",
    "CREATE INDEX IF NOT EXISTS leases_status_expiry ON leases (status, expires_at)",
    "CREATE INDEX IF NOT EXISTS leases_target ON leases (target)",
    "CREATE INDEX IF NOT EXISTS leases_run ON leases (run_id)",
)

R = TypeVar("R")


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


@dataclasses.dataclass(frozen=True)
class _Table(Generic[R]):
    """How a record maps to a table: its fields (:mod:`dispatcher.journal.fields`), the
    columns stored otherwise (JSON documents as text, the steps' position) and how to read
    those back."""

    name: str
    fields: RecordFields[R]
    columns: Mapping[str, Encoder] = dataclasses.field(default_factory=dict)
    read: Mapping[str, Encoder] = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def encode(self) -> dict[str, Encoder]:
        return {**self.fields.encode, **self.columns}

    @functools.cached_property
    def decode(self) -> dict[str, Encoder]:
        return {**self.fields.decode, **self.read}

    @property
    def insert(self) -> str:
        marks = ", ".join("?" for _ in self.encode)
        return f"INSERT INTO {self.name} ({', '.join(self.encode)}) VALUES ({marks})"

    def row(self, record: Any, **extra: Any) -> tuple[Any, ...]:
        # Encoding happens in the caller, so bad input raises there, not in the writer.
        return tuple(
            enc(extra[c] if c in extra else getattr(record, c)) for c, enc in self.encode.items()
        )

    def load(self, row: sqlite3.Row) -> R:
        pairs = zip(row.keys(), row, strict=True)
        values = {c: self.decode.get(c, lambda v: v)(v) for c, v in pairs}
        values.pop("position", None)  # steps: storage order only, not part of the record
        return self.fields.record(**values)

    def assignments(self, changes: dict[str, Any]) -> tuple[list[str], list[Any]]:
        """``["a = ?", ...]`` and encoded values. Only the record's settable field names are
        ever interpolated into SQL; anything else is a ValueError."""
        self.fields.check(changes)
        sets = [f"{c} = ?" for c in changes]
        return sets, [self.encode[c](v) for c, v in changes.items()]


_opt_json, _opt_loads = optional(_json), optional(json.loads)

_RUNS = _Table(
    name="runs",
    fields=RUNS,
    columns=dict.fromkeys(("event", "params"), _json),
    read={"event": json.loads, "params": json.loads, "allowed": optional(bool)},
)
_STEPS = _Table(
    name="steps",
    fields=STEPS,
    columns={"position": int, "outputs": _opt_json},  # position: set once, at accept
    read={"outputs": _opt_loads},
)
_LEASES = _Table(
    name="leases",
    fields=LEASES,
    columns={**dict.fromkeys(("release_with", "context"), _json), "release_outputs": _opt_json},
    read={"release_with": json.loads, "context": json.loads, "release_outputs": _opt_loads},
)


def _journal_error(label: str, exc: BaseException) -> BaseException:
    """Wrap environment failures (SQLite, filesystem) as JournalError; our own errors and
    bugs pass unchanged. SQLite's messages name tables and columns but never bound values,
    and values are never interpolated into SQL text, so no secret can leak into them."""
    if not isinstance(exc, sqlite3.Error | OSError):
        return exc
    err = JournalError(f"journal {label} failed: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def _connect(path: Path, synchronous: str, busy_timeout: float) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: we issue BEGIN/COMMIT ourselves (the module's implicit
    # transactions would defeat both group commit and savepoints).
    conn = sqlite3.connect(path, isolation_level=None, timeout=busy_timeout)
    try:
        conn.row_factory = sqlite3.Row
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise JournalError(f"journal at {path} cannot use WAL mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous={synchronous}")  # validated in __init__
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        _migrate(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    conn.execute("BEGIN IMMEDIATE")  # two dispatchers opening one file must not race here
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise JournalError(
                f"journal at {path} has schema version {version}; this dispatcher "
                f"supports up to {SCHEMA_VERSION}"
            )
        for statement in _SCHEMA:
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


@dataclasses.dataclass(slots=True)
class _Request:
    label: str
    op: Op | None  # None: stop after everything queued before it
    future: asyncio.Future[Any]


_Outcome = tuple[_Request, bool, Any]  # request, ok, result or exception


def _settle(outcomes: list[_Outcome]) -> None:
    """Runs on the callers' loop; a cancelled caller just doesn't get its result."""
    for request, ok, value in outcomes:
        if not request.future.done():
            (request.future.set_result if ok else request.future.set_exception)(value)


def _deliver(outcomes: list[_Outcome]) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
    for outcome in outcomes:
        by_loop.setdefault(outcome[0].future.get_loop(), []).append(outcome)
    for loop, group in by_loop.items():  # one wake-up per loop and batch, not per op
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(_settle, group)


def _run_op(conn: sqlite3.Connection, request: _Request) -> _Outcome:
    assert request.op is not None
    conn.execute("SAVEPOINT op")
    try:
        result = request.op(conn)
    except Exception as exc:
        # Undo only this op. If the whole transaction is gone (disk full, I/O error),
        # ROLLBACK TO raises and the entire group fails in _commit.
        conn.execute("ROLLBACK TO op")
        conn.execute("RELEASE op")
        return request, False, _journal_error(request.label, exc)
    conn.execute("RELEASE op")
    return request, True, result


def _commit(conn: sqlite3.Connection, batch: list[_Request]) -> list[_Outcome]:
    try:
        conn.execute("BEGIN IMMEDIATE")
        outcomes = [_run_op(conn, request) for request in batch]
        conn.execute("COMMIT")
    except Exception as exc:
        # The transaction itself failed: nothing in this group is durable, so every
        # caller in it gets the error (and may retry).
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        return [(request, False, _journal_error("commit", exc)) for request in batch]
    return outcomes


class _Writer(threading.Thread):
    """Owns the connection; commits queued ops in groups of up to ``max_batch``."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], max_batch: int) -> None:
        # daemon: a process exiting without close() must not hang on the blocked get();
        # nothing acknowledged is lost because acknowledgement follows the COMMIT.
        super().__init__(name="journal-writer", daemon=True)
        self._connect = connect
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders "still accepting?" with the put
        self._accepting = True
        self._ready: asyncio.Future[None] | None = None

    async def start_and_wait(self) -> None:
        self._ready = asyncio.get_running_loop().create_future()
        self.start()
        await self._ready

    def submit(self, label: str, op: Op | None) -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            if not self._accepting:
                raise JournalError("journal is closed")
            if op is None:
                self._accepting = False
            self._queue.put(_Request(label, op, future))
        return future

    def run(self) -> None:
        assert self._ready is not None
        try:
            conn = self._connect()
        except Exception as exc:
            with self._lock:
                self._accepting = False
            _deliver([(_Request("open", None, self._ready), False, _journal_error("open", exc))])
            return
        _deliver([(_Request("open", None, self._ready), True, None)])
        try:
            self._serve(conn)
        finally:
            conn.close()
            self._fail_leftovers()

    def _serve(self, conn: sqlite3.Connection) -> None:
        while True:
            batch = self._next_batch()
            stop = batch[-1] if batch[-1].op is None else None
            work = batch[:-1] if stop else batch
            outcomes = _commit(conn, work) if work else []
            if stop is not None:
                conn.close()  # before acknowledging the stop: close() means closed
                _deliver([*outcomes, (stop, True, None)])
                return
            _deliver(outcomes)

    def _next_batch(self) -> list[_Request]:
        # Block for the first op, then take what queued up meanwhile (typically while the
        # previous group was fsyncing): that is the whole group-commit trick.
        batch = [self._queue.get()]
        while len(batch) < self._max_batch and batch[-1].op is not None:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _fail_leftovers(self) -> None:
        """If the thread dies unexpectedly, fail everything queued instead of hanging it."""
        with self._lock:
            self._accepting = False
        leftovers: list[_Outcome] = []
        with contextlib.suppress(queue.Empty):
            while True:
                leftovers.append((self._queue.get_nowait(), False, JournalError("writer stopped")))
        _deliver(leftovers)


_BY_KEY: Final = "source = ? AND event_id = ?"  # the idempotency key


class SQLiteJournal:
    """The :class:`~dispatcher.journal.Journal` on one SQLite file, with group commit."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: Literal["full", "normal"] = "full",
        max_batch: int = 256,
        busy_timeout: float = 5.0,
    ) -> None:
        if synchronous not in ("full", "normal"):
            raise ValueError(f"synchronous must be 'full' or 'normal', not {synchronous!r}")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.path = Path(path)
        self._synchronous = synchronous.upper()
        self._max_batch = max_batch
        self._busy_timeout = busy_timeout
        self._writer: _Writer | None = None

    async def open(self) -> None:
        if self._writer is not None:
            raise JournalError("journal was already opened")
        writer = _Writer(
            lambda: _connect(self.path, self._synchronous, self._busy_timeout), self._max_batch
        )
        await writer.start_and_wait()
        self._writer = writer

    async def close(self) -> None:
        """Commit everything queued, then stop the writer. Idempotent."""
        writer = self._writer
        if writer is None:
            return
        try:
            done = writer.submit("close", None)
        except JournalError:
            return  # already closed
        await done
        writer.join()  # it returns right after acknowledging the stop

    async def _call(self, label: str, op: Callable[[sqlite3.Connection], T]) -> T:
        if self._writer is None:
            raise JournalError("journal is not open")
        result: T = await self._writer.submit(label, op)
        return result

    # --- runs and steps

    async def accept(self, run: RunRecord, steps: list[StepRecord]) -> tuple[RunRecord, bool]:
        if any(step.run_id != run.run_id for step in steps):
            raise ValueError(f"all steps must belong to run {run.run_id!r}")
        run_row = _RUNS.row(run)
        step_rows = [_STEPS.row(step, position=i) for i, step in enumerate(steps)]

        def op(conn: sqlite3.Connection) -> tuple[RunRecord, bool]:
            # Only the idempotency key means "already accepted"; a clashing run_id is a
            # caller bug and fails loudly. One writer thread makes check-then-read race-free.
            sql = f"{_RUNS.insert} ON CONFLICT (source, event_id) DO NOTHING"
            if conn.execute(sql, run_row).rowcount == 1:
                conn.executemany(_STEPS.insert, step_rows)
                return run, True
            existing = _one("runs", _BY_KEY, (run.source, run.event_id), _RUNS)(conn)
            if existing is None:  # cannot happen: the conflict proves the row exists
                raise JournalError("idempotency conflict without a stored run")
            return existing, False

        return await self._call("accept", op)

    async def get_run(self, run_id: str) -> RunRecord | None:
        op = _one("runs", "run_id = ?", (run_id,), _RUNS)
        return await self._call("get_run", op)

    async def find_run(self, source: str, event_id: str) -> RunRecord | None:
        op = _one("runs", _BY_KEY, (source, event_id), _RUNS)
        return await self._call("find_run", op)

    async def list_runs(
        self, *, limit: int = 50, status: RunStatus | None = None
    ) -> list[RunRecord]:
        if limit < 0:
            raise ValueError("limit must not be negative")  # SQLite reads -1 as "no limit"
        where, params = (
            ("WHERE status = ?", [RunStatus(status).value]) if status is not None else ("", [])
        )
        sql = f"SELECT * FROM runs {where} ORDER BY created_at DESC, rowid DESC LIMIT ?"
        return await self._call("list_runs", _select(sql, (*params, limit), _RUNS))

    async def unfinished_runs(self) -> list[RunRecord]:
        sql = "SELECT * FROM runs WHERE status IN (?, ?) ORDER BY created_at, rowid"
        params = (RunStatus.ACCEPTED.value, RunStatus.RUNNING.value)
        return await self._call("unfinished_runs", _select(sql, params, _RUNS))

    async def update_run(self, run_id: str, **changes: Any) -> None:
        sets, params = _RUNS.assignments(changes)
        sql = f"UPDATE runs SET {', '.join([*sets, 'updated_at = ?'])} WHERE run_id = ?"
        values = (*params, time.time(), run_id)
        await self._call("update_run", _update_one(sql, values, f"unknown run {run_id!r}"))

    async def get_steps(self, run_id: str) -> list[StepRecord]:
        sql = "SELECT * FROM steps WHERE run_id = ? ORDER BY position"
        return await self._call("get_steps", _select(sql, (run_id,), _STEPS))

    async def update_step(self, run_id: str, name: str, **changes: Any) -> None:
        sets, params = _STEPS.assignments(some(changes))
        sql = f"UPDATE steps SET {', '.join(sets)} WHERE run_id = ? AND name = ?"
        missing = f"unknown step {name!r} of run {run_id!r}"
        await self._call("update_step", _update_one(sql, (*params, run_id, name), missing))

    async def claim_step(self, run_id: str, name: str, attempt: int, started_at: float) -> bool:
        sql = (
            "UPDATE steps SET status = ?, attempts = ?, started_at = COALESCE(started_at, ?) "
            "WHERE run_id = ? AND name = ? AND attempts < ? AND status = ?"
        )
        values = (
            StepStatus.RUNNING.value,
            attempt,
            started_at,
            run_id,
            name,
            attempt,
            StepStatus.PENDING.value,
        )
        return await self._call("claim_step", _compare_and_set(sql, values))

    # --- leases

    async def put_lease(self, lease: LeaseRecord) -> None:
        row = _LEASES.row(lease, created_at=lease.created_at or time.time())  # 0.0 = unset
        await self._call("put_lease", lambda conn: conn.execute(_LEASES.insert, row).close())

    async def get_lease(self, lease_id: str) -> LeaseRecord | None:
        op = _one("leases", "lease_id = ?", (lease_id,), _LEASES)
        return await self._call("get_lease", op)

    async def find_leases(
        self,
        *,
        target: str | None = None,
        run_id: str | None = None,
        status: LeaseStatus | None = None,
    ) -> list[LeaseRecord]:
        status_value = None if status is None else LeaseStatus(status).value
        filters = {"target": target, "run_id": run_id, "status": status_value}
        given = {name: value for name, value in filters.items() if value is not None}
        where = " AND ".join(f"{name} = ?" for name in given)  # names: the literals above
        sql = f"SELECT * FROM leases {'WHERE ' + where if where else ''} ORDER BY created_at, rowid"
        return await self._call("find_leases", _select(sql, list(given.values()), _LEASES))

    async def expired_leases(self, now: float) -> list[LeaseRecord]:
        sql = "SELECT * FROM leases WHERE status = ? AND expires_at <= ? ORDER BY expires_at, rowid"
        params = (LeaseStatus.OPEN.value, float(now))
        return await self._call("expired_leases", _select(sql, params, _LEASES))

    async def transition_lease(self, lease_id: str, expected: LeaseStatus, **changes: Any) -> bool:
        sets, params = _LEASES.assignments(some(changes))
        sql = f"UPDATE leases SET {', '.join(sets)} WHERE lease_id = ? AND status = ?"
        values = (*params, lease_id, LeaseStatus(expected).value)
        return await self._call("transition_lease", _compare_and_set(sql, values))


def _select(sql: str, params: Any, table: _Table[R]) -> Callable[[sqlite3.Connection], list[R]]:
    return lambda conn: [table.load(row) for row in conn.execute(sql, params)]


def _one(
    table: str, where: str, params: Any, codec: _Table[R]
) -> Callable[[sqlite3.Connection], R | None]:
    """Look up one row (``table`` and ``where`` are literals from this module, never input)."""
    sql = f"SELECT * FROM {table} WHERE {where}"
    return lambda conn: next((codec.load(row) for row in conn.execute(sql, params)), None)


def _compare_and_set(sql: str, params: Any) -> Callable[[sqlite3.Connection], bool]:
    """An ``UPDATE`` whose ``WHERE`` holds the expected state: it applied iff one row changed.
    Ops run one at a time on the writer thread, so the compare and the set cannot interleave."""
    return lambda conn: conn.execute(sql, params).rowcount == 1


def _update_one(sql: str, params: Any, missing: str) -> Callable[[sqlite3.Connection], None]:
    def op(conn: sqlite3.Connection) -> None:
        if conn.execute(sql, params).rowcount != 1:
            raise JournalError(missing)

    return op
