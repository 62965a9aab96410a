"""Scale-out: 1 and 3 ``snaphook serve`` replicas on NATS JetStream vs 1 on SQLite.

    python benchmarks/scale_out.py [--seconds 6] [--samples 400] [--dir PATH]

Every configuration runs as subprocesses on 127.0.0.1 with the same blueprint (one
in-process no-op step) and is driven by one aiohttp client in this process; the NATS ones
share a nats-server this script starts (own port and store directory), each configuration
under its own prefix. Senders spread their events round-robin over a configuration's
replicas, as a load balancer would.

Measured, in rounds that alternate the configurations (a slow spell of the shared machine
then hits every column alike):

* (a) accepted events/s: 32 senders back to back (async mode, 202), and how long the
  replicas then needed to finish the runs they had accepted;
* (b) end to end: 8 senders, each waiting for its 202 before sending the next event;
  latency from the client sending the event to the run being final, the run's
  ``updated_at`` of its final write (same machine, same clock) read back through the API.

Ratios are against SQLite with one process. On a machine with fewer cores than replicas
the replicas share the CPUs and the NATS server, so the 3-replica column shows the cost of
coordination more than the gain of scale (docs/scale-out.md, "Sizing").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
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
    spawn_snaphook,
)

NATS_SERVER = Path(os.environ.get("SNAPHOOK_BENCH_NATS_SERVER", "/usr/sbin/nats-server"))
THROUGHPUT_CONCURRENCY = 32
LATENCY_CONCURRENCY = 8
ROUNDS = 3
WARMUP = 100  # events per configuration before anything is measured


@dataclass
class Fleet:
    """One configuration: its replicas and what was measured on it."""

    name: str
    servers: list[Server]
    accepted: int = 0
    errors: int = 0
    elapsed: float = 0.0
    backlog: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    turn: int = 0

    def next_url(self) -> str:
        self.turn += 1
        return self.servers[self.turn % len(self.servers)].url

    @property
    def per_second(self) -> float:
        return self.accepted / self.elapsed if self.elapsed else 0.0

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def start_nats(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    store = workdir / "nats-store"
    store.mkdir()
    argv = [str(NATS_SERVER), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)]
    log = (workdir / "nats.log").open("wb")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    return proc, f"nats://127.0.0.1:{port}"


def spawn_replica(workdir: Path, name: str, backend: dict[str, str]) -> Server:
    return spawn_snaphook(workdir, name, {"SNAPHOOK_LOG_LEVEL": "warning", **backend})


@contextlib.contextmanager
def fleets(workdir: Path, nats_url: str) -> Iterator[list[Fleet]]:
    made: list[Fleet] = []
    try:
        made.append(Fleet("sqlite x1", [spawn_replica(workdir, "sqlite", {})]))
        for count in (1, 3):
            prefix = f"bench{count}_{uuid.uuid4().hex[:6]}"
            backend = {
                "SNAPHOOK_BACKEND": "nats",
                "SNAPHOOK_NATS_URL": nats_url,
                "SNAPHOOK_NATS_PREFIX": prefix,
            }
            servers = [spawn_replica(workdir, f"nats{count}-{i}", backend) for i in range(count)]
            made.append(Fleet(f"nats x{count}", servers))
        yield made
    finally:
        for fleet in made:
            fleet.stop()


# --- measuring ------------------------------------------------------------------------------


async def throughput(http: aiohttp.ClientSession, fleet: Fleet, seconds: float) -> None:
    deadline = time.perf_counter() + seconds

    async def sender() -> None:
        while time.perf_counter() < deadline:
            _, _, run_id = await post(http, fleet.next_url())
            if run_id is None:
                fleet.errors += 1
            else:
                fleet.accepted += 1

    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(THROUGHPUT_CONCURRENCY)))
    fleet.elapsed += time.perf_counter() - started


async def latency(http: aiohttp.ClientSession, fleet: Fleet, count: int) -> None:
    todo = iter(range(count))

    async def sender() -> None:
        for _ in todo:
            fleet.samples.append(await post(http, fleet.next_url()))

    await asyncio.gather(*(sender() for _ in range(LATENCY_CONCURRENCY)))


async def drain_fleet(http: aiohttp.ClientSession, fleet: Fleet) -> float:
    """Seconds until no replica lists an accepted or running run."""
    return await drain(http, *(server.url for server in fleet.servers), timeout=300.0)


async def final_times(
    http: aiohttp.ClientSession, fleet: Fleet, run_ids: list[str]
) -> dict[str, float]:
    """When each run became final (its record's ``updated_at``), read from one replica."""
    runs = await final_runs(http, fleet.servers[0].url, run_ids, 120)
    return {run_id: run["updated_at"] for run_id, run in runs.items()}


async def measure(options: argparse.Namespace, workdir: Path) -> list[Fleet]:
    nats, nats_url = start_nats(workdir)
    try:
        with fleets(workdir, nats_url) as made:
            timeout = aiohttp.ClientTimeout(total=60)
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
                for fleet in made:
                    for server in fleet.servers:
                        await server.ready(http)
                    for _ in range(WARMUP):
                        await post(http, fleet.next_url())
                    await drain_fleet(http, fleet)
                for _ in range(ROUNDS):
                    for fleet in made:
                        await throughput(http, fleet, options.seconds / ROUNDS)
                        fleet.backlog = max(fleet.backlog, await drain_fleet(http, fleet))
                    for fleet in made:
                        await latency(http, fleet, options.samples // ROUNDS)
                        await drain_fleet(http, fleet)
                for fleet in made:
                    refused = sum(1 for _, _, run_id in fleet.samples if run_id is None)
                    if refused:
                        sys.exit(f"{fleet.name}: {refused} events were not accepted")
                    sent = {run_id: s for s, _, run_id in fleet.samples if run_id is not None}
                    final = await final_times(http, fleet, list(sent))
                    fleet.samples = [(sent[r], final[r], r) for r in sent]
            return made
    finally:
        nats.terminate()
        nats.wait(timeout=15)


# --- the report ---------------------------------------------------------------------------


def report(options: argparse.Namespace, made: list[Fleet]) -> None:
    base = made[0]
    print(
        f"scale-out benchmark: {os.cpu_count()} CPUs, client, replicas and nats-server on "
        f"127.0.0.1, {ROUNDS} interleaved rounds; state in "
        f"{options.dir or tempfile.gettempdir()}"
    )
    print(row("", *(fleet.name for fleet in made)))
    print("-" * (46 + 12 * len(made)))
    label = f"(a) accepted events/s, {THROUGHPUT_CONCURRENCY} senders, {options.seconds:g} s"
    print(row(label, *(f"{fleet.per_second:,.0f}" for fleet in made)))
    print(row("    ratio to sqlite x1", *(ratio(f.per_second, base.per_second) for f in made)))
    print(row("    non-2xx answers", *(str(fleet.errors) for fleet in made)))
    print(row("    runs left running after a window (s)", *(f"{f.backlog:.2f}" for f in made)))
    e2e = {fleet.name: pct([final - sent for sent, final, _ in fleet.samples]) for fleet in made}
    print(f"(b) event -> run final, {LATENCY_CONCURRENCY} senders, {options.samples} events, ms")
    for name, i in (("p50", 0), ("p99", 1)):
        print(row(f"    {name}", *(f"{e2e[f.name][i]:.2f}" for f in made)))
        ratios = (ratio(e2e[f.name][i], e2e[base.name][i]) for f in made)
        print(row(f"    {name} ratio to sqlite x1", *ratios))
    print("-" * (46 + 12 * len(made)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="throughput time per config")
    parser.add_argument("--samples", type=int, default=400, help="latency events per config")
    parser.add_argument("--dir", help="where state directories and the NATS store go")
    options = parser.parse_args()
    if not SNAPHOOK.exists():
        sys.exit(f"{SNAPHOOK} not found: install the project into this virtualenv")
    if not NATS_SERVER.exists():
        sys.exit(f"{NATS_SERVER} not found (set SNAPHOOK_BENCH_NATS_SERVER)")
    with tempfile.TemporaryDirectory(dir=options.dir, prefix="snaphook-scale-") as workdir:
        made = asyncio.run(measure(options, Path(workdir)))
    report(options, made)


if __name__ == "__main__":
    main()
