"""Crash recovery end to end: a real ``snaphook serve`` is killed with SIGKILL mid-work.

What must hold after the restart on the same state directory:

* every event that got a 2xx is in the journal and its run reaches a final state, once;
* no step executes twice (the test functions append ``run_id/step`` to an effects file);
* a step that was running at the kill is failed as ``interrupted``, and the run's
  ``always`` finalizer still runs;
* a redelivered event returns its existing run and starts nothing;
* a freeze lease held at the kill is released (by the failed run or by the reaper).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import event_json, free_port
from tests.processes import parse_log_line, sigkill, step_just_started, tail, wait_ready

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SNAPHOOK = Path(sys.executable).with_name("snaphook")

BURST = 150
CONCURRENCY = 20
KILL_AFTER = 60  # acknowledged events before the kill may come
GATE = BURST - 2 * CONCURRENCY  # acknowledged events after which senders await the kill
SETTLE = 30.0  # bound on every wait for the server to get somewhere

BLUEPRINTS = {
    "crash": """
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: crash}
spec:
  actions:
    backup.pre:
      - {name: a, function: test.effect, with: {seconds: 0.05}}
      - {name: b, function: test.effect, needs: [a], with: {seconds: 0.2}}
      - {name: report, function: test.effect, when: always}
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
        lease: {ttl: 2s, release: test.thaw}
      - {name: hold, function: test.effect, needs: [freeze], with: {seconds: 30}}
""",
    "frozen-only": """
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: frozen-only}
spec:
  actions:
    backup.pre:
      - name: freeze
        function: test.freeze
        with: {db: orders}
        lease: {ttl: 2s, release: test.thaw}
""",
}
BINDINGS = [
    {"blueprint": "crash", "match": {"namespace": "ns"}},
    {"blueprint": "frozen", "match": {"namespace": "frz"}},
    {"blueprint": "frozen-only", "match": {"namespace": "frzonly"}},
]


@dataclass
class Server:
    """``snaphook serve`` subprocesses sharing one state directory, one at a time."""

    root: Path
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    logs: list[Path] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # more settings
    args: list[str] = field(default_factory=list)  # more ``serve`` options, e.g. --backend

    @property
    def effects_path(self) -> Path:
        return self.root / "effects.txt"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> None:
        assert self.proc is None, "a server is already running"
        hooks = self.root / "hooks"
        hooks.mkdir(exist_ok=True)
        for name, text in BLUEPRINTS.items():
            (hooks / f"{name}.yaml").write_text(text, encoding="utf-8")
        config = self.root / "config.yaml"
        document = {"apiVersion": "snaphook.io/v1", "kind": "Config", "bindings": BINDINGS}
        config.write_text(yaml.safe_dump(document), encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPHOOK_")}
        env.update(
            SNAPHOOK_FUNCTION_MODULES="tests.hookfns",
            SNAPHOOK_TEST_EFFECTS=str(self.effects_path),
            SNAPHOOK_LEASE_REAP_INTERVAL="0.2",
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        )
        env.update(self.env)
        self.port = free_port()
        log = self.root / f"server{len(self.logs)}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    str(SNAPHOOK),
                    "serve",
                    "--host=127.0.0.1",
                    f"--port={self.port}",
                    f"--state-dir={self.root / 'state'}",
                    f"--hooks={hooks}",
                    f"--config={config}",
                    *self.args,
                ],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, exactly like a node or OOM kill."""
        if self.proc is None:
            return
        sigkill(self.proc)
        self.proc = None

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.logs[-1], lines) if self.logs else "(no server log)"

    def log_entries(self, index: int) -> list[dict[str, Any]]:
        """The JSON log lines of the ``index``-th server (a line cut by the kill is dropped)."""
        text = self.logs[index].read_text(encoding="utf-8", errors="replace")
        return [entry for entry in map(parse_log_line, text.splitlines()) if entry]

    def effects(self) -> Counter[str]:
        if not self.effects_path.exists():
            return Counter()
        return Counter(self.effects_path.read_text(encoding="utf-8").split())

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def start(self, http: aiohttp.ClientSession) -> None:
        self.spawn()
        await wait_ready(http, self.url, alive=self.alive, log=self.log_tail, within=SETTLE)

    async def post(self, http: aiohttp.ClientSession, event: dict[str, Any]) -> tuple[int, Any]:
        headers = {"Content-Type": "application/cloudevents+json"}
        async with http.post(f"{self.url}/v1/events", json=event, headers=headers) as resp:
            return resp.status, await resp.json()

    async def get(self, http: aiohttp.ClientSession, path: str) -> dict[str, Any]:
        async with http.get(f"{self.url}{path}") as resp:
            assert resp.status == 200, f"GET {path}: {resp.status} {await resp.text()}"
            body: dict[str, Any] = await resp.json()
            return body

    async def all_final(
        self, http: aiohttp.ClientSession, run_ids: list[str]
    ) -> dict[str, dict[str, Any]]:
        """Poll until every run is final; the runs as GET /v1/runs/{id} shows them."""
        deadline = time.monotonic() + SETTLE
        runs: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            for run_id in run_ids:
                if run_id not in runs or runs[run_id]["status"] not in ("succeeded", "failed"):
                    runs[run_id] = await self.get(http, f"/v1/runs/{run_id}")
            if all(run["status"] in ("succeeded", "failed") for run in runs.values()):
                return runs
            await asyncio.sleep(0.1)
        stuck = {
            r: runs[r]["status"]
            for r in run_ids
            if runs[r]["status"] not in ("succeeded", "failed")
        }
        pytest.fail(f"runs not final within {SETTLE}s: {stuck}\n{self.log_tail()}")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    assert SNAPHOOK.exists(), f"{SNAPHOOK} not found: install the project into this venv"
    srv = Server(tmp_path)
    try:
        yield srv
    finally:
        srv.kill()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=SETTLE)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        yield session


