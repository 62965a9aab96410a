"""Slow and oversized clients are cut off without holding up anyone else.

Raw sockets, because an HTTP client library would not send a request this badly:

* a body trickled byte by byte gets ``408`` after ``body_timeout`` and the connection closes;
* headers trickled line by line (slowloris) are cut off after ``idle_timeout``;
* an oversized header gets aiohttp's ``400`` and the server stays healthy;
* meanwhile, well-behaved clients are answered at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from tests.conftest import Harness, HarnessFactory, event_json

BODY_TIMEOUT = 1.0
IDLE_TIMEOUT = 2.0
SLACK = 3.0  # scheduling noise on a busy test machine (xdist)
NORMAL_CLIENTS = 20

BLUEPRINTS = {
    "quick": """
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: quick}
spec:
  actions:
    backup.pre:
      - {name: note, function: test.effect}
""",
}


@pytest.fixture
async def h(harness: HarnessFactory) -> Harness:
    return await harness(
        BLUEPRINTS,
        body_timeout=BODY_TIMEOUT,
        idle_timeout=IDLE_TIMEOUT,
        max_header_size=2048,
        max_headers=32,
    )


@dataclass
class Raw:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, data: bytes) -> bool:
        """Whether the server still took it (False once it has closed the connection)."""
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, OSError):
            return False
        return True

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in filter(None, lines):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return int(status_line.split()[1]), headers, body

    async def closed(self) -> bool:
        """Whether the server closed the connection (EOF or reset)."""
        try:
            return await self.reader.read(65536) == b""
        except (ConnectionError, OSError):
            return True


@contextlib.asynccontextmanager
async def raw(h: Harness) -> AsyncIterator[Raw]:
    reader, writer = await asyncio.open_connection("127.0.0.1", h.client.port)
    try:
        yield Raw(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


def request_head(body_length: int, *extra: str) -> bytes:
    lines = [
        "POST /v1/events HTTP/1.1",
        "Host: snaphook",
        "Content-Type: application/cloudevents+json",
        f"Content-Length: {body_length}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def normal_clients(h: Harness) -> list[tuple[int, float]]:
    """Status and latency of NORMAL_CLIENTS well-behaved events sent at once."""

    async def one() -> tuple[int, float]:
        started = time.monotonic()
        resp = await h.send(event_json())
        async with resp:
            return resp.status, time.monotonic() - started

    return list(await asyncio.gather(*(one() for _ in range(NORMAL_CLIENTS))))


async def trickle(conn: Raw, data: bytes, interval: float) -> None:
    for i in range(len(data)):
        if not await conn.send(data[i : i + 1]):
            return
        await asyncio.sleep(interval)


async def test_trickled_body_gets_408_while_others_are_served(h: Harness) -> None:
    body = json.dumps(event_json()).encode()
    async with raw(h) as slow:
        assert await slow.send(request_head(len(body)))
        started = time.monotonic()
        dripping = asyncio.create_task(trickle(slow, body, interval=1.0))  # 1 byte/s
        try:
            await asyncio.sleep(0.2)  # the handler is waiting for the body now
            served = await normal_clients(h)
            assert [status for status, _ in served] == [202] * NORMAL_CLIENTS
            # Answered at once, not after the slow client's timeout.
            assert max(latency for _, latency in served) < BODY_TIMEOUT + SLACK
            status, headers, answer = await asyncio.wait_for(slow.response(), 5 + SLACK)
            waited = time.monotonic() - started
            assert status == 408 and headers["content-type"].startswith("application/problem")
            assert headers["connection"] == "close"
            assert "body_timeout" in json.loads(answer)["detail"]
            assert BODY_TIMEOUT * 0.9 <= waited < BODY_TIMEOUT + SLACK
            # Still dripping: the unread rest is drained for body_timeout at most, then closed.
            assert not dripping.done()
            assert await asyncio.wait_for(slow.closed(), 2 * BODY_TIMEOUT + SLACK)
        finally:
            dripping.cancel()
    assert h.recorder.calls.count(("test.effect", "note", 1)) == NORMAL_CLIENTS
    assert len(await h.state.journal.list_runs(limit=100)) == NORMAL_CLIENTS
    assert h.state.metrics.events_rejected.labels(status="408")._value.get() == 1


async def test_a_slow_but_steady_body_within_the_timeout_is_accepted(h: Harness) -> None:
    body = json.dumps(event_json()).encode()
    third = len(body) // 3
    async with raw(h) as conn:
        assert await conn.send(request_head(len(body)))
        for chunk in (body[:third], body[third : 2 * third], body[2 * third :]):
            await asyncio.sleep(BODY_TIMEOUT / 5)  # the timeout is on the whole body
            assert await conn.send(chunk)
        status, _, answer = await asyncio.wait_for(conn.response(), 5)
    assert status == 202, answer


async def test_trickled_chunked_body_gets_408(h: Harness) -> None:
    async with raw(h) as conn:
        head = request_head(0).replace(b"Content-Length: 0", b"Transfer-Encoding: chunked")
        assert await conn.send(head)
        dripping = asyncio.create_task(trickle(conn, b"1\r\n{\r\n" * 20, interval=0.3))
        try:
            status, _, _ = await asyncio.wait_for(conn.response(), 5 + SLACK)
        finally:
            dripping.cancel()
    assert status == 408


async def test_trickled_headers_are_cut_off_while_others_are_served(h: Harness) -> None:
    async with raw(h) as slow:
        started = time.monotonic()
        head = request_head(2, *(f"X-Drip-{i}: {i}" for i in range(30)))
        dripping = asyncio.create_task(trickle(slow, head, interval=0.05))  # ~30 s in all
        try:
            served = await normal_clients(h)
            assert [status for status, _ in served] == [202] * NORMAL_CLIENTS
            assert await asyncio.wait_for(slow.closed(), IDLE_TIMEOUT + SLACK)
            assert time.monotonic() - started >= IDLE_TIMEOUT * 0.9
        finally:
            dripping.cancel()


async def test_an_idle_connection_is_closed_after_idle_timeout(h: Harness) -> None:
    async with raw(h) as idle:
        started = time.monotonic()
        assert await asyncio.wait_for(idle.closed(), IDLE_TIMEOUT + SLACK)
        assert time.monotonic() - started >= IDLE_TIMEOUT * 0.9


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(("X-Big: " + "a" * 4096,), id="long-value"),
        pytest.param(("X-" + "n" * 4096 + ": v",), id="long-name"),
        pytest.param(tuple(f"X-Many-{i}: {i}" for i in range(64)), id="too-many"),
    ],
)
async def test_oversized_headers_are_400_and_the_server_stays_healthy(
    h: Harness, extra: tuple[str, ...], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="snaphook.http")
    async with raw(h) as conn:
        assert await conn.send(request_head(2, *extra) + b"{}")
        status, _, _ = await asyncio.wait_for(conn.response(), 5)
        assert status == 400
        assert await asyncio.wait_for(conn.closed(), 5)
    # One warning line, no traceback, none of the client's bytes.
    [record] = [r for r in caplog.records if r.name == "snaphook.http"]
    assert record.levelno == logging.WARNING and record.exc_info is None
    message = record.getMessage()
    assert "from 127.0.0.1: " in message and "(400)" in message
    assert "aaaa" not in message and "nnnn" not in message
    async with h.client.get("/readyz") as resp:
        assert resp.status == 200
    assert [status for status, _ in await normal_clients(h)] == [202] * NORMAL_CLIENTS


async def test_an_oversized_request_line_is_rejected(h: Harness) -> None:
    async with raw(h) as conn:
        line = f"POST /v1/events?wait={'1' * 4096} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        assert await conn.send(line)
        status, _, _ = await asyncio.wait_for(conn.response(), 5)
    assert 400 <= status < 500
    assert (await h.send(event_json())).status == 202
