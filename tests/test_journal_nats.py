"""The NATS journal as several dispatcher replicas see it: two journals on two connections
to one JetStream, racing for the same records; start-up against existing buckets; NATS
going away and coming back; the crash window of ``accept``.

The backend-neutral contract runs against NATS in tests/test_journal.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest

from dispatcher.errors import JournalError
from dispatcher.journal import LeaseStatus, RunStatus, StepStatus
from dispatcher.journal.kvcodec import idempotency_key
from dispatcher.journal.nats import NatsJournal
from tests.conftest import eventually, free_port
from tests.test_journal import a_lease, a_run, steps_for

ROOT = Path(__file__).resolve().parents[1]
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


@pytest.fixture
async def replicas(nats_url: str, nats_prefix: str) -> AsyncIterator[list[NatsJournal]]:
    """Two journals on one set of buckets, each with its own connection: two replicas."""
    journals = [NatsJournal(nats_url, prefix=nats_prefix) for _ in range(2)]
    await asyncio.gather(*(j.open() for j in journals))  # racing to create the buckets, too
    yield journals
    for journal in journals:
        await journal.close()


# --- exactly one winner across replicas


async def test_replicas_accepting_the_same_events_create_each_run_once(
    replicas: list[NatsJournal],
) -> None:
    a, b = replicas
    attempts = [
        (journal, a_run(f"{key}-{copy}", event_id=f"k{key}"))
        for key in range(20)
        for copy in range(2)
        for journal in (a, b)
    ]
    results = await asyncio.gather(
        *(journal.accept(run, steps_for(run, "freeze", "dump")) for journal, run in attempts)
    )
    by_key: dict[str, set[str]] = {}
    for stored, _ in results:
        by_key.setdefault(stored.event_id, set()).add(stored.run_id)
    assert sum(created for _, created in results) == 20
    assert all(len(run_ids) == 1 for run_ids in by_key.values())
    for journal in (a, b):
        for (run_id,) in by_key.values():
            steps = await journal.get_steps(run_id)
            assert [(s.run_id, s.name) for s in steps] == [(run_id, "freeze"), (run_id, "dump")]

    async def both_list_all() -> bool:
        return [len(await j.list_runs(limit=100)) for j in (a, b)] == [20, 20]

    await eventually(both_list_all)


async def test_replicas_claiming_a_step_attempt_have_one_winner(
    replicas: list[NatsJournal],
) -> None:
    a, b = replicas
    run = a_run()
    names = [f"s{n}" for n in range(10)]
    await a.accept(run, steps_for(run, *names))
    for attempt in (1, 2):
        for name in names:
            claims = [j.claim_step(run.run_id, name, attempt, 2000.0) for j in (a, b, a, b)]
            assert sorted(await asyncio.gather(*claims)) == [False, False, False, True]
            await b.update_step(run.run_id, name, status=StepStatus.PENDING)
    steps = await a.get_steps(run.run_id)
    assert {(s.status, s.attempts, s.started_at) for s in steps} == {
        (StepStatus.PENDING, 2, 2000.0)
    }


async def test_one_reaper_releases_an_expired_lease(replicas: list[NatsJournal]) -> None:
    a, b = replicas
    for n in range(10):
        await a.put_lease(a_lease(n, expires_at=100.0 + n))
    await a.put_lease(a_lease(99, expires_at=5000.0))  # not expired

    async def b_sees_them() -> bool:
        return len(await b.expired_leases(200.0)) == 10

    await eventually(b_sees_them)
    expired = {j: await j.expired_leases(200.0) for j in (a, b)}
    assert [x.lease_id for x in expired[a]] == [f"lease-{n}" for n in range(10)]
    assert expired[a] == expired[b]

    async def reap(journal: NatsJournal, who: str) -> list[str]:
        won = []
        for lease in expired[journal]:
            if await journal.transition_lease(
                lease.lease_id, LeaseStatus.OPEN, status=LeaseStatus.RELEASING, released_by=who
            ):
                won.append(lease.lease_id)
        return won

    won_a, won_b = await asyncio.gather(reap(a, "reaper-a"), reap(b, "reaper-b"))
    assert sorted(won_a + won_b) == sorted(x.lease_id for x in expired[a])
    for lease_id in won_a:
        lease = await b.get_lease(lease_id)
        assert lease is not None and lease.released_by == "reaper-a"
    assert await a.expired_leases(200.0) == []
    assert [x.lease_id for x in await b.find_leases(status=LeaseStatus.OPEN)] == ["lease-99"]


# --- what other replicas see


async def test_listings_follow_other_replicas_writes(replicas: list[NatsJournal]) -> None:
    a, b = replicas
    for n in (2, 1, 3):
        await b.accept(a_run(n), [])
    await b.update_run("run-3", status=RunStatus.FAILED)

    async def a_caught_up() -> bool:
        return [r.run_id for r in await a.list_runs(status=RunStatus.FAILED)] == ["run-3"]

    await eventually(a_caught_up)
    assert [r.run_id for r in await a.list_runs()] == ["run-3", "run-2", "run-1"]
    assert [r.run_id for r in await a.unfinished_runs()] == ["run-1", "run-2"]


async def test_watch_runs_yields_changes_by_any_replica(replicas: list[NatsJournal]) -> None:
    a, b = replicas
    await b.accept(a_run(1), [])

    async def a_has_it() -> bool:
        return len(await a.list_runs()) == 1

    await eventually(a_has_it)  # run-1's creation went by before the watch below starts
    changes = a.watch_runs()
    first = asyncio.ensure_future(anext(changes))
    await asyncio.sleep(0)  # the watcher runs up to its first wait: it is listening now
    await b.accept(a_run(2), [])
    assert await asyncio.wait_for(first, 10) == "run-2"
    await b.update_run("run-1", status=RunStatus.RUNNING, allowed=True)
    assert await asyncio.wait_for(anext(changes), 10) == "run-1"
    run = await a.get_run("run-1")
    assert run is not None and run.allowed is True
    # Closing the journal ends the iteration.
    pending = asyncio.ensure_future(anext(changes))
    await a.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(pending, 10)


# --- accept's crash window


async def test_accept_completes_a_run_whose_writer_died_after_the_index_write(
    replicas: list[NatsJournal], nats_prefix: str
) -> None:
    a, b = replicas
    # What a writer killed between its two writes leaves: the index names a run that has
    # no record yet.
    index = await a.js.key_value(f"{nats_prefix}_events")
    await index.create(idempotency_key("velero", "evt-1"), b"run-dead")
    assert await a.find_run("velero", "evt-1") is None
    assert await a.get_run("run-dead") is None

    retry = a_run(1, run_id="run-retry")
    stored, created = await b.accept(retry, steps_for(retry, "freeze", "dump"))
    assert created
    assert stored.run_id == "run-dead"  # the id the index already handed out
    assert (stored.source, stored.event_id, stored.subject) == ("velero", "evt-1", retry.subject)
    assert await a.find_run("velero", "evt-1") == stored
    assert await a.get_run("run-retry") is None
    steps = await a.get_steps("run-dead")
    assert [(s.run_id, s.name) for s in steps] == [("run-dead", "freeze"), ("run-dead", "dump")]
    assert await a.accept(a_run(1, run_id="run-third"), []) == (stored, False)


async def test_a_run_id_reused_for_another_event_fails_loudly(
    replicas: list[NatsJournal],
) -> None:
    a, _ = replicas
    await a.accept(a_run(1), [])
    clash = a_run(1, event_id="evt-other")  # same run id, another event
    with pytest.raises(JournalError, match="already belongs to another event"):
        await a.accept(clash, [])
    assert await a.find_run("velero", "evt-other") is None
    # The index entry was dropped: the event is accepted once it gets its own run id.
    _, created = await a.accept(a_run(2, event_id="evt-other"), [])
    assert created


KILLED_WRITER = """
import asyncio, sys
from dispatcher.journal import RunRecord, RunStatus, StepRecord
from dispatcher.journal.nats import NatsJournal

