"""The function host over real HTTP: ``POST /`` and ``/functions/<name>`` with invoke
CloudEvents in binary and structured mode, answers, refusals, dedup, auth; and a real
``snaphook function serve`` process for PORT, SIGTERM drain and cross-process dedup."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from dispatcher.cehttp import encode_event
from dispatcher.errors import ConfigError
from dispatcher.function_host import select_functions
from dispatcher.invocation_cache import InvocationCache, KeyConflict
from functions.sdk import Context, FunctionRegistry, function
from tests.conftest import FunctionHostFactory, eventually, free_port
from tests.hookfns import Empty, Recorder, fresh
from tests.processes import wait_ready

INVOKE = "io.snaphook.function.invoke"
RESULT = "io.snaphook.function.result"
ERROR = "io.snaphook.function.error"
SNAPHOOK = Path(sys.executable).with_name("snaphook")
REPO = Path(__file__).resolve().parent.parent


def invocation(
    function: str | None = "test.effect",
    params: dict[str, Any] | None = None,
    *,
    event_id: str | None = None,
    run_id: str | None = None,
    step: str = "work",
    attempt: int = 1,
    timeout: float = 10.0,
    **data: Any,
) -> dict[str, Any]:
    """An invoke event as a dispatcher (or curl) sends it, written out field by field."""
    run_id = run_id or f"run-{uuid.uuid4().hex[:8]}"
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": event_id or f"{run_id}/{step}/{attempt}",
        "source": "test-dispatcher",
        "type": INVOKE,
        "datacontenttype": "application/json",
        "data": {
            "params": params or {},
            "event": {
                "id": "e1",
                "source": "k10",
                "type": "io.snaphook.backup.pre",
                "subject": "ns/Deployment/app",
                "data": {"backup": {"name": "nightly", "id": "b1"}},
            },
            "run_id": run_id,
            "step": step,
            "attempt": attempt,
            "timeout": timeout,
            **data,
        },
    }
    if function is not None:
        event["snaphookfunction"] = function
    return event


Post = Callable[..., Awaitable[aiohttp.ClientResponse]]


class Host:
    def __init__(self, client: TestClient[Any, Any], recorder: Recorder) -> None:
        self.client = client
        self.recorder = recorder

    async def post(
        self,
        event: dict[str, Any],
        *,
        mode: str = "binary",
        path: str = "/",
        headers: dict[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        hdrs, body = encode_event(event, mode)
        hdrs.update(headers or {})
        return await self.client.post(path, data=body, headers=hdrs)

    async def answer(self, event: dict[str, Any], **kw: Any) -> dict[str, Any]:
        """The answer event in structured form, whichever mode it came in."""
        resp = await self.post(event, **kw)
        assert resp.status == 200, await resp.text()
        return await answer_event(resp)


async def answer_event(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    body = await resp.read()
    if resp.content_type == "application/cloudevents+json":
        parsed: dict[str, Any] = json.loads(body)
        return parsed
    attributes = {k[3:].lower(): v for k, v in resp.headers.items() if k.lower().startswith("ce-")}
    return {**attributes, "datacontenttype": resp.content_type, "data": json.loads(body)}


HostFactory = Callable[..., Awaitable[Host]]


@pytest.fixture
def host(function_host: FunctionHostFactory) -> HostFactory:
    async def make(*args: Any, **kw: Any) -> Host:
        handle = await function_host(*args, **kw)
        return Host(handle.client, handle.recorder)

    return make


# --- answers --------------------------------------------------------------------------------


async def test_binary_invoke_answers_a_binary_result_event(host: HostFactory) -> None:
    h = await host()
    event = invocation("test.effect", {"label": "x"})
    resp = await h.post(event, mode="binary")
    assert resp.status == 200
    assert resp.headers["ce-type"] == RESULT
    assert resp.headers["ce-subject"] == "test.effect"
    assert resp.headers["ce-snaphookinvocation"] == event["id"]
    assert resp.content_type == "application/json"
    assert json.loads(await resp.read()) == {"outputs": {"effect": 1}}
    assert h.recorder.calls == [("test.effect", "work", 1)]


async def test_structured_invoke_on_the_function_path(host: HostFactory) -> None:
    h = await host()
    resp = await h.post(invocation(None), mode="structured", path="/functions/test.effect")
    assert resp.status == 200
    assert resp.content_type == "application/cloudevents+json"
    answer = json.loads(await resp.read())
    assert answer["type"] == RESULT
    assert answer["data"] == {"outputs": {"effect": 1}}


async def test_the_function_sees_the_invocation_context(host: HostFactory) -> None:
    registry = FunctionRegistry()
    seen: dict[str, Any] = {}

    @function("probe.context", registry=registry)
    async def probe(ctx: Context, p: Empty) -> None:
        seen.update(
            run_id=ctx.run_id,
            step=ctx.step,
            attempt=ctx.attempt,
            lease_id=ctx.lease_id,
            outputs=ctx.outputs,
            subject=ctx.event.subject,
            backup=ctx.event.data["backup"]["id"],
            traceparent=ctx.event.extensions.get("traceparent"),
            remaining=ctx.remaining(),
        )

    h = await host(registry)
    event = invocation("probe.context", run_id="r1", step="s", attempt=3, timeout=7.0)
    event["data"]["lease_id"] = "lease-1"
    event["data"]["outputs"] = {"freeze": {"db": "app"}}
    event["data"]["event"]["extensions"] = {
        "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    }
    answer = await h.answer(event)
    assert answer["data"] == {"outputs": {}}
    assert seen["run_id"] == "r1" and seen["step"] == "s" and seen["attempt"] == 3
    assert seen["lease_id"] == "lease-1"
    assert seen["outputs"] == {"freeze": {"db": "app"}}
    assert seen["subject"] == "ns/Deployment/app" and seen["backup"] == "b1"
    assert seen["traceparent"].startswith("00-aaaa")
    assert 0 < seen["remaining"] <= 7.0


async def test_function_errors_are_answered_as_error_events(host: HostFactory) -> None:
    h = await host()
    permanent = await h.answer(invocation("test.fail"))
    assert permanent["type"] == ERROR
    assert permanent["data"] == {"message": "refused on purpose", "retryable": False, "delay": None}
    retryable = await h.answer(invocation("test.flaky", {"failures": 1, "delay": 0.5}))
    assert retryable["type"] == ERROR
    assert retryable["data"] == {"message": "flaky attempt 1", "retryable": True, "delay": 0.5}


async def test_bad_params_are_a_permanent_error_naming_the_field_not_the_value(
    host: HostFactory,
) -> None:
    h = await host()
    answer = await h.answer(invocation("test.effect", {"seconds": "s3cr3t-not-a-number"}))
    assert answer["type"] == ERROR
    assert answer["data"]["retryable"] is False
    assert "invalid params for test.effect: seconds:" in answer["data"]["message"]
    assert "s3cr3t" not in json.dumps(answer)


async def test_the_host_enforces_the_invocation_timeout(host: HostFactory) -> None:
    h = await host()
    answer = await h.answer(invocation("test.effect", {"seconds": 30}, timeout=0.2))
    assert answer["type"] == ERROR
    assert answer["data"]["message"] == "timed out after 0.2s"
    assert answer["data"]["retryable"] is True
    assert not h.recorder.effects  # cancelled before its effect


# --- refusals ---------------------------------------------------------------------------------


async def problem(resp: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/problem+json"
    body: dict[str, Any] = await resp.json()
    return body


async def test_malformed_requests_get_a_problem_naming_what_is_wrong(host: HostFactory) -> None:
    h = await host()
    post = h.client.post
    structured = {"Content-Type": "application/cloudevents+json"}
    body = await problem(await post("/", data=b"{nope", headers=structured), 400)
    assert "not valid JSON" in body["detail"]

    body = await problem(await h.post({**invocation(), "type": "io.snaphook.backup.pre"}), 422)
    assert body["field"] == "type"

    body = await problem(await h.post(invocation(None)), 400)
    assert body["field"] == "snaphookfunction"

    body = await problem(await h.post(invocation("no.such")), 404)
    assert "'no.such' is not served here" in body["detail"]

    body = await problem(await h.post(invocation("test.fail"), path="/functions/test.effect"), 400)
    assert "'test.effect'" in body["detail"] and "'test.fail'" in body["detail"]

    event = invocation()
    del event["data"]["timeout"]
    event["data"]["attempt"] = 0
    body = await problem(await h.post(event), 400)
    assert body["field"] == "data.attempt"
    assert "data.timeout: Field required" in body["detail"]

    event = {**invocation(), "data": [1, 2]}
    body = await problem(await h.post(event), 400)
    assert body["field"] == "data"

    batch = {"Content-Type": "application/cloudevents-batch+json"}
    body = await problem(await post("/", data=b"[]", headers=batch), 415)
    assert "batch" in body["detail"]

    body = await problem(await post("/", data=b"x", headers={"Content-Type": "text/plain"}), 415)
    assert "ce-* headers" in body["detail"]


async def test_a_body_over_the_limit_is_413(host: HostFactory) -> None:
    h = await host(max_body_bytes=2048)
    resp = await h.post(invocation("test.effect", {"label": "x" * 4096}))
    await problem(resp, 413)
    assert not h.recorder.calls


async def test_an_undecodable_content_encoding_is_400(host: HostFactory) -> None:
    h = await host()
    headers, body = encode_event(invocation("test.effect", {"label": "x"}), "binary")
    zipped = {**headers, "Content-Encoding": "gzip"}  # the body is not gzip
    await problem(await h.client.post("/", data=body, headers=zipped), 400)
    assert not h.recorder.calls


async def test_a_body_without_a_length_is_bounded_too(host: HostFactory) -> None:
    """Chunked or compressed: no Content-Length to refuse by, the bytes themselves count."""
    h = await host(max_body_bytes=2048)
    small = invocation("test.effect", {"label": "small"})
    headers, body = encode_event(small, "binary")

    async def chunks(data: bytes) -> AsyncIterator[bytes]:
        for start in range(0, len(data), 100):
            yield data[start : start + 100]

    resp = await h.client.post("/", data=chunks(body), headers=headers)
    assert resp.status == 200, await resp.text()
    assert resp.headers["ce-type"] == "io.snaphook.function.result"

    big = invocation("test.effect", {"label": "x" * 4096})
    headers, body = encode_event(big, "binary")
    await problem(await h.client.post("/", data=chunks(body), headers=headers), 413)
    zipped = {**headers, "Content-Encoding": "gzip"}
    # 4 kB of 'x' compress to far below the limit; what counts is what they inflate to.
    await problem(await h.client.post("/", data=gzip.compress(body), headers=zipped), 413)
    assert len(h.recorder.calls) == 1


async def test_bearer_token_is_required_when_configured(host: HostFactory) -> None:
    from tests.secrets_registry import test_secret

    token = test_secret("fh-token")
    h = await host(function_token=token)
    resp = await h.post(invocation())
    body = await problem(resp, 401)
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert body["field"] == "authorization"
    await problem(await h.post(invocation(), headers={"Authorization": "Bearer wrong"}), 401)
    await problem(await h.post(invocation(), headers={"Authorization": f"Basic {token}"}), 401)
    answer = await h.answer(invocation(), headers={"Authorization": f"Bearer {token}"})
    assert answer["type"] == RESULT
    assert h.recorder.effects.total() == 1
    # Probes stay open: a kubelet carries no token.
    assert (await h.client.get("/healthz")).status == 200
    assert (await h.client.get("/readyz")).status == 200


async def test_selected_functions_only(host: HostFactory) -> None:
    recorder = Recorder()
    served = select_functions(fresh(recorder), ["test.effect", "sleep"])
    assert served.names() == ["sleep", "test.effect"]
    h = await host(served, recorder)
    await problem(await h.post(invocation("test.fail")), 404)
    assert (await h.answer(invocation("sleep", {"seconds": 0})))["type"] == RESULT
    listing = await (await h.client.get("/functions")).json()
    assert [f["name"] for f in listing["functions"]] == ["sleep", "test.effect"]


def test_selection_by_family_and_pattern_and_unknown_entries() -> None:
    registry = fresh(Recorder())
    assert set(select_functions(registry, ["test"]).names()) == {
        "test.effect",
        "test.fail",
        "test.flaky",
        "test.freeze",
        "test.thaw",
    }
    assert select_functions(registry, ["test.f*"]).names() == [
        "test.fail",
        "test.flaky",
        "test.freeze",
    ]
    assert select_functions(registry, []) is registry
    with pytest.raises(ConfigError, match=r"nothing installed matches 'postgress'.*families: "):
        select_functions(registry, ["test", "postgress"])


# --- deduplication ------------------------------------------------------------------------------


async def test_a_repeated_invocation_id_replays_the_stored_answer(host: HostFactory) -> None:
    h = await host()
    event = invocation("test.effect")
    first = await h.post(event)
    first_answer = await answer_event(first)
    again = await h.post(event, mode="structured")  # the mode may differ; the answer does not
    assert again.headers["Snaphook-Replayed"] == "true"
    assert await answer_event(again) == first_answer
    assert "Snaphook-Replayed" not in first.headers
    assert h.recorder.effects.total() == 1
    # Another attempt is another invocation.
    event2 = invocation("test.effect", run_id=event["data"]["run_id"], attempt=2)
    assert (await h.answer(event2))["data"] == {"outputs": {"effect": 2}}


async def test_a_repeat_while_running_joins_the_running_call(host: HostFactory) -> None:
    h = await host()
    event = invocation("test.effect", {"seconds": 0.3})
    answers = await asyncio.gather(*(h.answer(event) for _ in range(3)))
    assert all(a == answers[0] for a in answers)
    assert answers[0]["data"] == {"outputs": {"effect": 1}}
    assert h.recorder.effects.total() == 1


async def test_an_invocation_id_reused_for_another_function_is_409(host: HostFactory) -> None:
    h = await host()
    event = invocation("test.effect")
    await h.answer(event)
    body = await problem(await h.post({**event, "snaphookfunction": "sleep"}), 409)
    assert "already ran 'test.effect'" in body["detail"]


async def test_cache_expires_after_ttl_and_stays_bounded() -> None:
    now = [0.0]
    cache: InvocationCache[int] = InvocationCache(10.0, 2, clock=lambda: now[0])
    calls = 0

    async def call() -> int:
        nonlocal calls
        calls += 1
        return calls

    assert (await cache.run("a", "f", call)).value == 1
    replay = await cache.run("a", "f", call)
    assert (replay.value, replay.replayed) == (1, True)
    now[0] = 10.0  # the TTL has passed: the key runs afresh
    assert (await cache.run("a", "f", call)).value == 2
    await cache.run("b", "f", call)
    await cache.run("c", "f", call)  # over the bound: the least recently used ("a") goes
    assert len(cache) == 2
    assert (await cache.run("a", "f", call)).replayed is False
    with pytest.raises(KeyConflict):
        await cache.run("c", "g", call)


async def test_a_failed_call_is_not_remembered() -> None:
    cache: InvocationCache[int] = InvocationCache(10.0, 10)

    async def boom() -> int:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        await cache.run("k", "f", boom)
    assert len(cache) == 0 and cache.running == 0


# --- a real ``snaphook function serve`` ------------------------------------------------------


class HostProcess:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, effects: Path, log: Path):
        self.proc, self.port, self.effects, self.log = proc, port, effects, log
        self.url = f"http://127.0.0.1:{port}"

    def effect_lines(self) -> list[str]:
        return self.effects.read_text().splitlines() if self.effects.exists() else []

    async def ready(self, http: aiohttp.ClientSession, timeout: float = 30.0) -> dict[str, Any]:
        return await wait_ready(
            http,
            self.url,
            alive=lambda: self.proc.poll() is None,
            log=self.log.read_text,
            within=timeout,
        )


@pytest.fixture
def host_process(tmp_path: Path) -> Callable[..., HostProcess]:
    started: list[HostProcess] = []

    def start(*args: str, **env: str) -> HostProcess:
        port = free_port()
        effects = tmp_path / f"effects-{port}.txt"
        log = tmp_path / f"function-host-{port}.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("SNAPHOOK_")}
        environ.update(
            PORT=str(port),  # the Knative way; no --port given
            SNAPHOOK_FUNCTION_MODULES="tests.hookfns",
            SNAPHOOK_TEST_EFFECTS=str(effects),
            SNAPHOOK_SHUTDOWN_GRACE="10",
            PYTHONPATH=str(REPO),
            **env,
        )
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [str(SNAPHOOK), "function", "serve", *args],
                cwd=tmp_path,
                env=environ,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        process = HostProcess(proc, port, effects, log)
        started.append(process)
        return process

    yield start  # type: ignore[misc]
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()
        process.proc.wait()


async def post_invocation(
    http: aiohttp.ClientSession, url: str, event: dict[str, Any]
) -> dict[str, Any]:
    headers, body = encode_event(event, "binary")
    async with http.post(url, data=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return await answer_event(resp)


@pytest.mark.slow
async def test_served_process_honours_port_dedups_and_drains_on_sigterm(
    host_process: Callable[..., HostProcess],
) -> None:
    proc = host_process("--functions", "test")
    async with aiohttp.ClientSession() as http:
        ready = await proc.ready(http)
        assert ready["functions"] == 5 and ready["in_flight"] == 0

        quick = invocation("test.effect")
        first = await post_invocation(http, proc.url, quick)
        assert first["data"] == {"outputs": {"effect": 1}}
        assert await post_invocation(http, proc.url, quick) == first
        assert proc.effect_lines() == [f"{quick['data']['run_id']}/work"]

        slow = invocation("test.effect", {"seconds": 1.5})
        in_flight = asyncio.create_task(post_invocation(http, f"{proc.url}/", slow))

        async def running() -> bool:
            return bool((await proc.ready(http))["in_flight"])

        await eventually(running)
        proc.proc.send_signal(signal.SIGTERM)

        # The listener closes at once: new connections are refused while the call runs.
        async def refused() -> bool:
            async with aiohttp.ClientSession() as fresh_http:
                try:
                    async with fresh_http.get(f"{proc.url}/healthz"):
                        return False
                except aiohttp.ClientConnectorError:
                    return True

        await eventually(refused)
        assert not in_flight.done()

        answer = await in_flight  # ... and the in-flight call still completes
        assert answer["type"] == RESULT and answer["data"] == {"outputs": {"effect": 1}}
    assert await asyncio.to_thread(proc.proc.wait, 15) == 0
    assert proc.effect_lines()[-1] == f"{slow['data']['run_id']}/work"
    assert "draining" in proc.log.read_text()


@pytest.mark.slow
def test_serve_refuses_an_unknown_selection(host_process: Callable[..., HostProcess]) -> None:
    proc = host_process("--functions", "tset")
    assert proc.proc.wait(30) == 1
    assert "nothing installed matches 'tset'" in proc.log.read_text()
