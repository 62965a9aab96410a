"""Ingress throughput and event → step latency of ``snaphook serve`` vs. a raw aiohttp handler.

    python benchmarks/ingress.py [--seconds 5] [--samples 1000] [--dir PATH]
                                 [--journal-sync full|normal] [--log-level info|...]

Both servers run as subprocesses on 127.0.0.1 and are driven by the same aiohttp client in
this process, so the ratios compare like with like on this machine:

* raw: a bare aiohttp handler that reads the body, parses the JSON and answers 202 —
  the floor any Python CloudEvents receiver pays;
* snaphook: ``snaphook serve`` with one blueprint whose ``backup.pre`` is a single
  in-process no-op step (``sleep`` 0 s), journal ``synchronous=FULL`` (the default), so
  every 202 means "on disk" and every run actually executes in the background.

Measured: (a) accepted events/s at a fixed concurrency; (b) at concurrency 1 and 8, the
202 latency and the latency from the client sending the event to the step starting (the
step's ``started_at`` from ``GET /v1/runs/{id}``; same machine, same ``time.time()``
clock). ``started_at`` is stamped just before the step's RUNNING record is committed, so
the function itself starts one journal commit later; ``finished_at`` of the no-op step
bounds that from above, and is shown as well. Put ``--dir`` on the disk the dispatcher
will use: on tmpfs fsync is free and the figures flatter the journal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from _common import (  # type: ignore[import-not-found]  # the sibling module
    SNAPHOOK,
    Sample,
    Server,
    drain,
    final_runs,
    free_port,
    pct,
    post,
    ratio,
    row,
    running,
    spawn,
    spawn_snaphook,
)

THROUGHPUT_CONCURRENCY = 32
LATENCY_CONCURRENCY = (1, 8)
WARMUP = 200  # requests sent before anything is measured
GOAL_RATIO = 0.5  # snaphook accepted/s vs raw
GOAL_P99_MS = 5.0  # event → step started, p99


# --- the baseline server ------------------------------------------------------------------


def serve_raw(port: int) -> None:
    """A raw aiohttp receiver: read, parse, 202. Run with ``--serve-raw PORT``."""
    from aiohttp import web

    async def receive(request: web.Request) -> web.Response:
        json.loads(await request.read())
        body = {"run_id": f"raw-{uuid.uuid4().hex[:20]}", "status": "accepted"}
        return web.json_response(body, status=202)

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"status": "ready"})

    app = web.Application()
    app.add_routes([web.post("/v1/events", receive), web.get("/readyz", ready)])
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=lambda _: None)


# --- servers under test -------------------------------------------------------------------


def spawn_raw(workdir: Path) -> Server:
    port = free_port()
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve-raw", str(port)]
    return spawn("raw", argv, port, workdir, dict(os.environ))


def snaphook(workdir: Path, tag: str, options: Options) -> Server:
    settings = {
        "SNAPHOOK_JOURNAL_SYNC": options.journal_sync,
        "SNAPHOOK_LOG_LEVEL": options.log_level,
    }
    return spawn_snaphook(workdir, f"snaphook-{tag}", settings)


@dataclass(frozen=True)
class Options:
    seconds: float
    samples: int
    directory: str | None
    journal_sync: str
    log_level: str


# --- the client ---------------------------------------------------------------------------


async def warm_up(http: aiohttp.ClientSession, url: str) -> None:
    await asyncio.gather(*(post(http, url) for _ in range(WARMUP)))


async def throughput(
    http: aiohttp.ClientSession, url: str, concurrency: int, seconds: float
) -> tuple[int, int, float]:
    """``concurrency`` senders back to back for ``seconds``: (2xx, other answers, elapsed)."""
    accepted = errors = 0
    deadline = time.perf_counter() + seconds

    async def sender() -> None:
        nonlocal accepted, errors
        while time.perf_counter() < deadline:
            _, _, run_id = await post(http, url)
            if run_id is None:
                errors += 1
            else:
                accepted += 1

    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return accepted, errors, time.perf_counter() - started


async def sample(
    http: aiohttp.ClientSession, url: str, concurrency: int, count: int
) -> list[Sample]:
    """``count`` events from ``concurrency`` senders, each waiting for its answer."""
    todo = iter(range(count))
    results: list[Sample] = []

    async def sender() -> None:
        for _ in todo:
            results.append(await post(http, url))

    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return results


async def step_times(
    http: aiohttp.ClientSession, url: str, run_ids: list[str], timeout: float = 60.0
) -> dict[str, tuple[float, float]]:
    """(started_at, finished_at) of each run's step, once every run is final."""
    runs = await final_runs(http, url, run_ids, timeout)
    steps = {run_id: run["steps"][0] for run_id, run in runs.items()}
    return {run_id: (step["started_at"], step["finished_at"]) for run_id, step in steps.items()}


