"""Scale-out on NATS JetStream: dispatcher replicas sharing one run queue and journal.

What must hold, whichever replica accepts or executes what:

* every event answered 2xx reaches a final run state exactly once, also when a replica is
  killed (SIGKILL) mid-burst, or a node of a 3-node NATS cluster (R3) dies mid-burst;
* no step attempt executes twice: the test functions count their effects per
  (run, step, attempt) in one Redis hash that every replica writes to;
* the run a killed replica was executing is taken over by another once its heartbeats
  stop; the step cut by the kill is failed as interrupted, not run again;
* a sync ``?wait=`` request answered by one replica for a run executed by another gets
  the decision, and a decision timeout answered on one replica stops the run on the other;
* an expired freeze lease is released exactly once with every replica's reaper racing;
* an event sent again after the duplicate window still runs once.

Each test runs its own nats-server (tests/nats_cluster.py) and its own name prefix.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import nats
import nats.errors
import pytest
from nats.js.api import RetentionPolicy
from redis.asyncio import Redis

from dispatcher.app import open_backend
from dispatcher.errors import JournalError
from dispatcher.events import hook_event_from
from dispatcher.run_owners import RunOwners
from dispatcher.runner import Runner
from dispatcher.settings import Settings
from tests.conftest import Harness, HarnessFactory, event_json, eventually
from tests.nats_cluster import NatsCluster
from tests.processes import step_just_started
from tests.test_crash_recovery import (
    SETTLE,
    SNAPHOOK,
    Server,
    interrupted,
    run_log_counts,
    step,
)

REDIS_URL = "redis://127.0.0.1:6379/0"
ACK_WAIT = 2.0  # seconds without a heartbeat before another replica takes a run over
BURST = 120
CONCURRENCY = 16
KILL_AFTER = 40  # acknowledged events before the kill may come
GATE = BURST - 2 * CONCURRENCY  # senders past this many acknowledgements await the kill

BLUEPRINTS = {
    "decide": """
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: decide}
spec:
  actions:
    backup.pre:
      - {name: check, function: test.effect, with: {seconds: 0.3}}
      - {name: then, function: test.effect, needs: [check]}
""",
    "cut": """
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: cut}
spec:
  actions:
    backup.pre:
      - {name: check, function: test.effect, with: {seconds: 1.0}}
      - {name: then, function: test.effect, needs: [check]}
""",
    "hold": """
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: hold}
spec:
  actions:
    backup.pre:
      - {name: hold, function: test.effect, with: {seconds: 60}}
""",
    "slow": """
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: slow}
spec:
  actions:
    backup.pre:
      - {name: slow, function: test.effect, with: {seconds: 2.0}}
""",
    "frozen": """
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: frozen}
spec:
  actions:
    backup.pre:
      - name: freeze
        function: test.freeze
        with: {db: orders}
        lease: {ttl: 1s, release: test.thaw}
""",
}
BINDINGS = [
    {"blueprint": "decide", "match": {"namespace": "decide"}},
    {"blueprint": "cut", "match": {"namespace": "cut"}, "timeout": "0.3s"},
    {"blueprint": "hold", "match": {"namespace": "hold"}},
    {"blueprint": "slow", "match": {"namespace": "slow"}},
    {"blueprint": "frozen", "match": {"namespace": "frz"}},
]


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def nats_node(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    """One JetStream server of this test's own."""
    node = NatsCluster(tmp_path / "nats", size=1)
    node.start()
    try:
        await node.ready()
        yield node
    finally:
        node.kill()


@pytest.fixture
async def nats_cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    """Three clustered JetStream servers: R3 streams and buckets survive one's death."""
    cluster = NatsCluster(tmp_path / "nats", size=3)
    cluster.start()
    try:
        await cluster.ready()
        yield cluster
    finally:
        cluster.kill()


Replicas = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def replica(nats_node: NatsCluster, harness: HarnessFactory, prefix: str) -> Replicas:
    """In-process replicas (one app each, own NATS connection) on one queue and journal.

    Requested after ``nats_node``, so the apps are closed before the server stops.
    """

    async def make(**overrides: Any) -> Harness:
        settings: dict[str, Any] = {
            "backend": "nats",
            "nats_url": nats_node.url,
            "nats_prefix": prefix,
            "nats_ack_wait": ACK_WAIT,
            "shutdown_grace": 0.2,
            **overrides,
        }
        return await harness(BLUEPRINTS, bindings=BINDINGS, **settings)

    return make


