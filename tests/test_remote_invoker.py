"""Steps on a remote function host, end to end over real HTTP: a dispatcher (the harness)
invokes a function host (``create_function_host`` on its own test server), sometimes
through a scripted front that is down, slow, answers 5xx or loses an answer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from dispatcher.blueprint_loader import validate_blueprints
from dispatcher.errors import ConfigError
from dispatcher.function_host import select_functions
from dispatcher.invokers import Invocation
from dispatcher.invokers.remote import RemoteInvoker
from dispatcher.invokers.routing import RoutingInvoker
from dispatcher.settings import Settings
from functions.sdk import EventInfo, PermanentError
from tests.conftest import FunctionHostFactory, HarnessFactory, free_port
from tests.hookfns import Recorder, fresh
from tests.secrets_registry import test_secret


def blueprint(steps: str, *, phase: str = "backup.pre", extra: str = "") -> str:
    body = "\n".join("      " + line for line in steps.strip().splitlines())
    return (
        "apiVersion: snaphook.io/v1\nkind: Blueprint\nmetadata: {name: bp}\nspec:\n"
        f"  actions:\n    {phase}:\n{body}\n{extra}"
    )


def step(
    url: str, function: str = "test.effect", *, retry: int = 1, timeout: str = "5s", **with_: Any
) -> str:
    return (
        f"- name: work\n  function: {function}\n  with: {json.dumps(with_)}\n"
        f"  invoke: {{url: '{url}'}}\n  timeout: {timeout}\n"
        f"  retry: {{attempts: {retry}, backoff: 10ms, max_backoff: 20ms}}\n"
    )


async def run_of(h: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Emit a pre event, wait for the run to end: (run, its step "work")."""
    run = await h.final((await h.emit())["run_id"])
    return run, {s["name"]: s for s in run["steps"]}["work"]


# --- a scripted front: down, slow, 5xx, lost answers ----------------------------------------


class Front:
    """Stands in front of a real host. Each request takes the next scripted behaviour
    (the last one repeats): ``forward``, ``503``, ``slow`` (never answers in time), or
    ``lose`` (forwards, then drops the connection without answering)."""

    def __init__(self, target: str, script: list[str]) -> None:
        self.target = target
        self.script = script
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.http: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append((dict(request.headers), body))
        action = self.script[min(len(self.requests), len(self.script)) - 1]
        if action == "503":
            problem = {"title": "Service Unavailable", "status": 503, "detail": "warming up"}
            return web.json_response(
                problem,
                status=503,
                content_type="application/problem+json",
                headers={"Retry-After": "0"},
            )
        if action == "slow":
            await asyncio.sleep(30)
        assert self.http is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host",)}
        async with self.http.post(self.target, data=body, headers=headers) as resp:
            answer = await resp.read()
            reply_headers = {
                k: v
                for k, v in resp.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "date", "server")
            }
        if action == "lose":
            assert request.transport is not None
            request.transport.close()  # the host ran it; its answer never arrives
        return web.Response(status=resp.status, body=answer, headers=reply_headers)


FrontFactory = Callable[[str, list[str]], Awaitable[tuple[str, Front]]]


@pytest.fixture
async def front() -> AsyncIterator[FrontFactory]:
    servers: list[TestServer] = []
    async with aiohttp.ClientSession() as http:

        async def make(target: str, script: list[str]) -> tuple[str, Front]:
            f = Front(target, script)
            f.http = http
            app = web.Application()
            app.router.add_post("/", f.handle)
            server = TestServer(app)
            await server.start_server()
            servers.append(server)
            return str(server.make_url("/")), f

        yield make
        for server in servers:
            await server.close()


# --- routing -----------------------------------------------------------------------------------