async def worker(journal, w):
    for n in range(10**9):
        run_id = f"run-{w}-{n}"
        run = RunRecord(run_id=run_id, source="s", event_id=f"evt-{w}-{n}", type="t",
                        subject="x", blueprint="b", failure_policy="fail",
                        status=RunStatus.ACCEPTED, created_at=float(n), updated_at=float(n),
                        event={"n": n})
        await journal.accept(run, [StepRecord(run_id=run_id, name="a", function="f")])
        print(w, n, flush=True)  # only after accept returned: "acknowledged"

async def main():
    journal = NatsJournal(sys.argv[1], prefix=sys.argv[2])
    await journal.open()
    await asyncio.gather(*(worker(journal, w) for w in range(8)))

asyncio.run(main())
"""


@pytest.mark.slow
async def test_kill_9_mid_burst_leaves_every_event_acceptable_exactly_once(
    nats_url: str, nats_prefix: str
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        KILLED_WRITER,
        nats_url,
        nats_prefix,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    acknowledged: list[tuple[int, int]] = []
    try:
        while len(acknowledged) < 200:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
            assert line, "writer exited early"
            w, n = line.split()
            acknowledged.append((int(w), int(n)))
    finally:
        proc.send_signal(signal.SIGKILL)
        rest = await proc.stdout.read()
        await proc.wait()
    acknowledged += [
        (int(w), int(n)) for w, n in (line.split() for line in rest.decode().split("\n")[:-1])
    ]

    journal = NatsJournal(nats_url, prefix=nats_prefix)
    await journal.open()
    try:
        for w, n in acknowledged:
            assert (await journal.get_steps(f"run-{w}-{n}"))[0].name == "a"
        # Each worker had at most one accept in flight when it died; accepting every event
        # it ever started again (say, redelivered) ends with one complete run per event.
        started = {w: max(n for w2, n in acknowledged if w2 == w) + 1 for w in range(8)}
        keys = [(w, n) for w, last in started.items() for n in range(last + 1)]
        for w, n in keys:
            retry = a_run(f"retry-{w}-{n}", source="s", event_id=f"evt-{w}-{n}")
            stored, created = await journal.accept(retry, steps_for(retry, "a"))
            assert not created or n == started[w]  # only the one in flight may be new
            assert len(await journal.get_steps(stored.run_id)) == 1
        runs = await journal.list_runs(limit=10**6)
        assert sorted(r.event_id for r in runs) == sorted(f"evt-{w}-{n}" for w, n in keys)
    finally:
        await journal.close()


# --- start-up and bucket configuration


async def test_opening_again_adopts_the_buckets(nats_url: str, nats_prefix: str) -> None:
    first = NatsJournal(nats_url, prefix=nats_prefix)
    await first.open()
    await first.accept(a_run(), [])
    await first.close()
    again = [NatsJournal(nats_url, prefix=nats_prefix) for _ in range(2)]
    await asyncio.gather(*(j.open() for j in again))
    try:
        for journal in again:
            assert [r.run_id for r in await journal.list_runs()] == ["run-1"]
        for bucket in again[0].buckets:
            info = await again[0].js.stream_info(f"KV_{bucket}")
            config = info.config
            assert (config.num_replicas, config.max_msgs_per_subject) == (1, 1)
            assert (config.storage, config.allow_direct) == ("file", False)
    finally:
        for journal in again:
            await journal.close()


async def test_a_replica_count_the_server_cannot_serve_is_a_clear_error(
    nats_url: str, nats_prefix: str
) -> None:
    first = NatsJournal(nats_url, prefix=nats_prefix)
    await first.open()
    await first.close()
    journal = NatsJournal(nats_url, prefix=nats_prefix, replicas=3)
    with pytest.raises(JournalError) as caught:
        await journal.open()
    message = str(caught.value)
    assert f"bucket '{nats_prefix}_events' has 1 replica(s)" in message
    assert "configured for 3, which needs a JetStream cluster" in message
    with pytest.raises(JournalError):
        await journal.get_run("run-1")


async def test_unreachable_nats_is_a_journal_error_without_credentials() -> None:
    port = free_port()  # nothing listens there
    journal = NatsJournal(f"nats://snap:hunter2@127.0.0.1:{port}", prefix="unreachable")
    with pytest.raises(JournalError) as caught:
        await journal.open()
    message = str(caught.value)
    assert f"cannot open the journal on NATS at nats://127.0.0.1:{port}" in message
    assert "hunter2" not in message and "snap:" not in message
    assert not isinstance(caught.value.__cause__, JournalError)  # the NATS error, as cause
    await journal.close()  # nothing to close, no error either


async def test_a_given_connection_is_shared_and_left_open(nats_url: str, nats_prefix: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        journal = NatsJournal([], prefix=nats_prefix, nc=nc)
        await journal.open()
        assert journal.nc is nc
        await journal.accept(a_run(), [])
        await journal.close()
        assert nc.is_connected
        with pytest.raises(JournalError):
            _ = journal.js
    finally:
        await nc.close()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prefix": "a.b"}, "prefix"),
        ({"prefix": ""}, "prefix"),
        ({"replicas": 0}, "replicas"),
        ({"timeout": 0}, "timeout"),
    ],
)
def test_bad_settings_are_refused_at_construction(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NatsJournal("nats://127.0.0.1:4222", **kwargs)


# --- keys and stored values


async def test_any_id_is_a_safe_key(replicas: list[NatsJournal]) -> None:
    a, b = replicas
    # Dots are key separators, "=" starts an escaped key, "YS5i" is base64 of "a.b".
    ids = ["run/ü. x", "a.b", "a_b", "YS5i", "=YS5i", "*", ">", ""]
    for n, run_id in enumerate(ids):
        run = a_run(n, run_id=run_id)
        await a.accept(run, steps_for(run, "x.y", "x_y", ""))
        await a.update_step(run_id, "x.y", attempts=n + 1)
        await a.put_lease(a_lease(n, lease_id=run_id, run_id=run_id))
    for n, run_id in enumerate(ids):
        run = await b.get_run(run_id)
        assert run is not None and run.event_id == f"evt-{n}"
        steps = await b.get_steps(run_id)
        assert [(s.name, s.attempts) for s in steps] == [("x.y", n + 1), ("x_y", 0), ("", 0)]
        assert [x.lease_id for x in await a.find_leases(run_id=run_id)] == [run_id]


async def test_an_unreadable_record_is_a_journal_error_not_a_crash(
    replicas: list[NatsJournal], nats_prefix: str
) -> None:
    a, b = replicas
    await a.accept(a_run(1), [])
    runs = await a.js.key_value(f"{nats_prefix}_runs")
    await runs.put("run-2", b"not json")
    await runs.put("run-3", json.dumps({"v": 99, "run": {}}).encode())
    with pytest.raises(JournalError, match="not valid JSON"):
        await b.get_run("run-2")
    with pytest.raises(JournalError, match="format version 99"):
        await b.get_run("run-3")
    await a.accept(a_run(4), [])

    async def b_lists_the_readable_ones() -> bool:
        return [r.run_id for r in await b.list_runs()] == ["run-4", "run-1"]

    await eventually(b_lists_the_readable_ones)


# --- NATS going away


class PrivateNats:
    """A nats-server process of this test's own, so it can be killed and restarted."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *(NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store)),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:  # ready when it greets a client
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                assert loop.time() < deadline, "nats-server did not start"
                await asyncio.sleep(0.02)
            else:
                writer.close()
                await writer.wait_closed()
                return

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()


