"""Throughput of ``postgres.dump`` into S3 vs. ``pg_dump > /dev/null``, and the dispatcher's
peak memory while it streams.

    python benchmarks/dump_stream.py [--sizes 200,1000] [--format custom|plain]
                                     [--rounds 2] [--dsn postgresql://postgres@127.0.0.1/postgres]

For each size (MB of database) a database ``snaphook_bench_<hex>`` is generated with
generate_series (random bytea, md5 text, jsonb, numerics, arrays), vacuumed and frozen so
that no run pays for hint bits the previous one left, measured, and dropped. Both sides run
the same pg_dump with the same format and compression in the same run:

* baseline: ``pg_dump --format=F --no-password > /dev/null`` (the fastest a dump can go);
* snaphook: a real ``snaphook serve`` (all function families loaded, as deployed) whose
  blueprint runs ``postgres.dump`` into a moto S3 server started here; the time is the
  step's ``started_at`` → ``finished_at`` from the runs API, the memory is the dispatcher
  process's peak RSS (``VmHWM``, reset before each dump through ``/proc/PID/clear_refs``).

The two alternate (baseline, snaphook, snaphook, baseline, ...) so drifts on a shared
machine hit both. Goals: snaphook >= 0.8x baseline throughput, peak RSS < 150 MB. moto
buffers objects in its own process, so the uploaded object is deleted after each run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from _common import free_port  # type: ignore[import-not-found]  # the sibling module

REPO = Path(__file__).resolve().parent.parent
SNAPHOOK = Path(sys.executable).with_name("snaphook")
MB = 1_000_000
GOAL_RATIO = 0.8
GOAL_RSS_MB = 150.0
BATCH = 50_000  # rows per INSERT while generating
BUCKET = "bench"

# ~600 bytes a row: 256 random bytes, md5 text, a small jsonb, numbers, an array.
RANDOM_BYTES = " || ".join(f"md5(g::text || '{c}')" for c in "abcdefghijklmnop")
CREATE = """
CREATE TABLE bench_rows (
    id bigint PRIMARY KEY, created timestamptz NOT NULL, customer text NOT NULL,
    amount numeric(12, 2), tags text[], doc jsonb, payload bytea)
"""
INSERT = f"""
INSERT INTO bench_rows
SELECT g, '2024-01-01'::timestamptz + g * interval '1 second',
       'customer-' || (g % 100000) || '-' || md5(g::text), (g % 100000) / 100.0,
       ARRAY['tag' || g % 13, 'tag' || g % 7],
       jsonb_build_object('id', g, 'note', repeat(md5((g % 1000)::text), 3), 'ok', g % 2 = 0),
       decode({RANDOM_BYTES}, 'hex')
FROM generate_series($1::bigint, $2::bigint) g
"""

BLUEPRINT = """\
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: bench}
spec:
  params:
    database: {type: string, required: true}
    key: {type: string, required: true}
    format: {type: string, default: custom}
    part_size_mb: {type: integer, default: 5}
  actions:
    backup.pre:
      - name: dump
        function: postgres.dump
        with:
          dsn: "{{ secret('bench-pg', 'dsn') }}"
          database: "{{ params.database }}"
          to: "s3://bench/{{ params.key }}"
          format: "{{ params.format }}"
          part_size_mb: "{{ params.part_size_mb }}"
        timeout: 2h
