"""The journal contract, run against every backend, plus SQLite-specific guarantees.

``TestJournalContract`` must hold for any :class:`Journal`: it only talks to the Protocol.
A backend joins by adding a param to the ``make_journal`` fixture.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from dispatcher.errors import JournalError
from dispatcher.journal import (
    Journal,
    LeaseRecord,
    LeaseStatus,
    RunRecord,
    RunStatus,
    StepRecord,
    StepStatus,
)
from dispatcher.journal.nats import NatsJournal
from dispatcher.journal.sqlite import SCHEMA_VERSION, SQLiteJournal

ROOT = Path(__file__).resolve().parents[1]

MakeJournal = Callable[[], Journal]


@pytest.fixture(params=["sqlite", "nats"])
def make_journal(request: pytest.FixtureRequest, tmp_path: Path) -> MakeJournal:
    """Returns unopened journals that all share one storage, so a test can "restart"."""
    if request.param == "sqlite":
        return lambda: SQLiteJournal(tmp_path / "state" / "journal.db")
    if request.param == "nats":
        # A prefix of its own per test; its buckets are deleted afterwards.
        url, prefix = request.getfixturevalue("nats_url"), request.getfixturevalue("nats_prefix")
        return lambda: NatsJournal(url, prefix=prefix)
    raise AssertionError(request.param)


@pytest.fixture
async def journal(make_journal: MakeJournal) -> AsyncIterator[Journal]:
    j = make_journal()
    await j.open()
    yield j
    await j.close()


def a_run(n: int | str = 1, **overrides: Any) -> RunRecord:
    fields: dict[str, Any] = {
        "run_id": f"run-{n}",
        "source": "velero",
        "event_id": f"evt-{n}",
        "type": "io.velero.backup.pre",
        "subject": "ns/backup-1",
        "blueprint": "postgres",
        "failure_policy": "fail",
        "status": RunStatus.ACCEPTED,
        "created_at": 1000.0 + (n if isinstance(n, int) else 0),
        "updated_at": 1000.0,
        "event": {"id": f"evt-{n}", "data": {"nested": [1, 2.5, "ü"], "ok": True}},
        "params": {"db": "orders"},
        "decision_timeout": 30.0,
    }
    fields.update(overrides)
    return RunRecord(**fields)


def steps_for(run: RunRecord, *names: str) -> list[StepRecord]:
    return [StepRecord(run_id=run.run_id, name=name, function=f"http.{name}") for name in names]


def a_lease(n: int, **overrides: Any) -> LeaseRecord:
    fields: dict[str, Any] = {
        "lease_id": f"lease-{n}",
        "run_id": "run-1",
        "step": "freeze",
        "target": "ns/Deployment/db",
        "backup_id": "backup-1",
        "release_function": "http.unfreeze",
        "release_with": {"url": "{{ secrets.url }}"},
        "context": {"backup": {"name": "backup-1"}},
        "expires_at": 2000.0 + n,
        "created_at": 1000.0 + n,
    }
    fields.update(overrides)
    return LeaseRecord(**fields)


class TestJournalContract:
    async def test_accept_creates_run_and_steps(self, journal: Journal) -> None:
        run = a_run()
        stored, created = await journal.accept(run, steps_for(run, "b", "a", "c"))
        assert created
        assert stored == run
        assert await journal.get_run(run.run_id) == run
        steps = await journal.get_steps(run.run_id)
        assert [s.name for s in steps] == ["b", "a", "c"]  # blueprint order, not by name
        assert all(s.status is StepStatus.PENDING and s.attempts == 0 for s in steps)

    async def test_accept_dedups_on_source_and_event_id(self, journal: Journal) -> None:
        first = a_run(1)
        await journal.accept(first, steps_for(first, "a", "b"))
        again = a_run(1, run_id="run-other", subject="different")
        stored, created = await journal.accept(again, steps_for(again, "x"))
        assert not created
        assert stored == first
        assert await journal.get_run("run-other") is None
        assert await journal.get_steps("run-other") == []
        assert [s.name for s in await journal.get_steps(first.run_id)] == ["a", "b"]
        # The same event_id from another source is another event.
        _, created = await journal.accept(a_run(2, event_id="evt-1", source="other"), [])
        assert created

    async def test_accept_is_all_or_nothing(self, journal: Journal) -> None:
        run = a_run()
        with pytest.raises((JournalError, ValueError)):
            await journal.accept(run, steps_for(run, "a", "b", "a"))  # duplicate step name
        assert await journal.get_run(run.run_id) is None
        assert await journal.get_steps(run.run_id) == []
        _, created = await journal.accept(run, steps_for(run, "a", "b"))
        assert created

    async def test_concurrent_accepts_create_each_key_once(self, journal: Journal) -> None:
        attempts = [
            a_run(f"{key}-{copy}", event_id=f"k{key}") for copy in range(4) for key in range(50)
        ]
        results = await asyncio.gather(*(journal.accept(r, steps_for(r, "s")) for r in attempts))
        assert sum(created for _, created in results) == 50
        by_key: dict[str, set[str]] = {}
        for stored, _ in results:
            by_key.setdefault(stored.event_id, set()).add(stored.run_id)
        assert len(by_key) == 50
        assert all(len(ids) == 1 for ids in by_key.values())
        runs = await journal.list_runs(limit=1000)
        assert len(runs) == 50
        for run in runs:
            assert len(await journal.get_steps(run.run_id)) == 1

    async def test_get_unknown_run_is_none(self, journal: Journal) -> None:
        assert await journal.get_run("nope") is None
        assert await journal.find_run("velero", "nope") is None
        assert await journal.get_steps("nope") == []

    async def test_find_run_by_idempotency_key(self, journal: Journal) -> None:
        run = a_run()
        await journal.accept(run, [])
        await journal.accept(a_run(2), [])
        assert await journal.find_run(run.source, run.event_id) == run
        assert await journal.find_run("other", run.event_id) is None

    @pytest.mark.parametrize("allowed", [True, False, None])
    async def test_update_run_round_trip(self, journal: Journal, allowed: bool | None) -> None:
        run = a_run()
        await journal.accept(run, [])
        await journal.update_run(run.run_id, allowed=True, reason="first")
        await journal.update_run(
            run.run_id,
            status=RunStatus.SUCCEEDED,
            allowed=allowed,
            reason="all steps passed",
            params={"db": "orders", "extra": {"k": [1, None]}},
        )
        got = await journal.get_run(run.run_id)
        assert got is not None
        assert got.status is RunStatus.SUCCEEDED
        assert got.allowed is allowed
        assert got.reason == "all steps passed"
        assert got.params == {"db": "orders", "extra": {"k": [1, None]}}
        assert got.updated_at > run.updated_at
        assert (got.run_id, got.created_at, got.event) == (run.run_id, run.created_at, run.event)

    async def test_update_step_round_trip(self, journal: Journal) -> None:
        run = a_run()
        await journal.accept(run, steps_for(run, "freeze", "notify"))
        outputs = {"lease": "l-1", "body": {"rows": [1, 2], "ok": True}, "none": None}
        await journal.update_step(
            run.run_id, "freeze", status=StepStatus.RUNNING, attempts=1, started_at=5.0
        )
        await journal.update_step(
            run.run_id,
            "freeze",
            status=StepStatus.FAILED,
            attempts=2,
            finished_at=6.5,
            outputs=outputs,
            error="HTTP 503",
        )
        freeze, notify = await journal.get_steps(run.run_id)
        assert freeze == StepRecord(
            run_id=run.run_id,
            name="freeze",
            function="http.freeze",
            status=StepStatus.FAILED,
            attempts=2,
            started_at=5.0,
            finished_at=6.5,
            outputs=outputs,
            error="HTTP 503",
        )
        assert notify == steps_for(run, "notify")[0]
        await journal.update_step(run.run_id, "freeze", outputs=None, error=None)
        freeze, _ = await journal.get_steps(run.run_id)
        assert freeze.outputs is None and freeze.error is None

    async def test_unknown_fields_are_rejected(self, journal: Journal) -> None:
        run = a_run()
        await journal.accept(run, steps_for(run, "s"))
        await journal.put_lease(a_lease(1))
        with pytest.raises(ValueError, match="bogus"):
            await journal.update_run(run.run_id, bogus=1)
        with pytest.raises(ValueError):
            await journal.update_run(run.run_id, **{"status = 'x' --": "x"})
        with pytest.raises(ValueError):
            await journal.update_run(run.run_id, source="hijacked")
        with pytest.raises(ValueError):
            await journal.update_step(run.run_id, "s", position=9)
        with pytest.raises(ValueError):
            await journal.transition_lease("lease-1", LeaseStatus.OPEN, created_at=1.0)
        assert await journal.get_run(run.run_id) == run

    async def test_update_of_unknown_row_is_journal_error(self, journal: Journal) -> None:
        run = a_run()
        await journal.accept(run, steps_for(run, "s"))
        with pytest.raises(JournalError):
            await journal.update_run("nope", status=RunStatus.FAILED)
        with pytest.raises(JournalError):
            await journal.update_step(run.run_id, "nope", attempts=1)
        with pytest.raises(JournalError):
            await journal.update_step("nope", "s", attempts=1)

    async def test_list_runs_newest_first_with_limit_and_status(self, journal: Journal) -> None:
        for n in (3, 1, 2):
            await journal.accept(a_run(n), [])
        await journal.accept(a_run(4, created_at=1003.0), [])  # ties: later insert is newer
        await journal.update_run("run-2", status=RunStatus.FAILED)

        assert [r.run_id for r in await journal.list_runs()] == ["run-4", "run-3", "run-2", "run-1"]
        assert [r.run_id for r in await journal.list_runs(limit=2)] == ["run-4", "run-3"]
        accepted = await journal.list_runs(status=RunStatus.ACCEPTED)
        assert [r.run_id for r in accepted] == ["run-4", "run-3", "run-1"]
        assert [r.run_id for r in await journal.list_runs(status=RunStatus.FAILED)] == ["run-2"]
        assert await journal.list_runs(status=RunStatus.SUCCEEDED) == []

    async def test_unfinished_runs_oldest_first(self, journal: Journal) -> None:
        for n in (4, 2, 3, 1):
            await journal.accept(a_run(n), [])
        await journal.update_run("run-1", status=RunStatus.SUCCEEDED)
        await journal.update_run("run-3", status=RunStatus.RUNNING)
        await journal.update_run("run-4", status=RunStatus.FAILED)
        unfinished = await journal.unfinished_runs()
        assert [(r.run_id, r.status) for r in unfinished] == [
            ("run-2", RunStatus.ACCEPTED),
            ("run-3", RunStatus.RUNNING),
        ]

    async def test_lease_round_trip_and_find(self, journal: Journal) -> None:
        leases = [
            a_lease(3, target="ns/a", run_id="run-1"),
            a_lease(1, target="ns/b", run_id="run-2"),
            a_lease(2, target="ns/a", run_id="run-2"),
        ]
        for lease in leases:
            await journal.put_lease(lease)
        assert await journal.get_lease("lease-1") == leases[1]
        assert await journal.get_lease("nope") is None

        def ids(found: list[LeaseRecord]) -> list[str]:
            return [lease.lease_id for lease in found]

        assert ids(await journal.find_leases()) == ["lease-1", "lease-2", "lease-3"]
        assert ids(await journal.find_leases(target="ns/a")) == ["lease-2", "lease-3"]
        assert ids(await journal.find_leases(run_id="run-2")) == ["lease-1", "lease-2"]
        assert ids(await journal.find_leases(target="ns/a", run_id="run-2")) == ["lease-2"]
        assert ids(await journal.find_leases(status=LeaseStatus.RELEASED)) == []
        await journal.transition_lease("lease-2", LeaseStatus.OPEN, status=LeaseStatus.RELEASED)
        assert ids(await journal.find_leases(status=LeaseStatus.OPEN)) == ["lease-1", "lease-3"]

    async def test_lease_gets_created_at_when_unset(self, journal: Journal) -> None:
        await journal.put_lease(a_lease(1, created_at=0.0))
        lease = await journal.get_lease("lease-1")
        assert lease is not None and lease.created_at > 0

    async def test_duplicate_lease_is_journal_error(self, journal: Journal) -> None:
        await journal.put_lease(a_lease(1))
        with pytest.raises(JournalError):
            await journal.put_lease(a_lease(1, target="other"))
        assert await journal.get_lease("lease-1") == a_lease(1)

    async def test_expired_leases(self, journal: Journal) -> None:
        await journal.put_lease(a_lease(1, expires_at=100.0))
        await journal.put_lease(a_lease(2, expires_at=200.0))
        await journal.put_lease(a_lease(3, expires_at=50.0, status=LeaseStatus.RELEASING))
        await journal.put_lease(a_lease(4, expires_at=300.0))
        assert [x.lease_id for x in await journal.expired_leases(200.0)] == ["lease-1", "lease-2"]
        assert await journal.expired_leases(99.9) == []

    async def test_transition_lease_is_compare_and_set(self, journal: Journal) -> None:
        await journal.put_lease(a_lease(1))
        assert not await journal.transition_lease(
            "lease-1", LeaseStatus.RELEASING, status=LeaseStatus.RELEASED
        )
        assert await journal.transition_lease(
            "lease-1",
            LeaseStatus.OPEN,
            status=LeaseStatus.RELEASED,
            released_at=42.0,
            released_by="post:run-1",
        )
        lease = await journal.get_lease("lease-1")
        assert lease is not None
        assert (lease.status, lease.released_at, lease.released_by) == (
            LeaseStatus.RELEASED,
            42.0,
            "post:run-1",
        )
        assert not await journal.transition_lease(
            "nope", LeaseStatus.OPEN, status=LeaseStatus.RELEASED
        )

    async def test_concurrent_transitions_have_one_winner(self, journal: Journal) -> None:
        for n in range(20):
            await journal.put_lease(a_lease(n))
        for n in range(20):
            wins = await asyncio.gather(
                *(
                    journal.transition_lease(
                        f"lease-{n}",
                        LeaseStatus.OPEN,
                        status=LeaseStatus.RELEASING,
                        released_by=f"releaser-{who}",
                    )
                    for who in range(2)
                )
            )
            assert sorted(wins) == [False, True]
            lease = await journal.get_lease(f"lease-{n}")
            assert lease is not None
            assert lease.released_by == f"releaser-{wins.index(True)}"

    async def test_claim_step_is_compare_and_set_per_attempt(self, journal: Journal) -> None:
        run = a_run()
        await journal.accept(run, steps_for(run, "freeze"))
        assert await journal.claim_step(run.run_id, "freeze", 1, 2000.0)
        # The same attempt again (another replica after a redelivery) loses.
        assert not await journal.claim_step(run.run_id, "freeze", 1, 2001.0)
        (step,) = await journal.get_steps(run.run_id)
        assert (step.status, step.attempts, step.started_at) == (StepStatus.RUNNING, 1, 2000.0)
        # A running step cannot be claimed for the next attempt until it is pending again.
        assert not await journal.claim_step(run.run_id, "freeze", 2, 2002.0)
        await journal.update_step(run.run_id, "freeze", status=StepStatus.PENDING)
        assert await journal.claim_step(run.run_id, "freeze", 2, 2003.0)
        (step,) = await journal.get_steps(run.run_id)
        assert (step.attempts, step.started_at) == (2, 2000.0)  # first start kept
        await journal.update_step(run.run_id, "freeze", status=StepStatus.SUCCEEDED)
        assert not await journal.claim_step(run.run_id, "freeze", 3, 2004.0)
        assert not await journal.claim_step(run.run_id, "nope", 1, 2004.0)

    async def test_concurrent_step_claims_have_one_winner(self, journal: Journal) -> None:
        run = a_run()
        names = [f"s{n}" for n in range(10)]
        await journal.accept(run, steps_for(run, *names))
        for name in names:
            wins = await asyncio.gather(
                *(journal.claim_step(run.run_id, name, 1, 2000.0 + who) for who in range(3))
            )
            assert sorted(wins) == [False, False, True]

    async def test_failing_write_does_not_affect_concurrent_writes(self, journal: Journal) -> None:
        await journal.put_lease(a_lease(0))
        writes = [journal.put_lease(a_lease(n)) for n in range(1, 40)]
        writes.insert(20, journal.put_lease(a_lease(0, target="dup")))
        results = await asyncio.gather(*writes, return_exceptions=True)
        assert isinstance(results[20], JournalError)
        assert all(r is None for i, r in enumerate(results) if i != 20)
        assert len(await journal.find_leases()) == 40
        assert await journal.get_lease("lease-0") == a_lease(0)

    async def test_cancelled_caller_does_not_break_the_journal(self, journal: Journal) -> None:
        tasks = [asyncio.ensure_future(journal.accept(a_run(n), [])) for n in range(20)]
        await asyncio.sleep(0)
        for task in tasks[::2]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # A cancelled accept may or may not have landed, but the journal keeps working and
        # a retry of it is deduplicated.
        results = await asyncio.gather(*(journal.accept(a_run(n), []) for n in range(20)))
        assert [created for _, created in results[1::2]] == [False] * 10
        assert len(await journal.list_runs(limit=100)) == 20

    async def test_data_survives_close_and_reopen(self, make_journal: MakeJournal) -> None:
        first = make_journal()
        await first.open()
        run = a_run()
        await first.accept(run, steps_for(run, "a"))
        await first.update_step(run.run_id, "a", outputs={"x": 1})
        await first.put_lease(a_lease(1))
        await first.close()

        second = make_journal()
        await second.open()
        try:
            assert await second.get_run(run.run_id) == run
            assert (await second.get_steps(run.run_id))[0].outputs == {"x": 1}
            assert await second.get_lease("lease-1") == a_lease(1)
            assert (await second.accept(a_run(), []))[1] is False
        finally:
            await second.close()

    async def test_use_after_close_is_journal_error(self, make_journal: MakeJournal) -> None:
        journal = make_journal()
        with pytest.raises(JournalError):
            await journal.get_run("run-1")  # not opened yet
        await journal.open()
        await journal.close()
        await journal.close()  # idempotent
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: journal.accept(a_run(), []),
            lambda: journal.get_run("run-1"),
            lambda: journal.find_run("velero", "evt-1"),
            lambda: journal.list_runs(),
            lambda: journal.unfinished_runs(),
            lambda: journal.update_run("run-1", reason="x"),
            lambda: journal.get_steps("run-1"),
            lambda: journal.update_step("run-1", "s", attempts=1),
            lambda: journal.put_lease(a_lease(1)),
            lambda: journal.get_lease("lease-1"),
            lambda: journal.find_leases(),
            lambda: journal.expired_leases(0.0),
            lambda: journal.transition_lease(
                "lease-1", LeaseStatus.OPEN, status=LeaseStatus.FAILED
            ),
        ]
        for call in calls:
            with pytest.raises(JournalError):
                await call()

    async def test_close_waits_for_pending_writes(self, make_journal: MakeJournal) -> None:
        journal = make_journal()
        await journal.open()
        pending = [asyncio.ensure_future(journal.accept(a_run(n), [])) for n in range(50)]
        await asyncio.sleep(0)  # let them all submit
        await journal.close()
        assert all(task.result()[1] for task in pending)
        reopened = make_journal()
        await reopened.open()
        try:
            assert len(await reopened.list_runs(limit=100)) == 50
        finally:
            await reopened.close()


# --- SQLite only


KILLED_WRITER = """
import asyncio, sys
from pathlib import Path
from dispatcher.journal import RunRecord, RunStatus, StepRecord
from dispatcher.journal.sqlite import SQLiteJournal