@pytest.fixture
async def private_nats(tmp_path: Path) -> AsyncIterator[PrivateNats]:
    server = PrivateNats(tmp_path / "nats")
    await server.start()
    yield server
    await server.kill()


@pytest.mark.slow
async def test_nats_lost_and_back_journal_errors_then_recovers(
    private_nats: PrivateNats,
) -> None:
    journal = NatsJournal(private_nats.url, prefix="t", timeout=1.0)
    await journal.open()
    try:
        await journal.accept(a_run(1), steps_for(a_run(1), "s"))
        await private_nats.kill()
        failures = await asyncio.gather(
            journal.get_run("run-1"),
            journal.accept(a_run(2), []),
            journal.claim_step("run-1", "s", 1, 1.0),
            journal.list_runs(),
            return_exceptions=True,
        )
        assert all(isinstance(failure, JournalError) for failure in failures), failures
        await private_nats.start()  # same port, same store: a restart

        async def answers_again() -> bool:
            try:
                return await journal.get_run("run-1") is not None
            except JournalError:
                return False

        await eventually(answers_again, timeout=20)
        assert await journal.claim_step("run-1", "s", 1, 1.0)
        # Its index follows writes again, too.
        other = NatsJournal(private_nats.url, prefix="t")
        await other.open()
        try:
            await other.accept(a_run(3), [])
        finally:
            await other.close()

        async def sees_run_3() -> bool:
            return "run-3" in {r.run_id for r in await journal.list_runs()}

        await eventually(sees_run_3, timeout=20)
    finally:
        await journal.close()


