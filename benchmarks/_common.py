"""What the benchmark scripts share: servers as subprocesses, the no-op event load, p50/p99.

Imported by the scripts as a sibling module (``python benchmarks/<script>.py`` puts this
directory first on ``sys.path``); not a package, not run on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
SNAPHOOK = Path(sys.executable).with_name("snaphook")

# One blueprint whose backup.pre is a single in-process no-op step, bound to namespace bench.
BLUEPRINT = """\
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: bench}
spec:
  actions:
    backup.pre:
      - {name: noop, function: sleep, with: {seconds: 0}}
"""
CONFIG = """\
apiVersion: snaphook.io/v1
kind: Config
bindings:
  - blueprint: bench
    match: {namespace: bench}
"""


# --- servers ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    async def ready(self, http: aiohttp.ClientSession, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                sys.exit(f"{self.name} exited with {self.proc.returncode}:\n{tail}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(f"{self.url}/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)
        sys.exit(f"{self.name} not ready within {timeout:g}s")


def spawn(name: str, argv: list[str], port: int, workdir: Path, env: dict[str, str]) -> Server:
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    return Server(name, proc, port, log)


def spawn_snaphook(workdir: Path, name: str, settings: Mapping[str, str]) -> Server:
    """``snaphook serve`` on a free port with the no-op :data:`BLUEPRINT`, its state in
    ``workdir/state-<name>``; of the ``SNAPHOOK_*`` environment, only ``settings``."""
    hooks = workdir / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "bench.yaml").write_text(BLUEPRINT, encoding="utf-8")
    config = workdir / "config.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPHOOK_")}
    env.update(settings)
    port = free_port()
    argv = [
        str(SNAPHOOK),
        "serve",
        f"--state-dir={workdir / f'state-{name}'}",
        f"--hooks={hooks}",
        f"--config={config}",
        f"--port={port}",
    ]
    return spawn(name, argv, port, workdir, env)


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        server.stop()


# --- the load ---------------------------------------------------------------------------------

HEADERS = {"Content-Type": "application/cloudevents+json"}
Sample = tuple[float, float, str | None]  # sent at, answered at (time.time()), run id if 2xx


def event_body() -> bytes:
    event_id = uuid.uuid4().hex
    return json.dumps(
        {
            "specversion": "1.0",
            "id": event_id,
            "source": "bench",
            "type": "io.snaphook.backup.pre",
            "subject": "bench/Deployment/db",
            "datacontenttype": "application/json",
            "data": {"backup": {"name": "nightly", "id": event_id}},
        }
    ).encode()


async def post(http: aiohttp.ClientSession, url: str) -> Sample:
    """Send one event and read the whole answer."""
    body = event_body()
    sent = time.time()
    async with http.post(f"{url}/v1/events", data=body, headers=HEADERS) as resp:
        answer = await resp.read()
        answered = time.time()
        if not 200 <= resp.status < 300:
            return sent, answered, None
    return sent, answered, json.loads(answer)["run_id"]


async def drain(http: aiohttp.ClientSession, *urls: str, timeout: float = 120.0) -> float:
    """Seconds until no dispatcher at ``urls`` lists an accepted or running run."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        busy = 0
        for url in urls:
            for status in ("accepted", "running"):
                async with http.get(f"{url}/v1/runs?status={status}&limit=1") as resp:
                    busy += len((await resp.json())["runs"])
        if not busy:
            break
        await asyncio.sleep(0.05)
    return time.perf_counter() - started


async def final_runs(
    http: aiohttp.ClientSession, url: str, run_ids: list[str], timeout: float
) -> dict[str, dict[str, Any]]:
    """Each run as ``GET /v1/runs/{id}`` shows it once final; exits if not all are within
    ``timeout`` seconds."""
    runs: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(runs) < len(run_ids):
        if time.monotonic() > deadline:
            sys.exit(f"{url}: {len(run_ids) - len(runs)} runs not final within {timeout:g}s")
        for run_id in run_ids:
            if run_id in runs:
                continue
            async with http.get(f"{url}/v1/runs/{run_id}") as resp:
                run: dict[str, Any] = await resp.json()
            if run["status"] in ("succeeded", "failed"):
                runs[run_id] = run
        if len(runs) < len(run_ids):
            await asyncio.sleep(0.1)
    return runs


# --- the report -------------------------------------------------------------------------------


def pct(values: list[float]) -> tuple[float, float]:
    """p50 and p99 of seconds, in milliseconds."""
    if len(values) < 2:
        value = values[0] * 1000 if values else math.nan
        return value, value
    q = statistics.quantiles(values, n=100, method="inclusive")
    return q[49] * 1000, q[98] * 1000


def row(label: str, *cells: str) -> str:
    return f"{label:<46}" + "".join(f"{c:>12}" for c in cells)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"