def step(run: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in run["steps"] if s["name"] == name)


def interrupted(s: dict[str, Any]) -> bool:
    return s["status"] == "failed" and "interrupted" in (s["error"] or "")


def run_log_counts(entries: list[dict[str, Any]], message: str) -> Counter[str]:
    return Counter(e["run_id"] for e in entries if e.get("msg") == message and "run_id" in e)


async def burst_with_kill(
    server: Server, http: aiohttp.ClientSession, events: list[dict[str, Any]]
) -> tuple[dict[str, dict[str, Any]], int, str]:
    """Post ``events`` CONCURRENCY at a time and SIGKILL the server mid-burst.

    The kill comes once KILL_AFTER events were acknowledged, as soon as the server logs
    that step ``b`` (0.2 s) of an acknowledged run just started: at least that step is
    surely cut. Senders past GATE acknowledgements hold until the kill, so the burst
    cannot end first; they then fail to connect, as a platform's sender would.

    Returns the acknowledged events by run id, how many requests failed (never
    acknowledged, so nothing is owed for them), and the id of the run caught in ``b``.
    """
    acknowledged: dict[str, dict[str, Any]] = {}
    failed = 0
    enough, killed = asyncio.Event(), asyncio.Event()
    slots = asyncio.Semaphore(CONCURRENCY)

    async def one(event: dict[str, Any]) -> None:
        nonlocal failed
        async with slots:
            if len(acknowledged) >= GATE:
                await killed.wait()
            try:
                status, body = await server.post(http, event)
            except (aiohttp.ClientError, OSError, ValueError):
                failed += 1
                return
            assert 200 <= status < 300, f"{status}: {body}"
            acknowledged[body["run_id"]] = event
            if len(acknowledged) >= KILL_AFTER:
                enough.set()

    async def killer() -> str:
        await enough.wait()
        try:
            cut = await step_just_started(server.logs[-1], "b", acknowledged, SETTLE)
            server.kill()
            return cut
        finally:
            killed.set()

    senders = asyncio.gather(*(one(e) for e in events))
    try:
        cut = await killer()
    finally:
        await senders
    return acknowledged, failed, cut