async def test_a_step_with_invoke_url_runs_on_the_host(
    harness: HarnessFactory, function_host: FunctionHostFactory
) -> None:
    host = await function_host()
    h = await harness({"bp": blueprint(step(host.url, label="remote"))})
    run, work = await run_of(h)
    assert run["status"] == "succeeded", run
    assert (work["status"], work["attempts"], work["outputs"]) == ("succeeded", 1, {"effect": 1})
    assert host.recorder.calls == [("test.effect", "work", 1)]
    assert not h.recorder.calls  # nothing ran in the dispatcher


async def test_remote_functions_setting_routes_by_pattern(
    harness: HarnessFactory, function_host: FunctionHostFactory
) -> None:
    host = await function_host()
    steps = """
- {name: work, function: test.effect}
- {name: local, function: sleep, with: {seconds: 0}}
"""
    h = await harness({"bp": blueprint(steps)}, remote_functions={"test.*": host.url})
    run = await h.final((await h.emit())["run_id"])
    assert run["status"] == "succeeded", run
    assert host.recorder.calls == [("test.effect", "work", 1)]
    assert not h.recorder.calls


async def test_a_step_url_beats_the_setting(
    harness: HarnessFactory, function_host: FunctionHostFactory
) -> None:
    host = await function_host()
    down = f"http://127.0.0.1:{free_port()}/"
    h = await harness({"bp": blueprint(step(host.url))}, remote_functions={"test.*": down})
    run, work = await run_of(h)
    assert work["status"] == "succeeded", run
    assert host.recorder.effects.total() == 1


def test_route_precedence_exact_then_longest_pattern() -> None:
    routes = {"*": "http://a", "test.*": "http://b", "test.e*": "http://c", "test.fail": "http://d"}
    router = RoutingInvoker(local=None, remote=None, routes=routes)  # type: ignore[arg-type]
    assert router.route("test.fail") == "http://d"
    assert router.route("test.effect") == "http://c"
    assert router.route("test.flaky") == "http://b"
    assert router.route("sleep") == "http://a"
    assert RoutingInvoker(None, None, {}).route("sleep") is None  # type: ignore[arg-type]


async def test_lease_release_is_routed_like_the_freeze(
    harness: HarnessFactory, function_host: FunctionHostFactory
) -> None:
    host = await function_host()
    pre = """
- name: freeze
  function: test.freeze
  with: {db: app}
  lease: {ttl: 5m, release: test.thaw}
"""
    post = """
    backup.post:
      - {name: thaw, function: test.thaw, with: {db: app, lease: "{{ leases.freeze }}"}}
"""
    h = await harness({"bp": blueprint(pre, extra=post)}, remote_functions={"test.*": host.url})
    run = await h.final((await h.emit("backup.pre", backup_id="b7"))["run_id"])
    assert run["status"] == "succeeded", run
    assert host.recorder.frozen == {"app": True}
    post_run = await h.final((await h.emit("backup.post", backup_id="b7"))["run_id"])
    assert post_run["status"] == "succeeded", post_run
    assert host.recorder.frozen == {"app": False}
    assert [db for db, _ in host.recorder.thawed_by] == ["app"]
    assert not h.recorder.calls


# --- failures and their retries ---------------------------------------------------------------


async def test_a_host_that_is_down_is_retried_then_fails_clearly(harness: HarnessFactory) -> None:
    down = f"http://127.0.0.1:{free_port()}/"
    h = await harness({"bp": blueprint(step(down, retry=3))})
    body = await h.emit(wait=10)
    assert body["allowed"] is False
    run = await h.final(body["run_id"])
    work = {s["name"]: s for s in run["steps"]}["work"]
    assert (work["status"], work["attempts"]) == ("failed", 3)
    assert work["error"].startswith(f"function host http://127.0.0.1:{down.split(':')[2][:-1]}")
    assert "unreachable" in work["error"]


