"""``snaphook function serve`` vs Google's functions-framework vs raw aiohttp, serving the
same no-op CloudEvent function.

    python benchmarks/function_host.py [--seconds 12] [--concurrency 32] [--baseline DIR]

Three servers run as subprocesses on 127.0.0.1, each as its default deployment runs it (one
process; functions-framework: gunicorn with its default worker and threads):

* snaphook: ``snaphook function serve --functions bench.noop``; the function is an
  ``async def`` returning ``None``, run through the same invoker as in the dispatcher
  (params validated, Context built, result event encoded, dedup record kept);
* functions-framework: ``functions-framework --signature-type cloudevent`` with a
  ``@functions_framework.cloud_event`` function returning ``None``. It pins
  ``cloudevents<2`` and so cannot share the project's virtualenv: the script creates
  (once) ``.bench-venv-ff`` beside the repository and installs it there with pip;
* raw aiohttp: a bare handler that reads the body, parses the JSON and answers 200 — the
  floor any Python CloudEvents receiver pays;
* with ``--baseline DIR``, snaphook a second time from the source tree ``DIR`` (e.g. a
  ``git worktree`` of an older commit), for before/after figures from the same run.

The load generator is one aiohttp client in this process, sending every server the same
binary-mode ``io.snaphook.function.invoke`` CloudEvent (a fresh id per request, so the
host's dedup never answers from its record). (a) requests/s with ``--concurrency``
senders back to back and the p50/p99 latency of those requests; (b) p50/p99 with one
sender. The servers are measured in interleaved rounds so a slow spell of the shared
machine hits all three alike; the ratios are what to quote.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
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
    REPO,
    SNAPHOOK,
    Server,
    free_port,
    pct,
    spawn,
)

FF_VENV = REPO / ".bench-venv-ff"
ROUNDS = 4
GOAL = 5.0  # snaphook requests/s over functions-framework's

NOOP_MODULE = '''\
"""The benchmark's no-op function for snaphook."""
from pydantic import BaseModel, ConfigDict

from functions.sdk import Context, function


class Nothing(BaseModel):
    model_config = ConfigDict(extra="forbid")


@function("bench.noop")
async def noop(ctx: Context, p: Nothing) -> None:
    return None
'''

FF_SOURCE = '''\
"""The benchmark's no-op function for functions-framework."""
import functions_framework


@functions_framework.cloud_event
def noop(cloud_event):
    return None