async def test_kill_mid_burst_resumes_every_acknowledged_run_once(
    server: Server, http: aiohttp.ClientSession
) -> None:
    await server.start(http)
    events = [event_json(event_id=f"burst-{i}", backup_id=f"b{i}") for i in range(BURST)]
    acknowledged, failed, cut = await burst_with_kill(server, http, events)
    assert len(acknowledged) >= KILL_AFTER
    assert failed > 0 and len(acknowledged) + failed == BURST
    before = server.effects()

    await server.start(http)
    run_ids = sorted(acknowledged)
    runs = await server.all_final(http, run_ids)
    effects = server.effects()

    # Every acknowledged event has its run, and the run's record names that event.
    for run_id, event in acknowledged.items():
        run = runs[run_id]
        assert (run["source"], run["event_id"]) == (event["source"], event["id"])
        assert [s["name"] for s in run["steps"]] == ["a", "b", "report"]

    # Listed exactly once (there are at most BURST runs, well within one page).
    listed = Counter(r["run_id"] for r in (await server.get(http, "/v1/runs?limit=1000"))["runs"])
    assert all(listed[run_id] == 1 for run_id in run_ids), listed
    assert max(listed.values()) == 1

    # No step ran twice; a succeeded step ran exactly once, a skipped one never.
    duplicated = {key: n for key, n in effects.items() if n > 1}
    assert not duplicated, f"steps executed more than once: {duplicated}"
    for run_id, run in runs.items():
        for s in run["steps"]:
            count = effects[f"{run_id}/{s['name']}"]
            if s["status"] == "succeeded":
                assert count == 1, (run_id, s)
            elif s["status"] == "skipped":
                assert count == 0, (run_id, s)
            else:
                # Failed only by the kill: the effect may or may not have happened.
                assert interrupted(s), (run_id, s)

    # Succeeded, or failed because a step was interrupted by the kill; the `always`
    # finalizer ran even then. A `report` that was itself running at the kill is the one
    # exception: it is failed as interrupted, not run a second time.
    outcomes: Counter[str] = Counter()
    for run_id, run in runs.items():
        report = step(run, "report")
        if run["status"] == "succeeded":
            assert all(s["status"] == "succeeded" for s in run["steps"]), run
            assert run["allowed"] is True
            outcomes["succeeded"] += 1
            continue
        assert run["status"] == "failed"
        assert "interrupted" in run["reason"] or interrupted(report), json.dumps(run)
        assert any(interrupted(s) for s in run["steps"]), run
        if interrupted(report):
            outcomes["report interrupted"] += 1
        else:
            assert report["status"] == "succeeded", (run_id, report)
            assert "interrupted" in run["reason"], run
            assert run["allowed"] is False
            outcomes["main step interrupted"] += 1
    # The run caught running `b` at the kill: cut there, denied, and reported.
    cut_run = runs[cut]
    assert interrupted(step(cut_run, "b")), cut_run
    assert step(cut_run, "report")["status"] == "succeeded", cut_run
    assert cut_run["status"] == "failed" and cut_run["allowed"] is False, cut_run
    assert outcomes["main step interrupted"] > 0, outcomes

    # Each run reached its final state once: at most one "run finished" over both
    # servers' lifetimes, and every run the restarted server resumed finished there.
    first, second = server.log_entries(0), server.log_entries(1)
    finished_first = run_log_counts(first, "run finished")
    finished_second = run_log_counts(second, "run finished")
    resumed = set(run_log_counts(second, "run started"))
    assert cut in resumed
    for run_id in run_ids:
        assert finished_first[run_id] + finished_second[run_id] <= 1, run_id
        if run_id in resumed:
            assert finished_second[run_id] == 1 and finished_first[run_id] == 0, run_id
    # A run the first server finished is final in its journal and is not started again.
    assert not resumed & set(finished_first)
    assert all(before[k] <= effects[k] for k in before)

    # Redelivery after the restart: the same run, nothing new executes.
    for run_id, event in acknowledged.items():
        status, body = await server.post(http, event)
        assert status == 202, body
        assert body["run_id"] == run_id
        assert body["status"] == runs[run_id]["status"]
    # A fresh event as a barrier: once it is final, anything the redeliveries could have
    # started would have had the same time to leave an effect.
    status, body = await server.post(http, event_json(event_id="after-restart"))
    assert status == 202, body
    fresh = (await server.all_final(http, [body["run_id"]]))[body["run_id"]]
    assert fresh["status"] == "succeeded", fresh
    added = server.effects() - effects
    # Runs journaled but never acknowledged before the kill may still be finishing now:
    # only the acknowledged (redelivered) runs must show nothing new.
    assert not {key for key in added if key.split("/", 1)[0] in acknowledged}
    assert all(added[f"{fresh['run_id']}/{name}"] == 1 for name in ("a", "b", "report"))


