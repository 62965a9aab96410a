"""Reply events to the sink (K_SINK): binary mode, retried, trace context propagated."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from dispatcher.cehttp import parse_request
from tests.conftest import HarnessFactory, event_json

BP = """
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: bp}
spec:
  params:
    fail: {type: boolean, default: false}
  actions:
    backup.pre:
      - {name: step, function: sleep, with: {fail: "{{ params.fail }}"}}
"""


class Sink:
    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.received: list[Any] = []
        self.got = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        if self.failures > 0:
            self.failures -= 1
            return web.Response(status=503)
        parsed = parse_request(request.raw_headers, await request.read())
        self.received.append(parsed)
        self.got.set()
        return web.Response(status=202)


@pytest.fixture
async def sink() -> AsyncIterator[tuple[Sink, str]]:
    receiver = Sink(failures=2)
    app = web.Application()
    app.router.add_post("/", receiver.handle)
    server = TestServer(app)
    await server.start_server()
    yield receiver, str(server.make_url("/"))
    await server.close()


async def test_reply_event_sent_to_k_sink_after_retries(
    harness: HarnessFactory, sink: tuple[Sink, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver, url = sink
    monkeypatch.setenv("K_SINK", url)
    h = await harness({"bp": BP})
    event = event_json(data={"backup": {"name": "n", "id": "1"}, "params": {"fail": True}})
    event["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    resp = await h.send(event)
    run_id = (await resp.json())["run_id"]
    async with asyncio.timeout(15):
        await receiver.got.wait()
    [parsed] = receiver.received
    assert parsed.mode.value == "binary"
    [reply] = parsed.events
    assert reply.attributes["type"] == "io.snaphook.run.failed"
    assert reply.attributes["subject"] == "ns/Deployment/app"
    assert reply.attributes["traceparent"] == event["traceparent"]
    assert reply.data["run_id"] == run_id and reply.data["status"] == "failed"
    assert reply.data["steps"][0]["status"] == "failed"
    assert receiver.failures == 0  # the two 503s were retried