def cluster_args(node: int, ports: list[int], routes: list[int], store: Path) -> list[str]:
    """Arguments of node ``node`` of a JetStream cluster on loopback."""
    return [
        *("-js", "-a", "127.0.0.1", "-p", str(ports[node]), "-sd", str(store / f"n{node}")),
        *("--server_name", f"n{node}", "--cluster_name", "snaphook-test"),
        *("--cluster", f"nats://127.0.0.1:{routes[node]}"),
        *("--routes", ",".join(f"nats://127.0.0.1:{port}" for port in routes)),
    ]


@pytest.mark.slow
async def test_an_existing_bucket_gets_the_configured_replicas_on_a_cluster(
    tmp_path: Path,
) -> None:
    ports, routes = [free_port() for _ in range(3)], [free_port() for _ in range(3)]
    procs = [
        await asyncio.create_subprocess_exec(
            *(NATS_SERVER, *cluster_args(i, ports, routes, tmp_path)),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for i in range(3)
    ]
    servers = [f"nats://127.0.0.1:{port}" for port in ports]
    try:

        async def opens(replicas: int) -> bool:
            journal = NatsJournal(servers, prefix="t", replicas=replicas)
            try:
                await journal.open()
            except JournalError:  # the cluster has not elected its JetStream leader yet
                return False
            try:
                await journal.accept(a_run(replicas), [])
                for bucket in journal.buckets:
                    info = await journal.js.stream_info(f"KV_{bucket}")
                    assert info.config.num_replicas == replicas
            finally:
                await journal.close()
            return True

        await eventually(lambda: opens(1), timeout=30)
        await eventually(lambda: opens(3), timeout=30)  # R1 -> R3 at start-up
        journal = NatsJournal(servers, prefix="t", replicas=3)
        await journal.open()
        try:
            assert [r.run_id for r in await journal.list_runs()] == ["run-3", "run-1"]
        finally:
            await journal.close()
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