@pytest.fixture
async def effects_hash() -> AsyncIterator[str]:
    """A Redis hash every replica's test functions count their effects in."""
    name = f"snaphook-test-effects-{uuid.uuid4().hex}"
    yield name
    async with Redis.from_url(REDIS_URL) as redis:
        await redis.delete(name)


async def read_effects(name: str) -> Counter[str]:
    """``run/step/attempt`` → how many times that attempt's function took effect."""
    async with Redis.from_url(REDIS_URL) as redis:
        raw = await redis.hgetall(name)
    return Counter({k.decode(): int(v) for k, v in raw.items()})


def effects_of(recorders: list[Harness], key: str) -> int:
    return sum(h.recorder.effects[key] for h in recorders)


async def stream_state(url: str, prefix: str) -> tuple[int, int]:
    """(messages still in the run queue, messages ever published to it)."""
    nc = await nats.connect(servers=url.split(","), error_cb=_quiet)
    try:
        info = await nc.jetstream().stream_info(f"{prefix}_EVENTS")
    finally:
        await nc.close()
    return info.state.messages, info.state.last_seq


async def _quiet(exc: Exception) -> None:
    """The killed node of a cluster is expected to refuse connections."""


async def run_of(h: Harness, run_id: str) -> dict[str, Any]:
    resp = await h.client.get(f"/v1/runs/{run_id}")
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


# --- several replicas in one process -------------------------------------------------------


async def busy_and_free(replica: Replicas) -> tuple[Harness, Harness]:
    """Replicas B and A: B's one run slot is busy with a long run, so A executes every
    run sent after."""
    b = await replica(max_concurrent_runs=1)
    held = await b.emit(subject="hold/Deployment/db")
    await eventually(
        lambda: _step_status(b, held["run_id"], "hold", "running"),
        SETTLE,
        what="B runs the hold step",
    )
    return b, await replica()


async def test_sync_wait_answers_on_a_replica_that_does_not_execute_the_run(
    replica: Replicas,
) -> None:
    b, a = await busy_and_free(replica)

    resp = await b.send(event_json(subject="decide/Deployment/db"), wait=10)
    assert resp.status == 200, await resp.text()
    answer = await resp.json()
    # The decision came after the 0.3 s check step, executed on A: B was woken by it.
    assert answer["allowed"] is True, answer
    assert answer["reason"] == "2 step(s) succeeded", answer
    run_id = answer["run_id"]
    assert a.recorder.effects[f"{run_id}/check"] == 1
    assert b.recorder.effects[f"{run_id}/check"] == 0
    final = await b.state.runner.wait_final(run_id, 10)
    assert final is not None and final.status.value == "succeeded", final


async def test_decision_timeout_on_one_replica_stops_the_run_on_another(
    replica: Replicas,
) -> None:
    b, a = await busy_and_free(replica)

    # The binding gives the decision 0.3 s; the check step takes 1 s on A.
    resp = await b.send(event_json(subject="cut/Deployment/db"), wait=10)
    assert resp.status == 200, await resp.text()
    answer = await resp.json()
    assert answer["allowed"] is False, answer
    assert "no decision within 0.3s" in answer["reason"], answer
    run_id = answer["run_id"]

    # A learns of B's answer through the journal: the run stops after the running step.
    final = await a.state.runner.wait_final(run_id, 10)
    assert final is not None and final.status.value == "failed", final
    assert final.allowed is False and "no decision within 0.3s" in final.reason, final
    run = await run_of(a, run_id)
    assert step(run, "check")["status"] == "succeeded", run
    assert step(run, "then")["status"] == "skipped", run
    assert a.recorder.effects[f"{run_id}/check"] == 1
    assert effects_of([a, b], f"{run_id}/then") == 0