async def test_lease_held_at_kill_is_released_after_restart(
    server: Server, http: aiohttp.ClientSession
) -> None:
    await server.start(http)
    status, body = await server.post(http, event_json(subject="frz/Deployment/db"))
    assert status == 202, body
    held = body["run_id"]  # frozen, then killed while `hold` runs
    status, body = await server.post(http, event_json(subject="frzonly/Deployment/db"))
    assert status == 202, body
    done = body["run_id"]  # frozen and finished; its lease waits for a post event

    deadline = time.monotonic() + SETTLE
    while True:
        run = await server.get(http, f"/v1/runs/{held}")
        other = await server.get(http, f"/v1/runs/{done}")
        if step(run, "hold")["status"] == "running" and other["status"] == "succeeded":
            break
        assert time.monotonic() < deadline, (run, other)
        await asyncio.sleep(0.02)
    server.kill()
    # Both leases were open at the kill (the TTL is far longer than this took).
    assert [lease["status"] for lease in run["leases"]] == ["open"], run["leases"]
    assert [lease["status"] for lease in other["leases"]] == ["open"], other["leases"]
    assert step(run, "freeze")["status"] == "succeeded"
    assert server.effects()[f"{held}/freeze.release"] == 0

    await server.start(http)
    deadline = time.monotonic() + SETTLE
    while True:
        run = await server.get(http, f"/v1/runs/{held}")
        other = await server.get(http, f"/v1/runs/{done}")
        statuses = [lease["status"] for lease in run["leases"] + other["leases"]]
        if run["status"] == "failed" and all(s != "open" and s != "releasing" for s in statuses):
            break
        assert time.monotonic() < deadline, (run, other, server.log_tail())
        await asyncio.sleep(0.05)

    # The interrupted run failed, and its lease was thawed once: by the failed run or by
    # the reaper, whichever won the compare-and-set.
    assert interrupted(step(run, "hold")), run
    assert "interrupted" in run["reason"]
    [lease] = run["leases"]
    assert lease["status"] == "released", lease
    assert lease["released_by"] in ("run-failed", "reaper"), lease
    # The finished run's lease outlived it; the reaper thawed it once the TTL ran out.
    assert other["status"] == "succeeded"
    [lease] = other["leases"]
    assert lease["status"] == "released", lease
    assert lease["released_by"] == "reaper", lease

    effects = server.effects()
    assert effects[f"{held}/freeze"] == 1
    assert effects[f"{held}/freeze.release"] == 1
    assert effects[f"{held}/hold"] == 0  # killed mid-sleep, never re-run
    assert effects[f"{done}/freeze"] == 1
    assert effects[f"{done}/freeze.release"] == 1
