"""The ``snaphook`` command as a user runs it: a real subprocess, exit codes, stdout/stderr.

Exit codes: 0 allowed / succeeded, 1 denied / failed / invalid, 2 usage or transport error.
Subprocesses run through asyncio so a harness server in this event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import SUBJECT, Harness, HarnessFactory, event_json, free_port, write_blueprints
from tests.processes import Result, run_command, wait_ready

REPO = Path(__file__).resolve().parent.parent
SNAPHOOK = Path(sys.executable).with_name("snaphook")
EXAMPLE_CONFIG = "hooks/examples/snaphook.yaml"
DEMO_SUBJECT = "demo/Deployment/web"

PASS = """\
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: pass}
spec:
  actions:
    backup.pre:
      - {name: freeze, function: test.effect}
      - {name: check, function: test.effect, needs: [freeze]}
"""

DENY = """\
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: deny}
spec:
  actions:
    backup.pre:
      - {name: freeze, function: test.fail}
"""

# Line 9 names an unknown function.
BROKEN = """\
apiVersion: snaphook.io/v1
kind: Blueprint
metadata:
  name: broken
spec:
  actions:
    backup.pre:
      - name: freeze
        function: nosuch.freeze
"""

# Line 10 has an unknown key.
BAD_KEY = """\
apiVersion: snaphook.io/v1
kind: Blueprint
metadata:
  name: badkey
spec:
  actions:
    backup.pre:
      - name: freeze
        function: sleep
        colour: red
"""

# Valid with the built-in functions only (what a `snaphook` subprocess has).
GOOD = """\
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: good}
spec:
  actions:
    backup.pre:
      - {name: nap, function: sleep, with: {seconds: 0}}
