"""Subprocesses of a test's own: run a command to its end, wait for a server's readiness,
kill it, watch its logs.

A process is killed by its PID with SIGKILL, as a node or OOM kill would: no shutdown code
runs. (Never by name: other tests run their own servers.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest


@dataclass
class Result:
    """A finished command: its exit code, stdout and stderr."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


async def run_command(
    argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, timeout: float
) -> Result:
    """Run ``argv`` to its end (killed after ``timeout`` s). Through asyncio, so a server in
    this event loop keeps serving. A traceback on stderr fails the test: errors are for users."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env),
        cwd=cwd,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.communicate()
        raise
    assert proc.returncode is not None
    result = Result(proc.returncode, out.decode(), err.decode())
    assert "Traceback" not in result.err, result.err
    return result


async def wait_ready(
    http: aiohttp.ClientSession,
    url: str,
    *,
    alive: Callable[[], bool],
    log: Callable[[], str],
    within: float,
) -> dict[str, Any]:
    """Poll ``{url}/readyz`` until it answers 200; its body. Fails at once when the server's
    process is no longer ``alive()``, with its ``log()``."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        assert alive(), f"{url}: the server exited early:\n{log()}"
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with http.get(f"{url}/readyz") as resp:
                if resp.status == 200:
                    body: dict[str, Any] = await resp.json()
                    return body
        await asyncio.sleep(0.05)
    pytest.fail(f"{url}: not ready within {within:g}s:\n{log()}")


def sigkill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc`` and reap it (gone already is fine)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def tail(log: Path, lines: int) -> str:
    """The last ``lines`` lines of ``log``; ``(no log)`` before the process wrote one."""
    if not log.exists():
        return "(no log)"
    text = log.read_text(encoding="utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def parse_log_line(line: str) -> dict[str, Any]:
    """A JSON log line of the server; ``{}`` for anything else (or a line cut by the kill)."""
    try:
        entry = json.loads(line)
    except ValueError:
        return {}
    return entry if isinstance(entry, dict) else {}


def log_time(entry: dict[str, Any]) -> float:
    return datetime.fromisoformat(entry["ts"]).timestamp()


async def step_just_started(log: Path, step: str, run_ids: Container[str], within: float) -> str:
    """Follow a server's JSON ``log`` until it says ``step`` of one of ``run_ids`` started
    under 0.1 s ago; that run's id.

    The log, not the API: a GET queues behind a burst's journal writes, while "step started"
    is logged right after the RUNNING state committed. A step that sleeps longer than 0.1 s
    is then surely still running, so killing the server now cuts it.
    """
    offset = 0
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with log.open("rb") as f:
            f.seek(offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        offset += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            entry = parse_log_line(line)
            if (
                entry.get("msg") == "step started"
                and entry.get("step") == step
                and entry.get("run_id") in run_ids
                and time.time() - log_time(entry) < 0.1
            ):
                return str(entry["run_id"])
        await asyncio.sleep(0.002)
    pytest.fail(f"{log.name}: no run was caught running step {step}")