async def test_a_slow_host_times_out_per_attempt_then_the_retry_succeeds(
    harness: HarnessFactory, function_host: FunctionHostFactory, front: FrontFactory
) -> None:
    host = await function_host()
    url, f = await front(host.url, ["slow", "forward"])
    h = await harness({"bp": blueprint(step(url, retry=2, timeout="300ms"))})
    run, work = await run_of(h)
    assert (work["status"], work["attempts"]) == ("succeeded", 2), run
    assert host.recorder.calls == [("test.effect", "work", 2)]
    ids = [headers["ce-id"] for headers, _ in f.requests]
    assert ids == [f"{run['run_id']}/work/1", f"{run['run_id']}/work/2"]
    # The second attempt was told how long it had left, not the whole step timeout anew.
    assert 0 < json.loads(f.requests[1][1])["timeout"] <= 0.3


async def test_a_timeout_on_every_attempt_fails_with_the_timeout(
    harness: HarnessFactory, function_host: FunctionHostFactory, front: FrontFactory
) -> None:
    host = await function_host()
    url, _ = await front(host.url, ["slow"])
    h = await harness({"bp": blueprint(step(url, retry=2, timeout="200ms"))})
    _, work = await run_of(h)
    assert (work["status"], work["attempts"]) == ("failed", 2)
    assert work["error"] == "timed out after 0.2s"


async def test_5xx_then_200_succeeds_on_the_second_attempt(
    harness: HarnessFactory, function_host: FunctionHostFactory, front: FrontFactory
) -> None:
    host = await function_host()
    url, f = await front(host.url, ["503", "forward"])
    h = await harness({"bp": blueprint(step(url, retry=3))})
    run, work = await run_of(h)
    assert (work["status"], work["attempts"]) == ("succeeded", 2), run
    assert len(f.requests) == 2
    assert host.recorder.effects.total() == 1


async def test_5xx_on_every_attempt_fails_with_the_hosts_words(
    harness: HarnessFactory, front: FrontFactory
) -> None:
    url, _ = await front("http://127.0.0.1:9/", ["503"])
    h = await harness({"bp": blueprint(step(url, retry=2))})
    _, work = await run_of(h)
    assert (work["status"], work["attempts"]) == ("failed", 2)
    assert "answered 503 Service Unavailable: warming up" in work["error"]


async def test_4xx_is_permanent_and_not_retried(
    harness: HarnessFactory, function_host: FunctionHostFactory
) -> None:
    token = test_secret("remote-token")
    host = await function_host(function_token=token)
    h = await harness({"bp": blueprint(step(host.url, retry=3))})
    _, work = await run_of(h)
    assert (work["status"], work["attempts"]) == ("failed", 1)
    assert "refused the invocation (401): this function host needs Authorization" in work["error"]
    assert not host.recorder.calls

    ok = await harness({"bp": blueprint(step(host.url, retry=3))}, remote_token=token)
    _, work = await run_of(ok)
    assert work["status"] == "succeeded"


async def test_an_unknown_function_on_the_host_is_permanent(
    harness: HarnessFactory, function_host: FunctionHostFactory
) -> None:
    host = await function_host(select_functions(fresh(Recorder()), ["sleep"]))
    h = await harness({"bp": blueprint(step(host.url, retry=3))})
    _, work = await run_of(h)
    assert (work["status"], work["attempts"]) == ("failed", 1)
    assert "(404): function 'test.effect' is not served here (serving: sleep)" in work["error"]


async def test_error_events_keep_retryable_and_permanent_apart(
    harness: HarnessFactory, function_host: FunctionHostFactory
) -> None:
    host = await function_host()
    steps = f"""
- name: refused
  function: test.fail
  invoke: {{url: '{host.url}'}}
  on_error: continue
  retry: {{attempts: 3, backoff: 10ms}}
- name: flaky
  function: test.flaky
  with: {{failures: 2}}
  invoke: {{url: '{host.url}'}}
  retry: {{attempts: 3, backoff: 10ms}}
"""
    h = await harness({"bp": blueprint(steps)})
    run = await h.final((await h.emit())["run_id"])
    steps_by = {s["name"]: s for s in run["steps"]}
    assert (steps_by["refused"]["status"], steps_by["refused"]["attempts"]) == ("failed", 1)
    assert steps_by["refused"]["error"] == "refused on purpose"
    assert (steps_by["flaky"]["status"], steps_by["flaky"]["attempts"]) == ("succeeded", 3)
    assert steps_by["flaky"]["outputs"] == {"effect": 3}