async def test_event_sent_again_after_the_dedup_window_runs_once(
    replica: Replicas, nats_node: NatsCluster, prefix: str
) -> None:
    # The 2 s step also outlasts ack_wait (1 s): heartbeats keep the run where it is.
    a = await replica(nats_dedup_window=1, nats_ack_wait=1)
    b = await replica(nats_dedup_window=1, nats_ack_wait=1)
    event_id = uuid.uuid4().hex
    first = await a.emit(subject="slow/Deployment/db", event_id=event_id)
    run_id = first["run_id"]
    await eventually(
        lambda: _step_status(a, run_id, "slow", "running"), SETTLE, what="the slow step runs"
    )
    # The window is a span of time: only waiting it out makes JetStream forget the id.
    await asyncio.sleep(1.1)

    again = await b.emit(subject="slow/Deployment/db", event_id=event_id)
    assert again["run_id"] == run_id
    # Queued a second time (the window had passed)...
    assert (await stream_state(nats_node.url, prefix))[1] == 2
    final = await a.state.runner.wait_final(run_id, 10)
    assert final is not None and final.status.value == "succeeded", final
    # ...and acknowledged without a second execution; nothing is left in the queue.
    assert effects_of([a, b], f"{run_id}/slow") == 1

    async def drained() -> bool:
        return (await stream_state(nats_node.url, prefix))[0] == 0

    await eventually(drained, SETTLE, what="the run queue is empty")
    run = await run_of(b, run_id)
    assert step(run, "slow")["attempts"] == 1, run
    # Neither message was ever redelivered: no replica lost its heartbeats.
    nc = await nats.connect(nats_node.url)
    try:
        consumer = await nc.jetstream().consumer_info(f"{prefix}_EVENTS", f"{prefix}_runners")
    finally:
        await nc.close()
    assert consumer.num_redelivered == 0
    assert consumer.delivered.stream_seq == 2


async def test_a_run_owned_by_a_live_replica_waits_and_is_taken_once_its_owner_is_gone(
    replica: Replicas, nats_node: NatsCluster, prefix: str
) -> None:
    """The message of a run reaches a replica while another still owns the run (it was cut
    off from the queue, not from the owners bucket): the replica holds the message and
    executes nothing until the owner record expires."""
    b = await replica(nats_ack_wait=1)
    event = event_json(subject="decide/Deployment/db")
    hook = hook_event_from({k: v for k, v in event.items() if k != "data"}, event["data"])
    _, run, steps = await b.state.dispatcher.bind(hook)
    stored, created = await b.state.journal.accept(run, steps)
    assert created
    nc = await nats.connect(nats_node.url)
    try:
        js = nc.jetstream()
        elsewhere = await RunOwners.open(js, f"{prefix}_OWNERS", ttl=1, replicas=1)
        seq = (await stream_state(nats_node.url, prefix))[1] + 1  # the message about to be
        owner, _ = await elsewhere.take(run.run_id, seq)
        assert owner is not None
        await b.state.dispatcher.queue.enqueue(stored, steps, created=True)
        # The owner lives on (refreshing its record) for 2 s: B must not touch the run.
        for _ in range(8):
            await asyncio.sleep(0.25)
            assert await elsewhere.refresh(owner) is True
            assert (await run_of(b, run.run_id))["status"] == "accepted"
        # The owner dies: its record expires within the TTL and B takes the run.
        final = await b.state.runner.wait_final(run.run_id, 10)
        assert final is not None and final.status.value == "succeeded", final
        assert b.recorder.effects[f"{run.run_id}/check"] == 1
        consumer = await js.consumer_info(f"{prefix}_EVENTS", f"{prefix}_runners")
        assert consumer.num_redelivered == 0  # B held the message all along
    finally:
        await nc.close()


async def test_expired_lease_is_released_once_while_three_reapers_race(
    replica: Replicas,
) -> None:
    replicas = [await replica(lease_reap_interval=0.01) for _ in range(3)]
    run_ids = []
    for i in range(6):
        target = replicas[i % 3]
        body = await target.emit(subject=f"frz/Deployment/db{i}", backup_id=f"b{i}")
        run_ids.append(body["run_id"])

    async def all_released() -> bool:
        for run_id in run_ids:
            leases = (await run_of(replicas[0], run_id))["leases"]
            if [lease["status"] for lease in leases] != ["released"]:
                return False
        return True

    await eventually(all_released, SETTLE, what="every lease released")
    for run_id in run_ids:
        [lease] = (await run_of(replicas[0], run_id))["leases"]
        assert lease["released_by"] == "reaper", lease
        assert effects_of(replicas, f"{run_id}/freeze") == 1
        assert effects_of(replicas, f"{run_id}/freeze.release") == 1
    # Every reaper had its chance: their passes kept running after the releases.
    await asyncio.sleep(0.1)
    assert sum(effects_of(replicas, f"{r}/freeze.release") for r in run_ids) == len(run_ids)