# --- measuring, interleaved ---------------------------------------------------------------
#
# The machine is shared (other processes, CPU frequency, disk), so the two servers are
# measured in alternating rounds rather than one after the other: slow spells then hit
# both columns alike and the ratios stay meaningful.

ROUNDS = 5


@dataclass
class Rate:
    accepted: int = 0
    errors: int = 0
    elapsed: float = 0.0

    @property
    def per_second(self) -> float:
        return self.accepted / self.elapsed if self.elapsed else 0.0


async def measure_throughput(
    http: aiohttp.ClientSession, raw: Server, snap: Server, seconds: float
) -> tuple[Rate, Rate, float]:
    """Accepted/s of each server over ROUNDS alternating windows; and snaphook's backlog
    (seconds to finish the runs a window accepted), drained before the next raw window so
    that snaphook's background work never slows the baseline down."""
    raw_rate, snap_rate, backlog = Rate(), Rate(), 0.0
    for _ in range(ROUNDS):
        for server, rate in ((raw, raw_rate), (snap, snap_rate)):
            accepted, errors, elapsed = await throughput(
                http, server.url, THROUGHPUT_CONCURRENCY, seconds / ROUNDS
            )
            rate.accepted += accepted
            rate.errors += errors
            rate.elapsed += elapsed
        backlog = max(backlog, await drain(http, snap.url))
    return raw_rate, snap_rate, backlog


@dataclass
class Latencies:
    ack: tuple[float, float]  # p50, p99 in ms
    started: tuple[float, float] = (math.nan, math.nan)
    finished: tuple[float, float] = (math.nan, math.nan)