async def test_a_lost_answer_is_sent_again_and_the_host_runs_it_once(
    harness: HarnessFactory, function_host: FunctionHostFactory, front: FrontFactory
) -> None:
    host = await function_host()
    url, f = await front(host.url, ["lose", "forward"])
    h = await harness({"bp": blueprint(step(url, retry=1))})
    run, work = await run_of(h)
    assert (work["status"], work["attempts"], work["outputs"]) == ("succeeded", 1, {"effect": 1})
    assert [headers["ce-id"] for headers, _ in f.requests] == [f"{run['run_id']}/work/1"] * 2
    assert host.recorder.effects.total() == 1  # the repeat got the stored answer


async def test_rendered_secrets_travel_to_the_host_but_nowhere_else(
    harness: HarnessFactory,
    function_host: FunctionHostFactory,
    front: FrontFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = test_secret("remote-param")
    monkeypatch.setenv("SNAPHOOK_SECRET_FH_LABEL", secret)
    host = await function_host()
    url, f = await front(host.url, ["forward"])
    label = "{{ secret('fh', 'label') }}"
    h = await harness({"bp": blueprint(step(url, label=label))})
    run, work = await run_of(h)
    assert work["status"] == "succeeded", run
    assert json.loads(f.requests[0][1])["params"] == {"label": secret}
    assert secret not in json.dumps(run)


# --- what may be called at all -------------------------------------------------------------


def invocation_to(url: str) -> Invocation:
    event = EventInfo(id="e", source="s", type="io.snaphook.backup.pre", subject="a/b/c", data={})
    return Invocation("test.effect", {}, event, "r", "s", 1, 5.0, remote_url=url)


async def test_cleartext_http_only_to_loopback_and_private_addresses() -> None:
    invoker = RemoteInvoker()
    try:
        # Refused by the socket factory before any packet leaves (TEST-NET-1 address).
        with pytest.raises(PermanentError, match=r"refusing cleartext http to 192\.0\.2\.10"):
            await invoker.invoke(invocation_to("http://192.0.2.10:9/"))
    finally:
        await invoker.close()
    strict = RemoteInvoker(plain_http="never")
    try:
        with pytest.raises(PermanentError, match="remote_plain_http: never"):
            await strict.invoke(invocation_to(f"http://127.0.0.1:{free_port()}/"))
    finally:
        await strict.close()


def test_blueprints_reject_bad_invoke_urls_with_file_and_line(tmp_path: Path) -> None:
    bad = {
        "ftp://host/": "must start with http:// or https://",
        "http://user:pw@host/": "must not carry credentials",
        "http:///nohost": "must name a host",
        "http://host:99999/": "not a valid URL",
    }
    steps = "".join(
        f"- {{name: s{i}, function: test.effect, invoke: {{url: '{url}'}}}}\n"
        for i, url in enumerate(bad)
    )
    path = tmp_path / "bp.yaml"
    path.write_text(blueprint(steps), encoding="utf-8")
    errors = [str(e) for e in validate_blueprints(path, fresh(Recorder()))]
    assert len(errors) == len(bad), errors
    for line, (error, expected) in enumerate(zip(errors, bad.values(), strict=True), start=7):
        assert error.startswith(f"{path}:{line}: spec.actions.backup.pre[{line - 7}].invoke.url")
        assert expected in error


def test_settings_reject_bad_remote_urls() -> None:
    with pytest.raises(ConfigError, match=r"remote_functions.*postgres\.\*: URL must start"):
        Settings.load(None, remote_functions={"postgres.*": "pg-host:8080"})
    settings = Settings.load(None, remote_functions={"postgres.*": "https://pg-host:8443"})
    assert settings.remote_functions == {"postgres.*": "https://pg-host:8443"}