async def _step_status(h: Harness, run_id: str, name: str, status: str) -> bool:
    return bool(step(await run_of(h, run_id), name)["status"] == status)


# --- replicas as processes: kill -9 --------------------------------------------------------


class Fleet:
    """``snaphook serve --backend nats`` replicas on one NATS, counting effects in Redis."""

    def __init__(self, root: Path, url: str, prefix: str, effects: str, nats_replicas: int):
        env = {
            "SNAPHOOK_NATS_PREFIX": prefix,
            "SNAPHOOK_NATS_REPLICAS": str(nats_replicas),
            "SNAPHOOK_NATS_ACK_WAIT": str(ACK_WAIT),
            "SNAPHOOK_TEST_EFFECTS_REDIS": f"{REDIS_URL}#{effects}",
            "SNAPHOOK_SHUTDOWN_GRACE": "1",
        }
        self.url = url
        self.servers = []
        for i in range(3):
            (root / f"r{i}").mkdir(parents=True)
            server = Server(root / f"r{i}", env=env, args=["--backend=nats", f"--nats-url={url}"])
            self.servers.append(server)

    async def start(self, http: aiohttp.ClientSession) -> None:
        # The first creates the streams and buckets, the others adopt them. (Starting all
        # at once on a fresh cluster works too, but the journal's bucket creation
        # sometimes times out under that race on a loaded machine; then a replica exits
        # and is restarted by its supervisor, which this test does not play.)
        await self.servers[0].start(http)
        await asyncio.gather(*(s.start(http) for s in self.servers[1:]))

    def kill(self) -> None:
        for s in self.servers:
            s.kill()

    @property
    def live(self) -> list[Server]:
        return [s for s in self.servers if s.proc is not None]

    def entries(self) -> list[list[dict[str, Any]]]:
        return [s.log_entries(0) for s in self.servers]


@pytest.fixture
def fleet_root(tmp_path: Path) -> Iterator[Path]:
    assert SNAPHOOK.exists(), f"{SNAPHOOK} not found: install the project into this venv"
    yield tmp_path / "fleet"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=SETTLE)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        yield session


async def burst(
    fleet: Fleet,
    http: aiohttp.ClientSession,
    events: list[dict[str, Any]],
    kill: Callable[[dict[str, dict[str, Any]]], Awaitable[str | None]],
) -> tuple[dict[str, dict[str, Any]], str | None]:
    """Post ``events`` round-robin over the replicas, CONCURRENCY at a time, and ``kill``
    something once KILL_AFTER were acknowledged.

    Like a load balancer, a sender whose replica does not answer (killed) or answers 503
    (its NATS node died) sends the same event to the next live replica. Returns the
    acknowledged events by run id and what ``kill`` returned.
    """
    acknowledged: dict[str, dict[str, Any]] = {}
    enough, killed = asyncio.Event(), asyncio.Event()
    slots = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int, event: dict[str, Any]) -> None:
        async with slots:
            if len(acknowledged) >= GATE:
                await killed.wait()
            deadline = time.monotonic() + SETTLE
            turn = i
            while time.monotonic() < deadline:
                live = fleet.live
                target = live[turn % len(live)]
                turn += 1
                try:
                    status, body = await target.post(http, event)
                except (aiohttp.ClientError, OSError, ValueError):
                    continue
                if status == 503:
                    await asyncio.sleep(0.1)
                    continue
                assert 200 <= status < 300, f"{status}: {body}"
                acknowledged[body["run_id"]] = event
                if len(acknowledged) >= KILL_AFTER:
                    enough.set()
                return
            pytest.fail(f"event {event['id']} never acknowledged")

    async def killer() -> str | None:
        await enough.wait()
        try:
            return await kill(acknowledged)
        finally:
            killed.set()

    senders = asyncio.gather(*(one(i, e) for i, e in enumerate(events)))
    try:
        result = await killer()
    finally:
        await senders
    return acknowledged, result