async def measure_latency(
    http: aiohttp.ClientSession, raw: Server, snap: Server, concurrency: int, count: int
) -> tuple[Latencies, Latencies]:
    raw_samples: list[Sample] = []
    snap_samples: list[Sample] = []
    for _ in range(ROUNDS):
        raw_samples += await sample(http, raw.url, concurrency, count // ROUNDS)
        snap_samples += await sample(http, snap.url, concurrency, count // ROUNDS)
        await drain(http, snap.url)
    for server, samples in ((raw, raw_samples), (snap, snap_samples)):
        refused = sum(1 for _, _, run_id in samples if run_id is None)
        if refused:
            sys.exit(f"{server.name}: {refused} events were not accepted")
    raw_lat = Latencies(ack=pct([answered - sent for sent, answered, _ in raw_samples]))
    snap_lat = Latencies(ack=pct([answered - sent for sent, answered, _ in snap_samples]))
    sent_at = {run_id: sent for sent, _, run_id in snap_samples if run_id is not None}
    times = await step_times(http, snap.url, list(sent_at))
    snap_lat.started = pct([times[r][0] - sent_at[r] for r in sent_at])
    snap_lat.finished = pct([times[r][1] - sent_at[r] for r in sent_at])
    return raw_lat, snap_lat


# --- the report ---------------------------------------------------------------------------


def report(
    options: Options,
    rates: tuple[Rate, Rate, float],
    latencies: dict[int, tuple[Latencies, Latencies]],
) -> None:
    raw_rate, snap_rate, backlog = rates
    print(
        f"ingress benchmark: {os.cpu_count()} CPUs, client and servers on 127.0.0.1, "
        f"{ROUNDS} interleaved rounds; snaphook journal synchronous="
        f"{options.journal_sync.upper()} in {options.directory or tempfile.gettempdir()}, "
        f"log level {options.log_level}"
    )
    print(row("", "raw aiohttp", "snaphook", "ratio"))
    print("-" * 82)
    a, b = raw_rate.per_second, snap_rate.per_second
    label = f"(a) accepted events/s, {THROUGHPUT_CONCURRENCY} senders, {options.seconds:g} s"
    print(row(label, f"{a:,.0f}", f"{b:,.0f}", ratio(b, a)))
    print(row("    non-2xx answers", str(raw_rate.errors), str(snap_rate.errors)))
    print(row("    runs left running after a window (s)", "", f"{backlog:.2f}"))
    for c, (raw, snap) in latencies.items():
        print(f"(b) {c} sender(s), {options.samples} events each, ms")
        lines = [
            ("202 answer", raw.ack, snap.ack),
            ("event -> step started_at", raw.ack, snap.started),
            ("event -> no-op step finished_at", raw.ack, snap.finished),
        ]
        for label, base, value in lines:
            for name, i in (("p50", 0), ("p99", 1)):
                cells = f"{base[i]:.2f}", f"{value[i]:.2f}", ratio(value[i], base[i])
                print(row(f"    {label} {name}", *cells))
    print("-" * 82)
    print("raw column of the step rows: the raw handler's request latency (its 202)")
    verdict = "met" if b >= GOAL_RATIO * a else "MISSED"
    print(f"goal: accepted/s >= {GOAL_RATIO}x raw: {ratio(b, a)} {verdict}")
    for c, (_, snap) in latencies.items():
        p99 = snap.started[1]
        verdict = "met" if p99 <= GOAL_P99_MS else "MISSED"
        print(f"goal: event -> step started p99 <= {GOAL_P99_MS:g} ms, {c} sender(s): "
              f"{p99:.2f} ms {verdict}")  # fmt: skip


async def main(options: Options) -> None:
    if not SNAPHOOK.exists():
        sys.exit(f"{SNAPHOOK} not found: install the project into this interpreter's venv")
    timeout = aiohttp.ClientTimeout(total=60)
    with tempfile.TemporaryDirectory(dir=options.directory, prefix="ingress-bench-") as tmp:
        workdir = Path(tmp)
        connector = aiohttp.TCPConnector(limit=THROUGHPUT_CONCURRENCY)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            with contextlib.ExitStack() as stack:
                raw = stack.enter_context(running(spawn_raw(workdir)))
                # Two snaphooks, each with its own state directory: latency on a small
                # journal, throughput from an empty one, like the baseline.
                lat = stack.enter_context(running(snaphook(workdir, "latency", options)))
                tput = stack.enter_context(running(snaphook(workdir, "throughput", options)))
                for server in (raw, lat, tput):
                    await server.ready(http)
                    await warm_up(http, server.url)
                    if server is not raw:
                        await drain(http, server.url)
                latencies = {
                    c: await measure_latency(http, raw, lat, c, options.samples)
                    for c in LATENCY_CONCURRENCY
                }
                rates = await measure_throughput(http, raw, tput, options.seconds)
    report(options, rates, latencies)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=5.0, help="throughput window")
    parser.add_argument(
        "--samples", type=int, default=1000, help="latency events per concurrency level"
    )
    parser.add_argument("--dir", default=None, help="where to put the state directories")
    parser.add_argument(
        "--journal-sync", choices=["full", "normal"], default="full", help="snaphook journal_sync"
    )
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], default="info"
    )
    parser.add_argument("--serve-raw", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_raw is not None:
        serve_raw(args.serve_raw)
    else:
        asyncio.run(
            main(Options(args.seconds, args.samples, args.dir, args.journal_sync, args.log_level))
        )