"""


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without snaphook settings that would leak in."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith("SNAPHOOK_") and k.upper() != "K_SINK"
    }
    env.update(extra)
    return env


async def snaphook(
    *args: str, env: dict[str, str] | None = None, cwd: Path = REPO, timeout: float = 30
) -> Result:
    return await run_command(
        [str(SNAPHOOK), *args], env=env or clean_env(), cwd=cwd, timeout=timeout
    )


def events_url(h: Harness) -> str:
    return str(h.client.server.make_url("/v1/events"))


# -- emit -------------------------------------------------------------------------------------


async def test_emit_wait_allowed(harness: HarnessFactory) -> None:
    h = await harness({"pass": PASS})
    r = await snaphook(
        "emit", "--type", "backup.pre", "--subject", SUBJECT, "--wait", "10",
        "--url", events_url(h), "--backup-name", "nightly", "--backup-id", "b-7",
    )  # fmt: skip
    assert r.code == 0, r.err
    body = r.json()
    assert body["allowed"] is True
    assert {s["name"]: s["status"] for s in body["steps"]} == {
        "freeze": "succeeded",
        "check": "succeeded",
    }
    run = await h.final(body["run_id"])
    assert run["event"]["data"]["backup"] == {"name": "nightly", "id": "b-7"}
    assert run["source"] == "snaphook-cli"


async def test_emit_wait_denied_exits_1(harness: HarnessFactory) -> None:
    h = await harness({"deny": DENY})
    r = await snaphook(
        "emit", "--type", "backup.pre", "--subject", SUBJECT, "--wait", "10",
        "--url", events_url(h),
    )  # fmt: skip
    assert r.code == 1, r.err
    body = r.json()
    assert body["allowed"] is False
    assert "refused on purpose" in body["reason"]


async def test_emit_binary_mode_and_same_id_same_run(harness: HarnessFactory) -> None:
    h = await harness({"pass": PASS})
    event_id = uuid.uuid4().hex
    args = ["emit", "--type", "backup.pre", "--subject", SUBJECT, "--url", events_url(h)]
    first, second = await asyncio.gather(
        snaphook(*args, "--mode", "binary", "--id", event_id, "--wait", "10"),
        snaphook(*args, "--id", event_id, "--wait", "10"),
    )
    assert (first.code, second.code) == (0, 0), first.err + second.err
    assert first.json()["allowed"] is True
    assert first.json()["run_id"] == second.json()["run_id"]
    # The event was run once.
    runs = await (await h.client.get("/v1/runs")).json()
    assert [r["run_id"] for r in runs["runs"]] == [first.json()["run_id"]]
    assert h.recorder.calls.count(("test.effect", "freeze", 1)) == 1


async def test_emit_without_wait_is_accepted(harness: HarnessFactory) -> None:
    h = await harness({"deny": DENY})
    r = await snaphook(
        "emit", "--type", "backup.pre", "--subject", SUBJECT, "--url", events_url(h),
        "--source", "k10-east", "--id", "ev-1",
    )  # fmt: skip
    # Without --wait a run that will be denied is still "accepted": exit 0.
    assert r.code == 0, r.err
    body = r.json()
    assert body["run_id"].startswith("run-")
    run = await h.final(body["run_id"])
    assert (run["source"], run["event_id"], run["allowed"]) == ("k10-east", "ev-1", False)


async def test_emit_post_event_carries_outcome(harness: HarnessFactory) -> None:
    post = PASS.replace("backup.pre", "backup.post")
    h = await harness({"pass": post})
    r = await snaphook(
        "emit", "--type", "backup.post", "--subject", SUBJECT, "--outcome", "partial",
        "--wait", "10", "--url", events_url(h),
    )  # fmt: skip
    assert r.code == 0, r.err
    run = await h.final(r.json()["run_id"])
    assert run["type"] == "io.snaphook.backup.post"
    assert run["event"]["data"]["outcome"] == "partial"


async def test_emit_rejected_event_exits_2(harness: HarnessFactory) -> None:
    h = await harness({"pass": PASS})
    r = await snaphook(
        "emit", "--type", "backup.pre", "--subject", "elsewhere/Deployment/x",
        "--wait", "5", "--url", events_url(h),
    )  # fmt: skip
    assert r.code == 2
    assert "answered 422" in r.err
    assert "no blueprint is bound to elsewhere/Deployment/x" in r.err


async def test_emit_nothing_listening_exits_2() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1/events"
    r = await snaphook(
        "emit", "--type", "backup.pre", "--subject", SUBJECT, "--wait", "5", "--url", url
    )
    assert r.code == 2
    assert f"snaphook: cannot reach {url}" in r.err


@pytest.mark.parametrize(
    ("data", "message"),
    [("{not json", "--data: not valid JSON"), ("[1, 2]", "--data must be a JSON object")],
)
async def test_emit_bad_data_exits_2(data: str, message: str) -> None:
    r = await snaphook(
        "emit", "--type", "backup.pre", "--subject", SUBJECT, "--data", data,
        "--url", f"http://127.0.0.1:{free_port()}/v1/events",
    )  # fmt: skip
    assert r.code == 2
    assert message in r.err
    assert r.out == ""


async def test_emit_usage_errors_exit_2() -> None:
    r = await snaphook("emit", "--subject", SUBJECT)
    assert r.code == 2
    assert "--type" in r.err
    r = await snaphook("emit", "--type", "backup.pre", "--subject", SUBJECT, "--mode", "batch")
    assert r.code == 2
    assert "--mode" in r.err


# -- runs -------------------------------------------------------------------------------------


async def test_runs_ls_and_show(harness: HarnessFactory) -> None:
    h = await harness(
        {"pass": PASS, "deny": DENY},
        bindings=[
            {"blueprint": "pass", "match": {"namespace": "ns"}},
            {"blueprint": "deny", "match": {"namespace": "deny"}},
        ],
    )
    first = await h.final((await h.emit())["run_id"])
    url = h.url
    ls, show = await asyncio.gather(
        snaphook("runs", "ls", "--url", url),
        snaphook("runs", "show", first["run_id"], "--url", url),
    )
    assert ls.code == 0, ls.err
    header, row = ls.out.splitlines()
    assert header.split() == ["RUN", "STATUS", "ALLOWED", "TYPE", "SUBJECT", "BLUEPRINT"]
    assert row.split() == [first["run_id"], "succeeded", "true", "backup.pre", SUBJECT, "pass"]
    assert show.code == 0, show.err
    shown = show.json()
    assert shown["run_id"] == first["run_id"] and shown["status"] == "succeeded"
    assert [s["name"] for s in shown["steps"]] == ["freeze", "check"]

    denied = await h.final((await h.emit(subject="deny/Deployment/db"))["run_id"])
    failed, newest, none = await asyncio.gather(
        snaphook("runs", "ls", "--url", url, "--status", "failed"),
        snaphook("runs", "ls", "--url", url, "--limit", "1"),
        snaphook("runs", "ls", "--url", url, "--status", "running"),
    )
    assert failed.code == 0, failed.err
    assert failed.out.splitlines()[1].split() == [
        denied["run_id"], "failed", "false", "backup.pre", "deny/Deployment/db", "deny",
    ]  # fmt: skip
    assert len(failed.out.splitlines()) == 2
    assert newest.out.splitlines()[1].split()[0] == denied["run_id"]  # newest first
    assert len(newest.out.splitlines()) == 2
    assert none.out.strip() == "no runs"


async def test_runs_show_unknown_and_unreachable(harness: HarnessFactory) -> None:
    h = await harness({"pass": PASS})
    unknown, unreachable = await asyncio.gather(
        snaphook("runs", "show", "run-nope", "--url", h.url),
        snaphook("runs", "ls", "--url", f"http://127.0.0.1:{free_port()}"),
    )
    assert unknown.code == 2
    assert "answered 404" in unknown.err
    assert unreachable.code == 2
    assert "cannot read" in unreachable.err


# -- validate ---------------------------------------------------------------------------------


async def test_validate_repo_hooks() -> None:
    r = await snaphook("validate")
    assert r.code == 0, r.err
    assert r.out.strip() == "ok: hooks"


async def test_validate_broken_blueprints(tmp_path: Path) -> None:
    write_blueprints(tmp_path / "bp", {"broken": BROKEN, "badkey": BAD_KEY, "good": GOOD})
    r = await snaphook("validate", str(tmp_path / "bp"))
    assert r.code == 1
    assert r.out == ""
    # Every problem at once, one line each, file:line first.
    problems = r.err.splitlines()
    assert len(problems) == 2, r.err
    bad_key, broken = problems
    assert bad_key.startswith(f"{tmp_path / 'bp' / 'badkey.yaml'}:10: ")
    assert "colour" in bad_key
    assert broken.startswith(f"{tmp_path / 'bp' / 'broken.yaml'}:9: ")
    assert "nosuch.freeze" in broken


async def test_validate_good_directory(tmp_path: Path) -> None:
    write_blueprints(tmp_path / "bp", {"good": GOOD})
    r = await snaphook("validate", str(tmp_path / "bp"))
    assert r.code == 0, r.err
    assert r.out.strip() == f"ok: {tmp_path / 'bp'}"


async def test_validate_missing_directory(tmp_path: Path) -> None:
    r = await snaphook("validate", str(tmp_path / "nope"))
    assert r.code == 1
    assert "no such file or directory" in r.err


async def test_validate_binding_to_unknown_blueprint(tmp_path: Path) -> None:
    write_blueprints(tmp_path / "bp", {"good": GOOD})
    config = tmp_path / "snaphook.yaml"
    config.write_text(
        "bindings:\n  - {blueprint: good}\n  - {blueprint: nope, match: {namespace: x}}\n",
        encoding="utf-8",
    )
    r = await snaphook("validate", str(tmp_path / "bp"), "--config", str(config))
    assert r.code == 1
    assert r.err.strip() == f"{config}: bindings[1]: unknown blueprint 'nope'"


async def test_validate_invalid_config_file(tmp_path: Path) -> None:
    config = tmp_path / "snaphook.yaml"
    config.write_text("port: [1\n", encoding="utf-8")
    r = await snaphook("validate", "--config", str(config))
    assert r.code == 2
    assert f"{config}:" in r.err and "invalid YAML" in r.err


# -- plan -------------------------------------------------------------------------------------


async def test_plan_text_for_the_example() -> None:
    r = await snaphook(
        "plan", "--config", EXAMPLE_CONFIG, "--type", "backup.pre", "--subject", DEMO_SUBJECT
    )
    assert r.code == 0, r.err
    lines = [line.strip() for line in r.out.splitlines()]
    assert lines[0].startswith("blueprint demo  phase backup.pre  failure_policy=fail")
    assert "decision timeout=20s" in lines[0]  # the binding's timeout
    assert [line for line in lines if line.endswith(":") and " " in line] == [
        "level 0:",
        "level 1:",
        "finally 2:",
    ]
    steps = [line.split(":")[0] for line in lines[1:] if not line.endswith(":")]
    assert steps == ["freeze", "healthcheck", "report"]
    (healthcheck,) = [line for line in lines if line.startswith("healthcheck:")]
    assert healthcheck.startswith("healthcheck: http.request")
    assert "needs freeze" in healthcheck and "retry 3x" in healthcheck


async def test_plan_json_and_event_file(tmp_path: Path) -> None:
    event = event_json("backup.post", DEMO_SUBJECT)
    event_file = tmp_path / "event.json"
    event_file.write_text(json.dumps(event), encoding="utf-8")
    plan = ["plan", "--config", EXAMPLE_CONFIG, "--json"]
    pre, post = await asyncio.gather(
        snaphook(*plan, "--type", "backup.pre", "--subject", DEMO_SUBJECT),
        snaphook(*plan, "--event", str(event_file)),
    )
    assert pre.code == 0, pre.err
    doc = pre.json()
    assert (doc["blueprint"], doc["phase"], doc["timeout"]) == ("demo", "backup.pre", 20.0)
    assert doc["params"] == {"freeze_seconds": 0.2, "fail": False}
    steps = {s["name"]: s for s in doc["steps"]}
    assert steps["healthcheck"]["needs"] == ["freeze"]
    assert steps["healthcheck"]["level"] == 1
    assert steps["freeze"]["lease"] == {"ttl": 300.0, "release": "notify.log"}
    assert steps["report"]["when"] == "always"
    assert post.code == 0, post.err
    assert post.json()["phase"] == "backup.post"
    assert [s["name"] for s in post.json()["steps"]] == ["thaw", "report"]


async def test_plan_event_params_override_defaults() -> None:
    data = {"backup": {"name": "b", "id": "b"}, "params": {"fail": True}}
    r = await snaphook(
        "plan", "--config", EXAMPLE_CONFIG, "--type", "backup.pre", "--subject", DEMO_SUBJECT,
        "--data", json.dumps(data), "--json",
    )  # fmt: skip
    assert r.code == 0, r.err
    assert r.json()["params"] == {"freeze_seconds": 0.2, "fail": True}


async def test_plan_without_binding_suggests_blueprint() -> None:
    args = ["plan", "--config", EXAMPLE_CONFIG, "--type", "backup.pre"]
    unbound, chosen = await asyncio.gather(
        snaphook(*args, "--subject", "other/Deployment/x"),
        snaphook(*args, "--subject", "other/Deployment/x", "--blueprint", "demo"),
    )
    assert unbound.code == 1
    assert "no blueprint is bound to other/Deployment/x" in unbound.err
    assert "--blueprint" in unbound.err
    assert chosen.code == 0, chosen.err
    assert "blueprint demo" in chosen.out


async def test_plan_usage_errors(tmp_path: Path) -> None:
    bad = tmp_path / "event.json"
    bad.write_text("{oops", encoding="utf-8")
    missing, bad_json, unknown_bp = await asyncio.gather(
        snaphook("plan", "--type", "backup.pre"),
        snaphook("plan", "--event", str(bad)),
        snaphook("plan", "--type", "backup.pre", "--subject", DEMO_SUBJECT, "--blueprint", "nope"),
    )
    assert missing.code == 2 and "give --event FILE, or --type and --subject" in missing.err
    assert bad_json.code == 2 and "--event: not valid JSON" in bad_json.err
    assert unknown_bp.code == 1 and "blueprint 'nope' is not loaded" in unknown_bp.err


# -- serve ------------------------------------------------------------------------------------


@dataclass
class Served:
    proc: asyncio.subprocess.Process
    url: str
    stderr: Path

    def log(self) -> str:
        return self.stderr.read_text(encoding="utf-8", errors="replace")


ServeFactory = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[ServeFactory]:
    started: list[tuple[asyncio.subprocess.Process, Any]] = []

    async def start(
        *args: str, port: int | None = None, env: dict[str, str] | None = None
    ) -> Served:
        errfile = tmp_path / f"serve{len(started)}.err"
        err = errfile.open("wb")
        proc = await asyncio.create_subprocess_exec(
            str(SNAPHOOK), "serve", *args,
            stdout=asyncio.subprocess.DEVNULL, stderr=err, env=env or clean_env(), cwd=REPO,
        )  # fmt: skip
        started.append((proc, err))
        return Served(proc, f"http://127.0.0.1:{port}", errfile)

    yield start
    for proc, err in started:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        err.close()


async def serve_ready(served: Served, timeout: float = 15) -> dict[str, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        return await wait_ready(
            session,
            served.url,
            alive=lambda: served.proc.returncode is None,
            log=served.log,
            within=timeout,
        )


async def get_json(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body


async def wait_run_final(base: str, run_id: str, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        run = await get_json(f"{base}/v1/runs/{run_id}")
        if run["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
            return run
        await asyncio.sleep(0.05)


async def stop(served: Served, within: float = 5) -> int:
    served.proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    code = await asyncio.wait_for(served.proc.wait(), within)
    assert time.monotonic() - started < within
    return code


async def test_serve_the_readme_demo(serve: ServeFactory, tmp_path: Path) -> None:
    port = free_port()
    served = await serve(
        "--port", str(port), "--state-dir", str(tmp_path / "state"), "--config", EXAMPLE_CONFIG,
        port=port,
    )  # fmt: skip
    ready = await serve_ready(served)
    assert "demo" in ready["blueprints"]  # default hooks/ from the working directory
    emit = ["emit", "--url", f"{served.url}/v1/events", "--subject", DEMO_SUBJECT]

    # A pre event whose freeze fails on request: denied, exit 1, lease released.
    data = json.dumps({"backup": {"name": "nightly", "id": "b1"}, "params": {"fail": True}})
    denied = await snaphook(*emit, "--type", "backup.pre", "--data", data, "--wait", "10")
    assert denied.code == 1, denied.err
    assert denied.json()["allowed"] is False
    pre = await wait_run_final(served.url, denied.json()["run_id"])
    assert pre["status"] == "failed"
    assert [lease["status"] for lease in pre["leases"]] == ["released"]

    # The post event: thaw + report, all through the CLI, then checked through the API.
    done = await snaphook(
        *emit, "--type", "backup.post", "--backup-id", "b1", "--backup-name", "nightly",
        "--wait", "10",
    )  # fmt: skip
    assert done.code == 0, done.err
    post = await wait_run_final(served.url, done.json()["run_id"])
    assert post["status"] == "succeeded", post
    assert post["blueprint"] == "demo" and post["type"] == "io.snaphook.backup.post"
    report = {s["name"]: s for s in post["steps"]}["report"]
    assert report["outputs"] == {"message": "backup nightly finished: succeeded"}
    assert (tmp_path / "state" / "journal.sqlite3").exists()

    # SIGTERM while a run is in flight: the run is drained, then the process exits 0.
    data = json.dumps(
        {"backup": {"name": "late", "id": "b2"}, "params": {"fail": True, "freeze_seconds": 0.5}}
    )
    accepted = await snaphook(*emit, "--type", "backup.pre", "--data", data)
    assert accepted.code == 0, accepted.err
    in_flight = accepted.json()["run_id"]
    assert await stop(served) == 0
    log = served.log()
    assert f"snaphook serving on http://127.0.0.1:{port}" in log
    assert "Traceback" not in log
    # The log is JSON lines (after the one "serving on" banner).
    entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    finished = {e["run_id"]: e["status"] for e in entries if e["msg"] == "run finished"}
    assert finished[post["run_id"]] == "succeeded"
    assert finished[in_flight] == "failed"  # ran to its end, not cut off
    released = [e for e in entries if e["msg"] == "lease released"]
    assert {e["run_id"] for e in released} == {pre["run_id"], in_flight}


async def test_serve_honours_snaphook_port_env(serve: ServeFactory, tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(SNAPHOOK_PORT=str(port), SNAPHOOK_STATE_DIR=str(tmp_path / "state"))
    served = await serve(port=port, env=env)
    await serve_ready(served)
    assert await stop(served) == 0


async def test_serve_broken_blueprints_exits_before_serving(
    serve: ServeFactory, tmp_path: Path
) -> None:
    write_blueprints(tmp_path / "bp", {"broken": BROKEN})
    port = free_port()
    served = await serve(
        "--port", str(port), "--state-dir", str(tmp_path / "state"), "--hooks",
        str(tmp_path / "bp"), port=port,
    )  # fmt: skip
    code = await asyncio.wait_for(served.proc.wait(), 15)
    assert code == 1
    log = served.log()
    assert f"snaphook: {tmp_path / 'bp' / 'broken.yaml'}:9: " in log
    assert "nosuch.freeze" in log
    assert "Traceback" not in log
    assert "serving on" not in log


async def test_serve_invalid_setting_exits_2(serve: ServeFactory, tmp_path: Path) -> None:
    served = await serve("--state-dir", str(tmp_path), env=clean_env(SNAPHOOK_PORT="eighty"))
    assert await asyncio.wait_for(served.proc.wait(), 15) == 2
    log = served.log()
    assert "invalid settings" in log and "port" in log
    assert "Traceback" not in log