"""


@dataclass
class Sample:
    seconds: float
    dump_bytes: int = 0
    peak_rss_mb: float = 0.0
    dispatcher_cpu: float = 0.0  # seconds of CPU the dispatcher spent on the dump
    moto_cpu: float = 0.0  # ... and the S3 stand-in, which shares this machine's CPUs


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the database ---------------------------------------------------------------------


async def generate(dsn: str, name: str, size_mb: int) -> float:
    """Fill ``name`` until it holds about ``size_mb`` MB; returns its size in MB."""
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    conn = await asyncpg.connect(dsn, database=name)
    try:
        await conn.execute(CREATE)
        done, started = 0, time.monotonic()
        while (size := await database_mb(conn)) < size_mb:
            await conn.execute(INSERT, done + 1, done + BATCH)
            done += BATCH
            print(f"\r  generating {name}: {size:7.0f} / {size_mb} MB", end="", flush=True)
        # Later readers must not set hint bits (writes) the first reader did not find set.
        await conn.execute("VACUUM (FREEZE, ANALYZE) bench_rows")
        size = await database_mb(conn)
        took = time.monotonic() - started
        print(f"\r  generated {name}: {size:.0f} MB, {done} rows in {took:.0f} s")
        return size
    finally:
        await conn.close()


async def database_mb(conn: Any) -> float:
    return float(await conn.fetchval("SELECT pg_database_size(current_database())")) / MB


async def drop(dsn: str, name: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


# --- the two sides ---------------------------------------------------------------------


def pg_env(dsn: str, database: str) -> dict[str, str]:
    from pydantic import SecretStr

    from functions.postgres import Server

    return Server.parse(SecretStr(dsn), database).tool_env()


async def baseline(dsn: str, database: str, fmt: str) -> Sample:
    argv = ["pg_dump", "--no-password", f"--format={fmt}"]
    if fmt == "plain":
        argv.append("--compress=6")  # what postgres.dump does for plain
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv, env=pg_env(dsn, database), stdout=asyncio.subprocess.DEVNULL
    )
    if await proc.wait() != 0:
        raise SystemExit(f"pg_dump failed with {proc.returncode}")
    return Sample(time.monotonic() - started)


@dataclass
class Dispatcher:
    url: str
    pid: int
    moto_pid: int
    http: aiohttp.ClientSession
    part_size_mb: int

    def rss_mb(self, field: str) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return 0.0

    def reset_peak(self) -> bool:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    async def dump(self, database: str, fmt: str, s3: Any) -> Sample:
        key = f"{database}-{uuid.uuid4().hex[:8]}.dump"
        self.reset_peak()
        cpu, moto_cpu = cpu_seconds(self.pid), cpu_seconds(self.moto_pid)
        event = {
            "specversion": "1.0",
            "id": uuid.uuid4().hex,
            "source": "bench",
            "type": "io.snaphook.backup.pre",
            "subject": "bench/StatefulSet/pg",
            "data": {
                "backup": {"name": "bench", "id": key},
                "params": {
                    "database": database,
                    "key": key,
                    "format": fmt,
                    "part_size_mb": self.part_size_mb,
                },
            },
        }
        headers = {"Content-Type": "application/cloudevents+json"}
        async with self.http.post(f"{self.url}/v1/events", json=event, headers=headers) as resp:
            run_id = (await resp.json())["run_id"]
        run = await self.final(run_id)
        step = run["steps"][0]
        if step["status"] != "succeeded":
            raise SystemExit(f"postgres.dump failed: {step['error']}")
        seconds = iso(step["finished_at"]) - iso(step["started_at"])
        sample = Sample(
            seconds,
            step["outputs"]["bytes"],
            self.rss_mb("VmHWM"),
            cpu_seconds(self.pid) - cpu,
            cpu_seconds(self.moto_pid) - moto_cpu,
        )
        await s3.delete_object(Bucket=BUCKET, Key=key)  # moto keeps objects in its memory
        return sample

    async def final(self, run_id: str) -> dict[str, Any]:
        while True:
            async with self.http.get(f"{self.url}/v1/runs/{run_id}") as resp:
                run: dict[str, Any] = await resp.json()
            if run["status"] in ("succeeded", "failed"):
                return run
            await asyncio.sleep(0.2)


def iso(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    return datetime.fromisoformat(str(value)).timestamp()


@contextlib.asynccontextmanager
async def services(
    dsn: str, workdir: Path, part_size_mb: int
) -> AsyncIterator[tuple[Dispatcher, Any]]:
    """moto (S3) and ``snaphook serve``, both as subprocesses of this script."""
    from functions.sdk import ObjectStore
    from functions.storage import s3_client

    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPHOOK_")}
    env.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
    moto_port, port = free_port(), free_port()
    moto_url = f"http://127.0.0.1:{moto_port}"
    hooks = workdir / "hooks"
    hooks.mkdir()
    (hooks / "bench.yaml").write_text(BLUEPRINT, encoding="utf-8")
    config = workdir / "config.yaml"
    config.write_text(
        json.dumps(
            {
                "apiVersion": "snaphook.io/v1",
                "kind": "Config",
                "bindings": [{"blueprint": "bench", "match": {"namespace": "bench"}}],
            }
        )
    )
    env.update(
        SNAPHOOK_SECRET_BENCH_PG_DSN=dsn,
        SNAPHOOK_S3_ENDPOINT_URL=moto_url,
        SNAPHOOK_LOG_LEVEL="warning",
    )
    with (workdir / "serve.log").open("wb") as log:
        moto = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            str(moto_port),
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        serve = await asyncio.create_subprocess_exec(
            str(SNAPHOOK),
            "serve",
            "--host=127.0.0.1",
            f"--port={port}",
            f"--state-dir={workdir / 'state'}",
            f"--hooks={hooks}",
            f"--config={config}",
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        async with aiohttp.ClientSession() as http:
            await ready(http, f"{moto_url}/", moto, None)
            url = f"http://127.0.0.1:{port}"
            await ready(http, f"{url}/readyz", serve, workdir / "serve.log")
            async with s3_client(ObjectStore(endpoint_url=moto_url)) as s3:
                await s3.create_bucket(Bucket=BUCKET)
                yield Dispatcher(url, serve.pid, moto.pid, http, part_size_mb), s3
    finally:
        for proc in (serve, moto):
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def tail(log: Path | None) -> str:
    return log.read_text(errors="replace")[-2000:] if log else ""


async def ready(
    http: aiohttp.ClientSession, url: str, proc: asyncio.subprocess.Process, log: Path | None
) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise SystemExit(f"{url}: the server exited with {proc.returncode}\n{tail(log)}")
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with http.get(url) as resp:
                if resp.status < 500:
                    return
        await asyncio.sleep(0.1)
    raise SystemExit(f"{url} not ready within 60 s")


# --- the run ---------------------------------------------------------------------------


async def measure(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    results = []
    async with services(args.dsn, workdir, args.part_size_mb) as (dispatcher, s3):
        idle_rss = dispatcher.rss_mb("VmRSS")
        print(
            f"dispatcher up: RSS {idle_rss:.0f} MB before any dump"
            f" (peak reset {'works' if dispatcher.reset_peak() else 'unavailable'})"
        )
        for size in args.sizes:
            name = f"snaphook_bench_{uuid.uuid4().hex[:8]}"
            try:
                db_mb = await generate(args.dsn, name, size)
                base, ours = [], []
                for index in range(args.rounds * 2):
                    # b, s, s, b, b, s, ...: each side goes first as often as last.
                    if (index % 4) in (0, 3):
                        base.append(await baseline(args.dsn, name, args.format))
                        print(f"  pg_dump > /dev/null  {base[-1].seconds:6.2f} s")
                    else:
                        ours.append(await dispatcher.dump(name, args.format, s3))
                        print(
                            f"  postgres.dump → S3   {ours[-1].seconds:6.2f} s"
                            f"  {ours[-1].dump_bytes / MB:.0f} MB dump,"
                            f" peak RSS {ours[-1].peak_rss_mb:.0f} MB, CPU: dispatcher"
                            f" {ours[-1].dispatcher_cpu:.1f} s, moto {ours[-1].moto_cpu:.1f} s"
                        )
                results.append(summary(size, db_mb, base, ours, idle_rss))
            finally:
                await drop(args.dsn, name)
    return results


def summary(
    size: int, db_mb: float, base: list[Sample], ours: list[Sample], idle_rss: float
) -> dict[str, Any]:
    base_s = sum(s.seconds for s in base) / len(base)
    ours_s = sum(s.seconds for s in ours) / len(ours)
    return {
        "size": size,
        "db_mb": db_mb,
        "dump_mb": ours[-1].dump_bytes / MB,
        "baseline_mbps": db_mb / base_s,
        "snaphook_mbps": db_mb / ours_s,
        "ratio": base_s / ours_s,
        "peak_rss_mb": max(s.peak_rss_mb for s in ours),
        "idle_rss_mb": idle_rss,
    }


def report(results: list[dict[str, Any]], fmt: str) -> None:
    print(f"\nformat {fmt}; MB/s are MB of database per second (1 MB = 10^6 bytes)")
    print(
        f"{'database':>9} {'dump':>8} {'pg_dump>/dev/null':>18} {'postgres.dump→S3':>17}"
        f" {'ratio':>6} {'peak RSS':>9}"
    )
    for r in results:
        print(
            f"{r['db_mb']:7.0f}MB {r['dump_mb']:6.0f}MB {r['baseline_mbps']:14.1f}MB/s"
            f" {r['snaphook_mbps']:13.1f}MB/s {r['ratio']:5.2f}x {r['peak_rss_mb']:6.0f}MB"
        )
    ratio_ok = all(r["ratio"] >= GOAL_RATIO for r in results)
    rss_ok = all(r["peak_rss_mb"] < GOAL_RSS_MB for r in results)
    print(
        f"goal throughput >= {GOAL_RATIO}x pg_dump > /dev/null: {'met' if ratio_ok else 'NOT met'}"
    )
    print(
        f"goal dispatcher peak RSS < {GOAL_RSS_MB:.0f} MB: {'met' if rss_ok else 'NOT met'}"
        f" (idle {results[0]['idle_rss_mb']:.0f} MB)"
        if results
        else ""
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        default="200,1000",
        type=lambda v: [int(x) for x in v.split(",") if x.strip()],
        help="database sizes in MB, comma-separated (quick: 50)",
    )
    parser.add_argument("--format", choices=["custom", "plain"], default="custom")
    parser.add_argument("--part-size-mb", type=int, default=5, help="postgres.dump part_size_mb")
    parser.add_argument("--rounds", type=int, default=2, help="dumps per side and size")
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory(prefix="snaphook-bench-") as tmp:
        results = asyncio.run(measure(args, Path(tmp)))
    report(results, args.format)


if __name__ == "__main__":
    main()
