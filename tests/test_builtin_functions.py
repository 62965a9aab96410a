"""Built-in functions (http.request, sleep, notify.log) called the way the runner calls them."""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

import functions.http
import functions.notify
import functions.sleep  # noqa: F401  (registers the built-ins)
from dispatcher.invokers import Invocation
from dispatcher.invokers.inprocess import InProcessInvoker
from dispatcher.redaction import MASK
from dispatcher.secrets import EnvSecretResolver
from functions.sdk import EventInfo, PermanentError, RetryableError, default_registry
from tests.conftest import free_port

EVENT = EventInfo(
    id="e1",
    source="test",
    type="io.snaphook.backup.pre",
    subject="ns/Deployment/app",
    data={"backup": {"name": "b", "id": "b1"}},
)


def invocation(function: str, params: dict[str, Any], *, timeout: float = 5.0) -> Invocation:
    return Invocation(
        function=function,
        params=params,
        event=EVENT,
        run_id="run-42",
        step="call",
        attempt=1,
        timeout=timeout,
    )


@dataclass
class Peer:
    """A local HTTP server that records what it received."""

    server: TestServer
    requests: list[dict[str, Any]] = field(default_factory=list)

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    received: list[dict[str, Any]] = []

    async def record(request: web.Request) -> None:
        body = await request.text()
        received.append(
            {
                "method": request.method,
                "path": request.path,
                "headers": dict(request.headers),
                "body": body,
            }
        )

    async def status(request: web.Request) -> web.Response:
        await record(request)
        code = int(request.match_info["code"])
        return web.json_response({"code": code}, status=code)

    async def echo(request: web.Request) -> web.Response:
        await record(request)
        return web.json_response(received[-1])

    async def text(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(text="plain words")

    app = web.Application()
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/text", text)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield Peer(server, received)
    await server.close()


@pytest.fixture
async def invoker() -> AsyncIterator[InProcessInvoker]:
    session = aiohttp.ClientSession()
    yield InProcessInvoker(default_registry, session, EnvSecretResolver({}))
    await session.close()


# -- http.request ---------------------------------------------------------------------------


async def test_expected_status_with_json_body(peer: Peer, invoker: InProcessInvoker) -> None:
    out = await invoker.invoke(
        invocation(
            "http.request",
            {
                "url": peer.url("/echo"),
                "method": "POST",
                "headers": {"X-Trace": "t1"},
                "json": {"freeze": True},
            },
        )
    )
    assert out["status"] == 200
    assert out["json"]["method"] == "POST"
    assert json.loads(out["json"]["body"]) == {"freeze": True}
    assert out["json"]["headers"]["X-Trace"] == "t1"
    assert json.loads(out["body"]) == out["json"]
    (request,) = peer.requests
    assert request["headers"]["Content-Type"] == "application/json"


async def test_non_json_body_and_custom_expected_status(
    peer: Peer, invoker: InProcessInvoker
) -> None:
    out = await invoker.invoke(invocation("http.request", {"url": peer.url("/text")}))
    assert out == {"status": 200, "body": "plain words", "json": None}
    out = await invoker.invoke(
        invocation("http.request", {"url": peer.url("/status/404"), "expect_status": [404]})
    )
    assert out["status"] == 404 and out["json"] == {"code": 404}


async def test_string_body_is_sent_as_is(peer: Peer, invoker: InProcessInvoker) -> None:
    await invoker.invoke(
        invocation(
            "http.request",
            {"url": peer.url("/echo"), "method": "PUT", "body": "raw=1", "json": {"x": 1}},
        )
    )
    assert peer.requests[0]["method"] == "PUT" and peer.requests[0]["body"] == "raw=1"


@pytest.mark.parametrize("code", [400, 401, 403, 404, 409, 200])
async def test_unexpected_4xx_is_permanent(
    peer: Peer, invoker: InProcessInvoker, code: int
) -> None:
    expect = [201] if code == 200 else [200]  # a 2xx that was not asked for is refused too
    with pytest.raises(PermanentError, match=f"answered {code}") as info:
        await invoker.invoke(
            invocation(
                "http.request", {"url": peer.url(f"/status/{code}"), "expect_status": expect}
            )
        )
    assert "/status/" in str(info.value) and "127.0.0.1" in str(info.value)


@pytest.mark.parametrize("code", [500, 502, 503, 429])
async def test_5xx_and_429_are_retryable(peer: Peer, invoker: InProcessInvoker, code: int) -> None:
    with pytest.raises(RetryableError, match=f"answered {code}"):
        await invoker.invoke(invocation("http.request", {"url": peer.url(f"/status/{code}")}))


async def test_connection_refused_is_retryable(invoker: InProcessInvoker) -> None:
    url = f"http://127.0.0.1:{free_port()}/healthz"
    with pytest.raises(RetryableError, match=re.escape("GET 127.0.0.1")):
        await invoker.invoke(invocation("http.request", {"url": url}))


async def test_invalid_params_are_permanent(invoker: InProcessInvoker) -> None:
    with pytest.raises(PermanentError, match="url") as info:
        await invoker.invoke(invocation("http.request", {"url": "not a url"}))
    assert "not a url" not in str(info.value)
    with pytest.raises(PermanentError, match="method"):
        await invoker.invoke(
            invocation("http.request", {"url": "http://127.0.0.1/", "method": "BREW"})
        )


async def test_secret_headers_reach_the_server_but_not_the_outputs(
    peer: Peer, invoker: InProcessInvoker
) -> None:
    token = f"Bearer tok-{uuid.uuid4().hex}"
    out = await invoker.invoke(
        invocation(
            "http.request",
            {"url": peer.url("/status/204"), "secret_headers": {"Authorization": token}},
        )
    )
    assert peer.requests[0]["headers"]["Authorization"] == token
    assert out["status"] == 204
    assert token not in json.dumps(out)


@pytest.mark.parametrize("suffix", ["", '-"quoted"', "-back\\slash"])
async def test_secret_headers_echoed_by_the_peer_are_masked(
    peer: Peer, invoker: InProcessInvoker, suffix: str
) -> None:
    # Error pages and echo endpoints repeat what they were sent: the outputs (kept in the
    # journal, shown by the API) must still not carry the credential, even JSON-escaped.
    token = f"tok-{uuid.uuid4().hex}{suffix}"
    out = await invoker.invoke(
        invocation(
            "http.request",
            {"url": peer.url("/echo"), "secret_headers": {"X-Api-Key": token}},
        )
    )
    assert peer.requests[0]["headers"]["X-Api-Key"] == token
    assert token not in out["body"] and token not in json.dumps(out)
    assert out["json"]["headers"]["X-Api-Key"] == MASK


# -- sleep ------------------------------------------------------------------------------------


async def test_sleep_returns_what_it_slept(invoker: InProcessInvoker) -> None:
    assert await invoker.invoke(invocation("sleep", {"seconds": 0.01})) == {"slept": 0.01}


async def test_sleep_fail_is_permanent(invoker: InProcessInvoker) -> None:
    with pytest.raises(PermanentError, match="failing on request"):
        await invoker.invoke(invocation("sleep", {"fail": True}))
    with pytest.raises(PermanentError, match=r"^db refused$"):
        await invoker.invoke(invocation("sleep", {"fail": True, "message": "db refused"}))


# -- notify.log -------------------------------------------------------------------------------


async def test_notify_log_writes_a_record_and_returns_the_message(
    invoker: InProcessInvoker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="snaphook.functions")
    out = await invoker.invoke(
        invocation("notify.log", {"message": "backup b1 done", "level": "warning"})
    )
    assert out == {"message": "backup b1 done"}
    (record,) = [r for r in caplog.records if r.getMessage() == "backup b1 done"]
    assert record.levelno == logging.WARNING
    assert record.name == "snaphook.functions"
    fields = record.__dict__
    assert fields["run_id"] == "run-42" and fields["step"] == "call"
    assert fields["function"] == "notify.log" and fields["notify"] is True


async def test_notify_log_rejects_empty_message(invoker: InProcessInvoker) -> None:
    with pytest.raises(PermanentError, match="message"):
        await invoker.invoke(invocation("notify.log", {"message": ""}))