async def kill_replica_in_step_b(fleet: Fleet, acknowledged: dict[str, Any]) -> str:
    """SIGKILL replica 0 just after it logged that an acknowledged run's step ``b`` (0.2 s)
    started: that step surely is cut. Returns the run's id."""
    server = fleet.servers[0]
    cut = await step_just_started(server.logs[-1], "b", acknowledged, SETTLE)
    server.kill()
    return cut


async def all_final(
    server: Server, http: aiohttp.ClientSession, run_ids: list[str]
) -> dict[str, dict[str, Any]]:
    """Poll until every run is final, as ``GET /v1/runs/{id}`` shows it. A ``503`` (the
    journal's NATS streams are electing leaders after a node died) is asked again."""
    runs: dict[str, dict[str, Any]] = {}

    async def done() -> bool:
        for run_id in run_ids:
            if run_id in runs and runs[run_id]["status"] in ("succeeded", "failed"):
                continue
            async with http.get(f"{server.url}/v1/runs/{run_id}") as resp:
                if resp.status == 503:
                    return False
                assert resp.status == 200, f"{run_id}: {resp.status} {await resp.text()}"
                runs[run_id] = await resp.json()
        return all(runs[r]["status"] in ("succeeded", "failed") for r in run_ids)

    await eventually(done, SETTLE, what=f"every run final on {server.url}\n{server.log_tail()}")
    return runs


async def check_exactly_once(
    fleet: Fleet,
    http: aiohttp.ClientSession,
    acknowledged: dict[str, dict[str, Any]],
    effects_hash: str,
    prefix: str,
) -> dict[str, dict[str, Any]]:
    """Every acknowledged event's run is final once; no step attempt took effect twice."""
    runs = await all_final(fleet.live[0], http, sorted(acknowledged))
    effects = await read_effects(effects_hash)
    doubled = {key: n for key, n in effects.items() if n > 1}
    assert not doubled, f"step attempts executed more than once: {doubled}"
    per_step = Counter({key.rsplit("/", 1)[0]: 0 for key in effects})
    for key, n in effects.items():
        per_step[key.rsplit("/", 1)[0]] += n
    for run_id, event in acknowledged.items():
        run = runs[run_id]
        assert (run["source"], run["event_id"]) == (event["source"], event["id"])
        assert [s["name"] for s in run["steps"]] == ["a", "b", "report"]
        for s in run["steps"]:
            count = per_step[f"{run_id}/{s['name']}"]
            if s["status"] == "succeeded":
                assert count == 1 and s["attempts"] == 1, (run_id, s, count)
            elif s["status"] == "skipped":
                assert count == 0, (run_id, s)
            else:
                assert interrupted(s), (run_id, s)  # its effect may or may not have happened
        if run["status"] == "succeeded":
            assert run["allowed"] is True, run
        else:
            assert any(interrupted(s) for s in run["steps"]), json.dumps(run)
    # Each run finished once over every replica's lifetime, the killed one's included.
    finished: Counter[str] = Counter()
    for entries in fleet.entries():
        finished += run_log_counts(entries, "run finished")
    assert all(finished[run_id] <= 1 for run_id in acknowledged), finished
    # Every message was acknowledged (runs final): the work queue is empty.

    async def drained() -> bool:
        try:
            return (await stream_state(fleet.url, prefix))[0] == 0
        except nats.errors.Error:  # a stream leader being elected after a node died
            return False

    await eventually(drained, SETTLE, what="the run queue is empty")
    return runs


@pytest.mark.slow
async def test_replica_killed_mid_burst_every_accepted_event_final_once(
    nats_node: NatsCluster,
    fleet_root: Path,
    http: aiohttp.ClientSession,
    effects_hash: str,
    prefix: str,
) -> None:
    fleet = Fleet(fleet_root, nats_node.url, prefix, effects_hash, nats_replicas=1)
    try:
        await fleet.start(http)
        events = [event_json(event_id=f"burst-{i}", backup_id=f"b{i}") for i in range(BURST)]

        async def kill(acknowledged: dict[str, Any]) -> str:
            return await kill_replica_in_step_b(fleet, acknowledged)

        acknowledged, cut = await burst(fleet, http, events, kill)
        assert len(acknowledged) == BURST  # every sender got its event accepted somewhere
        runs = await check_exactly_once(fleet, http, acknowledged, effects_hash, prefix)
        entries = fleet.entries()  # while the survivors live: their logs are complete
    finally:
        fleet.kill()

    # The run cut on the killed replica: taken over by another, b failed as interrupted
    # (not run again), the `always` report ran, the run was denied.
    assert cut is not None
    cut_run = runs[cut]
    assert interrupted(step(cut_run, "b")), cut_run
    assert step(cut_run, "report")["status"] == "succeeded", cut_run
    assert cut_run["status"] == "failed" and cut_run["allowed"] is False, cut_run
    dead, *survivors = entries
    assert run_log_counts(dead, "run taken")[cut] == 1
    assert sum(run_log_counts(e, "run taken")[cut] for e in survivors) == 1
    assert sum(run_log_counts(e, "run finished")[cut] for e in survivors) == 1
    # The burst was spread: every replica executed runs.
    assert all(run_log_counts(e, "run taken") for e in entries)