'''


# --- servers ----------------------------------------------------------------------------


def serve_raw(port: int) -> None:
    """The raw aiohttp receiver. Run with ``--serve-raw PORT``."""
    from aiohttp import web

    async def receive(request: web.Request) -> web.Response:
        json.loads(await request.read())
        return web.Response(status=200, text="OK")

    app = web.Application()
    app.router.add_post("/", receive)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=lambda _: None)


def ensure_ff_venv() -> Path:
    """functions-framework in its own virtualenv (it needs cloudevents<2; we use 2.x)."""
    binary = FF_VENV / "bin" / "functions-framework"
    if not binary.exists():
        print(f"creating {FF_VENV} with functions-framework (once) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(FF_VENV)], check=True)
        pip = [str(FF_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "functions-framework"], check=True)
    return binary


def clean_env(**more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPHOOK_")}
    env.update(more)
    return env


def start_servers(workdir: Path, log_level: str, baseline: Path | None) -> list[Server]:
    (workdir / "bench_noop.py").write_text(NOOP_MODULE, encoding="utf-8")
    (workdir / "ff_noop.py").write_text(FF_SOURCE, encoding="utf-8")
    ff = ensure_ff_venv()
    ports = [free_port() for _ in range(4)]
    servers = [
        spawn_snaphook("snaphook", ports[0], workdir, log_level),
        spawn(
            "functions-framework",
            [
                str(ff),
                "--target=noop",
                "--signature-type=cloudevent",
                f"--source={workdir / 'ff_noop.py'}",
                "--host=127.0.0.1",
                f"--port={ports[1]}",
            ],
            ports[1],
            workdir,
            clean_env(),
        ),
        spawn(
            "raw aiohttp",
            [sys.executable, str(Path(__file__).resolve()), "--serve-raw", str(ports[2])],
            ports[2],
            workdir,
            clean_env(),
        ),
    ]
    if baseline is not None:  # its packages come first on the path: the same entry point
        servers.append(
            spawn_snaphook("snaphook baseline", ports[3], workdir, log_level, source=baseline)
        )
    return servers


def spawn_snaphook(
    name: str, port: int, workdir: Path, log_level: str, *, source: Path | None = None
) -> Server:
    path = [str(source.resolve())] if source is not None else []
    env = clean_env(
        PORT=str(port),
        PYTHONPATH=os.pathsep.join([*path, str(workdir)]),
        SNAPHOOK_FUNCTION_MODULES="bench_noop",
        SNAPHOOK_LOG_LEVEL=log_level,
    )
    argv = [str(SNAPHOOK), "function", "serve", "--functions", "bench.noop"]
    return spawn(name, argv, port, workdir, env)


@contextlib.contextmanager
def running(servers: list[Server]) -> Iterator[list[Server]]:
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


# --- load generators ----------------------------------------------------------------------
#
# wrk when it is installed (a C load generator costs the servers far less of the machine's
# CPU than a Python one, so the figures are the servers' and not the client's), else an
# aiohttp client in this process. Either way every server gets the same generator.

INVOKE_DATA = (
    '{"params": {}, "event": {"id": "e1", "source": "bench", "type": "io.snaphook.backup.pre", '
    '"subject": "bench/Deployment/db", "data": {"backup": {"name": "nightly", "id": "b1"}}}, '
    '"run_id": "%s", "step": "noop", "attempt": 1, "timeout": 30.0}'
)
CE_HEADERS = {
    "ce-specversion": "1.0",
    "ce-source": "bench",
    "ce-type": "io.snaphook.function.invoke",
    "ce-snaphookfunction": "bench.noop",
    "Content-Type": "application/json",
}

# One binary-mode invoke CloudEvent per request, each with a fresh id (the host's dedup
# must never answer from its record). ``done`` prints the round's figures as JSON.
WRK_SCRIPT = r"""
local counter, tag = 0, "x"
local threads = {}
function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end
function init(args)
  tag = args[1] .. "-" .. tostring(tid)
end
function request()
  counter = counter + 1
  local run = "run-" .. tag .. "-" .. counter
  local headers = {HEADERS}
  headers["ce-id"] = run .. "/noop/1"
  return wrk.format("POST", "/", headers, string.format([[DATA]], run))
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "elapsed_us": %d, "p50_us": %d, "p99_us": %d, "failed": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status + e.connect + e.read + e.write + e.timeout))
end
"""


@dataclass(frozen=True)
class Round:
    ok: int
    failed: int
    elapsed: float  # seconds
    p50: float  # ms
    p99: float  # ms
    cpu: float = 0.0  # seconds of CPU the server (and its worker processes) used


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its descendants, from /proc (Linux).

    On a machine shared with other work the requests/s swing with the load; the CPU each
    request costs the server does not, so it is reported beside them."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(cpu_seconds(int(child)) for child in children)


class Wrk:
    name = "wrk"

    def __init__(self, binary: str, workdir: Path) -> None:
        headers = ", ".join(f'["{k}"] = "{v}"' for k, v in CE_HEADERS.items())
        script = WRK_SCRIPT.replace("{HEADERS}", "{" + headers + "}").replace("DATA", INVOKE_DATA)
        self.script = workdir / "invoke.lua"
        self.script.write_text(script, encoding="utf-8")
        self.binary = binary

    async def run(self, url: str, concurrency: int, seconds: float) -> Round:
        argv = [
            self.binary,
            "-t1",
            f"-c{concurrency}",
            f"-d{max(1, round(seconds))}s",
            "--timeout=10s",
            "-s",
            str(self.script),
            url,
            "--",
            uuid.uuid4().hex[:8],
        ]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
        lines = [line for line in out.decode().splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"wrk failed: {err.decode()[-500:]}{out.decode()[-500:]}")
        figures = json.loads(lines[-1])
        return Round(
            ok=figures["requests"] - figures["failed"],
            failed=figures["failed"],
            elapsed=figures["elapsed_us"] / 1e6,
            p50=figures["p50_us"] / 1000,
            p99=figures["p99_us"] / 1000,
        )


class AiohttpClient:
    name = "aiohttp client (install wrk for server-bound figures)"

    def __init__(self, http: aiohttp.ClientSession) -> None:
        self.http = http

    async def run(self, url: str, concurrency: int, seconds: float) -> Round:
        latencies: list[float] = []
        failed = 0
        deadline = time.perf_counter() + seconds

        async def sender() -> None:
            nonlocal failed
            while time.perf_counter() < deadline:
                run_id = f"run-{uuid.uuid4().hex[:12]}"
                headers = {**CE_HEADERS, "ce-id": f"{run_id}/noop/1"}
                body = (INVOKE_DATA % run_id).encode()
                started = time.perf_counter()
                async with self.http.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        failed += 1
                        continue
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(concurrency)))
        p50, p99 = pct(latencies)
        return Round(len(latencies), failed, time.perf_counter() - started, p50, p99)


LoadGenerator = Wrk | AiohttpClient


async def ready(http: aiohttp.ClientSession, server: Server, timeout: float = 60.0) -> None:
    """Until the server answers an invocation (functions-framework has no /readyz)."""
    deadline = time.monotonic() + timeout
    run_id = f"run-{uuid.uuid4().hex[:12]}"
    headers = {**CE_HEADERS, "ce-id": f"{run_id}/noop/1"}
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            sys.exit(f"{server.name} exited:\n{server.log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(aiohttp.ClientError, OSError):
            body = (INVOKE_DATA % run_id).encode()
            async with http.post(f"{server.url}/", data=body, headers=headers) as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.1)
    sys.exit(f"{server.name} not ready within {timeout:g} s")


@dataclass
class Tally:
    loaded: list[Round] = field(default_factory=list)  # --concurrency senders
    single: list[Round] = field(default_factory=list)  # one sender

    @staticmethod
    def _rate(rounds: list[Round]) -> float:
        elapsed = sum(r.elapsed for r in rounds)
        return sum(r.ok for r in rounds) / elapsed if elapsed else 0.0

    @property
    def per_second(self) -> float:
        return self._rate(self.loaded)

    @property
    def cpu_per_request(self) -> float:
        """Microseconds of server CPU per answered request, under load."""
        ok = sum(r.ok for r in self.loaded)
        return 1e6 * sum(r.cpu for r in self.loaded) / ok if ok else float("nan")

    @property
    def failed(self) -> int:
        return sum(r.failed for r in self.loaded + self.single)

    def latency(self, rounds: str, which: str) -> float:
        """The median over rounds of each round's p50 or p99 (ms)."""
        chosen = self.loaded if rounds == "loaded" else self.single
        return float(statistics.median(getattr(r, which) for r in chosen))


async def measure(
    servers: list[Server], options: argparse.Namespace, workdir: Path
) -> tuple[dict[str, Tally], str]:
    tallies = {server.name: Tally() for server in servers}
    async with aiohttp.ClientSession() as http:
        wrk = shutil.which("wrk") if not options.no_wrk else None
        generator: LoadGenerator = Wrk(wrk, workdir) if wrk else AiohttpClient(http)
        for server in servers:
            await ready(http, server)
            await generator.run(f"{server.url}/", options.concurrency, 1.0)  # warm-up
        share = options.seconds / ROUNDS
        for _ in range(ROUNDS):
            for server in servers:
                tally = tallies[server.name]
                before = cpu_seconds(server.proc.pid)
                loaded = await generator.run(f"{server.url}/", options.concurrency, share)
                cpu = cpu_seconds(server.proc.pid) - before
                tally.loaded.append(dataclasses.replace(loaded, cpu=cpu))
                tally.single.append(await generator.run(f"{server.url}/", 1, max(1.0, share / 4)))
    return tallies, generator.name


# --- the report ---------------------------------------------------------------------------


def report(tallies: dict[str, Tally], generator: str, options: argparse.Namespace) -> None:
    names = list(tallies)
    snap, ff, raw = (tallies[n] for n in names[:3])
    print(
        f"function host benchmark: {os.cpu_count()} CPUs, load generator {generator}, "
        f"servers on 127.0.0.1, {ROUNDS} interleaved rounds of {options.seconds / ROUNDS:g} s, "
        f"snaphook log level {options.log_level}"
    )
    rule = "-" * (36 + 21 * len(names))
    print(f"{'':<36}" + "".join(f"{n:>21}" for n in names))
    print(rule)

    def line(label: str, values: list[str]) -> None:
        print(f"{label:<36}" + "".join(f"{v:>21}" for v in values))

    line(
        f"(a) requests/s, {options.concurrency} connections",
        [f"{t.per_second:,.0f}" for t in tallies.values()],
    )
    for which in ("p50", "p99"):
        line(
            f"    latency {which} (ms)",
            [f"{t.latency('loaded', which):.2f}" for t in tallies.values()],
        )
    for which in ("p50", "p99"):
        line(
            f"(b) 1 connection, {which} (ms)",
            [f"{t.latency('single', which):.2f}" for t in tallies.values()],
        )
    line("    server CPU per request (us)", [f"{t.cpu_per_request:.0f}" for t in tallies.values()])
    line("non-200 answers or errors", [str(t.failed) for t in tallies.values()])
    print(rule)
    ratio = snap.per_second / ff.per_second if ff.per_second else float("nan")
    print(f"snaphook / functions-framework, requests/s: {ratio:.2f}x (goal >= {GOAL:g}x)")
    capacity = ff.cpu_per_request / snap.cpu_per_request
    print(f"functions-framework / snaphook, CPU per request (capacity per core): {capacity:.2f}x")
    p99 = ff.latency("loaded", "p99") / snap.latency("loaded", "p99")
    print(f"functions-framework p99 / snaphook p99, under load: {p99:.2f}x")
    print(f"snaphook / raw aiohttp, requests/s: {snap.per_second / raw.per_second:.2f}x")
    print(f"raw aiohttp / functions-framework, requests/s: {raw.per_second / ff.per_second:.2f}x")
    if "snaphook baseline" in tallies:
        old = tallies["snaphook baseline"]
        print(
            f"snaphook / its baseline: {snap.per_second / old.per_second:.2f}x requests/s, "
            f"{snap.cpu_per_request / old.cpu_per_request:.2f}x CPU per request; "
            f"baseline / functions-framework, requests/s: {old.per_second / ff.per_second:.2f}x"
        )
    print("goal met" if ratio >= GOAL else "goal NOT met")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=12.0, help="load time per server")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-wrk", action="store_true", help="use the aiohttp client")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="also serve snaphook from this source tree (e.g. a git worktree of an older commit)",
    )
    parser.add_argument("--serve-raw", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve_raw:
        serve_raw(options.serve_raw)
        return
    with (
        tempfile.TemporaryDirectory(prefix="snaphook-fh-bench-") as tmp,
        running(start_servers(Path(tmp), options.log_level, options.baseline)) as servers,
    ):
        tallies, generator = asyncio.run(measure(servers, options, Path(tmp)))
    report(tallies, generator, options)


if __name__ == "__main__":
    main()