async def worker(journal, w):
    for n in range(10**9):
        run_id = f"run-{w}-{n}"
        run = RunRecord(run_id=run_id, source="s", event_id=run_id, type="t", subject="x",
                        blueprint="b", failure_policy="fail", status=RunStatus.ACCEPTED,
                        created_at=float(n), updated_at=float(n), event={"n": n})
        await journal.accept(run, [StepRecord(run_id=run_id, name="a", function="f")])
        print(run_id, flush=True)  # only after accept returned: "acknowledged"

async def main():
    journal = SQLiteJournal(Path(sys.argv[1]))
    await journal.open()
    await asyncio.gather(*(worker(journal, w) for w in range(8)))

asyncio.run(main())
"""


class TestSQLiteJournal:
    async def test_uses_wal_and_records_schema_version(self, tmp_path: Path) -> None:
        path = tmp_path / "deep" / "dir" / "journal.db"
        journal = SQLiteJournal(path, synchronous="normal")
        await journal.open()
        await journal.close()
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        conn.close()

    @pytest.mark.parametrize(("synchronous", "level"), [("full", 2), ("normal", 1)])
    async def test_synchronous_and_foreign_keys(
        self, tmp_path: Path, synchronous: Any, level: int
    ) -> None:
        journal = SQLiteJournal(tmp_path / "j.db", synchronous=synchronous)
        await journal.open()
        try:
            pragmas = await journal._call(
                "test",
                lambda c: (
                    c.execute("PRAGMA synchronous").fetchone()[0],
                    c.execute("PRAGMA foreign_keys").fetchone()[0],
                ),
            )
        finally:
            await journal.close()
        assert pragmas == (level, 1)

    async def test_refuses_newer_schema(self, tmp_path: Path) -> None:
        path = tmp_path / "j.db"
        with sqlite3.connect(path) as conn:
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
        conn.close()
        journal = SQLiteJournal(path)
        with pytest.raises(JournalError, match="schema version"):
            await journal.open()
        with pytest.raises(JournalError):
            await journal.get_run("x")

    async def test_unusable_path_is_journal_error(self, tmp_path: Path) -> None:
        (tmp_path / "file").write_text("not a directory")
        journal = SQLiteJournal(tmp_path / "file" / "j.db")
        with pytest.raises(JournalError, match="open"):
            await journal.open()
        await journal.close()  # nothing to close, and no error either

    async def test_failing_op_rolls_back_alone_within_one_batch(self, tmp_path: Path) -> None:
        journal = SQLiteJournal(tmp_path / "j.db")
        await journal.open()
        try:
            await journal.put_lease(a_lease(0))
            entered, gate = threading.Event(), threading.Event()

            def hold(_: sqlite3.Connection) -> None:
                entered.set()
                gate.wait(10)

            blocker = asyncio.ensure_future(journal._call("gate", hold))
            assert await asyncio.to_thread(entered.wait, 10)  # the writer is parked in hold()
            writes: list[Awaitable[object]] = [journal.put_lease(a_lease(n)) for n in (1, 2)]
            writes.append(journal.put_lease(a_lease(0, target="dup")))
            writes.append(journal.put_lease(a_lease(3)))
            # Fails on its second statement: the savepoint must undo its first one too.
            torn = a_run(7)
            writes.append(journal.accept(torn, steps_for(torn, "a", "a")))
            writes.append(journal.accept(a_run(8), []))
            tasks = [asyncio.ensure_future(w) for w in writes]
            assert journal._writer is not None
            await asyncio.sleep(0)  # each task runs up to its submit, then waits
            assert journal._writer._queue.qsize() == len(writes)
            gate.set()  # all six are queued behind the gate: the writer drains them as one batch
            results = await asyncio.gather(*tasks, return_exceptions=True)
            await blocker
            assert results[:2] == [None, None] and results[3] is None
            assert isinstance(results[2], JournalError)
            assert isinstance(results[4], JournalError)
            assert results[5] == (a_run(8), True)
            assert await journal.get_run("run-7") is None
            assert "UNIQUE" in str(results[2]) and "dup" not in str(results[2])
            assert [x.lease_id for x in await journal.find_leases()] == [
                "lease-0",
                "lease-1",
                "lease-2",
                "lease-3",
            ]
        finally:
            await journal.close()

    @pytest.mark.slow
    async def test_acknowledged_accepts_survive_kill_9(self, tmp_path: Path) -> None:
        path = tmp_path / "j.db"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            KILLED_WRITER,
            str(path),
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
            env=env,
        )
        assert proc.stdout is not None
        acknowledged: list[str] = []
        try:
            while len(acknowledged) < 300:
                line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
                assert line, "writer exited early"
                acknowledged.append(line.decode().strip())
        finally:
            proc.send_signal(signal.SIGKILL)
            rest = await proc.stdout.read()
            await proc.wait()
        # Lines printed before the kill are acknowledged too; a torn last line is not.
        acknowledged += [line for line in rest.decode().split("\n")[:-1] if line]
        assert proc.returncode == -signal.SIGKILL

        journal = SQLiteJournal(path)
        await journal.open()
        try:
            stored = {r.run_id for r in await journal.list_runs(limit=10**6)}
            for run_id in acknowledged:
                assert (await journal.get_steps(run_id))[0].name == "a"
        finally:
            await journal.close()
        assert set(acknowledged) <= stored