@pytest.mark.slow
async def test_nats_node_killed_mid_burst_r3_every_accepted_event_final_once(
    nats_cluster: NatsCluster,
    fleet_root: Path,
    http: aiohttp.ClientSession,
    effects_hash: str,
    prefix: str,
) -> None:
    fleet = Fleet(fleet_root, nats_cluster.url, prefix, effects_hash, nats_replicas=3)
    try:
        await fleet.start(http)
        events = [event_json(event_id=f"r3-{i}", backup_id=f"b{i}") for i in range(BURST)]

        async def kill(acknowledged: dict[str, Any]) -> str:
            # The leader of the run queue's stream: the node whose loss hurts most.
            nc = await nats.connect(nats_cluster.urls[0])
            try:
                info = await nc.jetstream().stream_info(f"{prefix}_EVENTS")
            finally:
                await nc.close()
            assert info.config.num_replicas == 3 and info.cluster is not None
            leader = next(n for n in nats_cluster.nodes if n.name == info.cluster.leader)
            leader.kill()
            return leader.name

        acknowledged, killed = await burst(fleet, http, events, kill)
        assert killed is not None
        assert len(acknowledged) == BURST
        runs = await check_exactly_once(fleet, http, acknowledged, effects_hash, prefix)
    finally:
        fleet.kill()
    assert Counter(run["status"] for run in runs.values())["succeeded"] > 0


async def test_queue_set_up_is_idempotent_and_adopts_what_exists(
    replica: Replicas, nats_node: NatsCluster, prefix: str
) -> None:
    first = await replica(nats_dedup_window=60)
    nc = await nats.connect(nats_node.url)
    try:
        js = nc.jetstream()
        stream = await js.stream_info(f"{prefix}_EVENTS")
        assert stream.config.duplicate_window == 60
        assert stream.config.retention == RetentionPolicy.WORK_QUEUE
        # An operator's change to the stream stays; the configured window wins.
        await js.update_stream(stream.config.evolve(max_msgs=100_000))
        await replica(nats_dedup_window=30, nats_ack_wait=5)
        stream = await js.stream_info(f"{prefix}_EVENTS")
        assert (stream.config.duplicate_window, stream.config.max_msgs) == (30, 100_000)
        consumer = await js.consumer_info(f"{prefix}_EVENTS", f"{prefix}_runners")
        assert consumer.config.ack_wait == 5
        owners = await js.stream_info(f"KV_{prefix}_OWNERS")
        assert owners.config.max_age == 5
    finally:
        await nc.close()
    body = await first.emit(subject="decide/Deployment/db")
    final = await first.state.runner.wait_final(body["run_id"], 10)
    assert final is not None and final.status.value == "succeeded", final


async def test_a_foreign_stream_under_the_queue_name_is_refused(
    nats_node: NatsCluster, prefix: str, tmp_path: Path
) -> None:
    nc = await nats.connect(nats_node.url)
    try:
        await nc.jetstream().add_stream(name=f"{prefix}_EVENTS", subjects=[f"{prefix}.other"])
    finally:
        await nc.close()
    settings = Settings.load(
        None, state_dir=tmp_path, backend="nats", nats_url=nats_node.url, nats_prefix=prefix
    )
    journal, queue = open_backend(settings)
    await journal.open()
    try:
        with pytest.raises(JournalError, match=f"stream {prefix}_EVENTS exists but is not"):
            await queue.start(cast(Runner, None))  # refused before it is used
    finally:
        await journal.close()
