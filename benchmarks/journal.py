"""Accept throughput and latency of SQLiteJournal (group commit) vs. one commit per accept.

    python benchmarks/journal.py [--seconds 1.5] [--dir PATH]

Both writers use the same pragmas, schema, SQL and row encoding (the journal's private
table helpers), so the only difference measured is the commit strategy. Put ``--dir`` on the disk
the dispatcher will use: on tmpfs fsync is free and the comparison means little.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal

from dispatcher.journal import RunRecord, RunStatus, StepRecord
from dispatcher.journal.sqlite import _RUNS, _STEPS, SQLiteJournal

Sync = Literal["full", "normal"]
Accept = Callable[[RunRecord, list[StepRecord]], Awaitable[object]]
CONCURRENCY = (1, 16, 64)


class NaiveJournal:
    """The baseline: each accept is its own transaction (one fsync each) on a worker thread."""

    def __init__(self, path: Path, synchronous: Sync) -> None:
        # Same pragmas as the journal; the schema is created by SQLiteJournal.open() first.
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        for pragma in ("journal_mode=WAL", f"synchronous={synchronous}", "foreign_keys=ON"):
            self._conn.execute(f"PRAGMA {pragma}")
        self._lock = threading.Lock()  # one connection, many executor threads

    def close(self) -> None:
        self._conn.close()

    async def accept(self, run: RunRecord, steps: list[StepRecord]) -> object:
        return await asyncio.to_thread(self._accept, run, steps)

    def _accept(self, run: RunRecord, steps: list[StepRecord]) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute(f"{_RUNS.insert} ON CONFLICT DO NOTHING", _RUNS.row(run))
            self._conn.executemany(
                _STEPS.insert, [_STEPS.row(s, position=i) for i, s in enumerate(steps)]
            )
            self._conn.execute("COMMIT")


def make_run(n: int) -> tuple[RunRecord, list[StepRecord]]:
    run_id = f"run-{n}"
    now = time.time()
    run = RunRecord(
        run_id=run_id,
        source="velero",
        event_id=f"evt-{n}",
        type="io.velero.backup.pre",
        subject="ns/backup",
        blueprint="postgres",
        failure_policy="fail",
        status=RunStatus.ACCEPTED,
        created_at=now,
        updated_at=now,
        event={"id": f"evt-{n}", "data": {"backup": {"name": "b", "namespaces": ["a", "b"]}}},
        params={"db": "orders"},
    )
    steps = [StepRecord(run_id=run_id, name=s, function=f"http.{s}") for s in ("a", "b", "c")]
    return run, steps


async def drive(accept: Accept, concurrency: int, seconds: float) -> list[float]:
    """Run ``concurrency`` workers accepting back to back; return every accept's latency."""
    latencies: list[float] = []
    counter = iter(range(10**9))
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            run, steps = make_run(next(counter))
            start = time.perf_counter()
            await accept(run, steps)
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def summary(latencies: list[float], seconds: float) -> tuple[float, float, float]:
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return len(latencies) / seconds, q[49] * 1000, q[98] * 1000


async def measure_group(path: Path, sync: Sync, concurrency: int, seconds: float) -> list[float]:
    journal = SQLiteJournal(path, synchronous=sync)
    await journal.open()
    try:
        return await drive(journal.accept, concurrency, seconds)
    finally:
        await journal.close()


async def measure_naive(path: Path, sync: Sync, concurrency: int, seconds: float) -> list[float]:
    schema = SQLiteJournal(path)
    await schema.open()
    await schema.close()
    naive = NaiveJournal(path, sync)
    try:
        return await drive(naive.accept, concurrency, seconds)
    finally:
        naive.close()


async def main(seconds: float, directory: str | None) -> None:
    header = (
        f"{'sync':<7}{'conc':>5} | {'group acc/s':>11} {'p50 ms':>7} {'p99 ms':>7}"
        f" | {'naive acc/s':>11} {'p50 ms':>7} {'p99 ms':>7} | {'ratio':>6}"
    )
    print(f"{seconds:.1f} s per cell; 1 run + 3 steps per accept")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory(dir=directory, prefix="journal-bench-") as tmp:
        for sync in ("full", "normal"):
            for concurrency in CONCURRENCY:
                cell = Path(tmp) / f"{sync}-{concurrency}"
                group = summary(
                    await measure_group(cell / "group.db", sync, concurrency, seconds), seconds
                )
                naive = summary(
                    await measure_naive(cell / "naive.db", sync, concurrency, seconds), seconds
                )
                print(
                    f"{sync:<7}{concurrency:>5} | {group[0]:>11,.0f} {group[1]:>7.2f}"
                    f" {group[2]:>7.2f} | {naive[0]:>11,.0f} {naive[1]:>7.2f} {naive[2]:>7.2f}"
                    f" | {group[0] / naive[0]:>5.1f}x"
                )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=1.5, help="measuring time per cell")
    parser.add_argument("--dir", default=None, help="where to put the databases")
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.dir))
