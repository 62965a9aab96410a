"""The outbound HTTP policy: SSRF guard on resolved addresses, timeouts, response size.

Nothing here connects to a refused address: the guard stops before ``connect()``, which is
why metadata and private addresses can be used in a test that runs offline.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer

import functions.http  # noqa: F401  (registers http.request)
from dispatcher.invokers import Invocation
from dispatcher.invokers.inprocess import InProcessInvoker
from dispatcher.secrets import EnvSecretResolver
from dispatcher.settings import Settings
from functions.httpguard import (
    BlockedAddress,
    HttpPolicy,
    ResponseTooLarge,
    blocked_cause,
    check_address,
    guarded_session,
    http_failure,
    policy_of,
    read_limited,
)
from functions.sdk import EventInfo, PermanentError, RetryableError, default_registry
from tests.conftest import HarnessFactory

METADATA = "refusing to connect to 169.254.169.254 (link-local / cloud metadata)"


class FixedResolver(AbstractResolver):
    """Answers from a table, like a DNS server the attacker controls would."""

    def __init__(self, table: Mapping[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        if host not in self.table:
            raise OSError(f"no such host {host}")
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in self.table[host]
        ]

    async def close(self) -> None:
        pass


# -- the address table ------------------------------------------------------------------------

ALWAYS_REFUSED = [
    ("169.254.169.254", "link-local / cloud metadata"),
    ("169.254.0.1", "link-local / cloud metadata"),
    ("fd00:ec2::254", "cloud metadata"),  # inside fc00::/7, refused even when private is ok
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("::ffff:169.254.169.254", "link-local / cloud metadata"),
    ("0.0.0.0", "unspecified address"),
    ("::", "unspecified address"),
]
PRIVATE = ["10.1.2.3", "172.16.0.1", "172.31.255.254", "192.168.1.1", "100.64.0.1", "fd12::1"]
PRIVATE += ["fc00::1", "::ffff:10.0.0.1"]
LOOPBACK = ["127.0.0.1", "127.8.9.1", "::1", "::ffff:127.0.0.1"]
PUBLIC = ["8.8.8.8", "172.32.0.1", "100.128.0.1", "192.169.0.1", "2001:4860:4860::8888"]

EVERYTHING_ALLOWED = HttpPolicy(allow_private=True, allow_loopback=True)


@pytest.mark.parametrize(("address", "label"), ALWAYS_REFUSED)
def test_link_local_and_metadata_are_always_refused(address: str, label: str) -> None:
    with pytest.raises(BlockedAddress) as info:
        check_address(address, address, EVERYTHING_ALLOWED)
    assert f"({label})" in str(info.value)
    assert isinstance(info.value, PermanentError)


@pytest.mark.parametrize("address", PRIVATE)
def test_private_ranges_need_allow_private(address: str) -> None:
    with pytest.raises(BlockedAddress, match="allow with the http_allow_private setting"):
        check_address(address, address, HttpPolicy())
    check_address(address, address, HttpPolicy(allow_private=True))


@pytest.mark.parametrize("address", LOOPBACK)
def test_loopback_is_allowed_unless_disabled(address: str) -> None:
    check_address(address, address, HttpPolicy())
    with pytest.raises(BlockedAddress, match="loopback"):
        check_address(address, address, HttpPolicy(allow_loopback=False))


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address: str) -> None:
    check_address(address, address, HttpPolicy(allow_loopback=False))


def test_refusal_names_the_host_and_the_address() -> None:
    with pytest.raises(BlockedAddress) as info:
        check_address("db.internal", "10.1.2.3", HttpPolicy())
    assert str(info.value) == (
        "refusing to connect to db.internal at 10.1.2.3 "
        "(private; allow with the http_allow_private setting)"
    )
    assert (info.value.host, info.value.address) == ("db.internal", "10.1.2.3")


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="timeout"):
        HttpPolicy(timeout=0)
    with pytest.raises(ValueError, match="max_response_bytes"):
        HttpPolicy(max_response_bytes=0)


# -- through a real session -------------------------------------------------------------------


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["to"])

    async def big(request: web.Request) -> web.StreamResponse:
        size = int(request.query["size"])
        if "stream" not in request.query:
            return web.Response(body=b"x" * size)
        resp = web.StreamResponse()  # chunked: no Content-Length to judge by
        await resp.prepare(request)
        for _ in range(size // 1000):
            await resp.write(b"y" * 1000)
        await resp.write_eof()
        return resp

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/hello", hello)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/big", big)
    app.router.add_get("/slow", slow)
    srv = TestServer(app, host="127.0.0.1")
    await srv.start_server()
    yield srv
    await srv.close()


async def refusal(session: aiohttp.ClientSession, url: str) -> BlockedAddress:
    """The guard's refusal behind the error a GET of ``url`` raises."""
    with pytest.raises(aiohttp.ClientConnectorError) as info:
        async with session.get(url):
            pass
    blocked = blocked_cause(info.value)
    assert blocked is not None, info.value
    assert str(blocked) in str(info.value)  # also visible to code that only prints aiohttp's
    return blocked


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/iam/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/",
        "https://169.254.169.254/",
    ],
)
async def test_session_refuses_metadata_literals(url: str) -> None:
    async with guarded_session(EVERYTHING_ALLOWED) as session:
        blocked = await refusal(session, url)
    assert "metadata" in str(blocked)


async def test_metadata_message_is_exact() -> None:
    async with guarded_session() as session:
        assert str(await refusal(session, "http://169.254.169.254/")) == METADATA


async def test_names_are_judged_by_what_they_resolve_to(server: TestServer) -> None:
    resolver = FixedResolver(
        {
            "db.internal.test": ["10.1.2.3"],
            "meta.test": ["169.254.169.254"],
            # A rebinding-style answer: one harmless address, one metadata address.
            "mixed.test": ["127.0.0.1", "169.254.169.254"],
            "app.test": ["127.0.0.1"],
        }
    )
    async with guarded_session(HttpPolicy(), resolver=resolver) as session:
        blocked = await refusal(session, "http://db.internal.test/")
        assert str(blocked).startswith("refusing to connect to db.internal.test at 10.1.2.3")
        assert "metadata" in str(await refusal(session, "http://meta.test/"))
        assert "169.254.169.254" in str(await refusal(session, "http://mixed.test/"))
        # The guard passes good answers on: the connection uses them.
        async with session.get(f"http://app.test:{server.port}/hello") as resp:
            assert await resp.text() == "hello"
    assert "app.test" in resolver.asked


async def test_localhost_refused_when_loopback_is_disabled(server: TestServer) -> None:
    async with guarded_session(HttpPolicy(allow_loopback=False)) as session:
        blocked = await refusal(session, f"http://localhost:{server.port}/hello")
        assert str(blocked).startswith("refusing to connect to localhost at ")
        await refusal(session, str(server.make_url("/hello")))


async def test_redirects_are_checked_again(server: TestServer) -> None:
    resolver = FixedResolver({"meta.test": ["169.254.169.254"]})
    async with guarded_session(resolver=resolver) as session:
        for target in ["http://169.254.169.254/latest/meta-data/", "http://meta.test/"]:
            url = server.make_url("/redirect").with_query(to=target)
            assert "cloud metadata" in str(await refusal(session, str(url)))


async def test_policy_timeout_is_the_session_default(server: TestServer) -> None:
    async with guarded_session(HttpPolicy(timeout=0.2)) as session:
        assert policy_of(session).timeout == 0.2
        with pytest.raises(TimeoutError) as info:
            async with session.get(server.make_url("/slow")):
                pass
    failure = http_failure("GET 127.0.0.1", info.value)
    assert isinstance(failure, RetryableError) and str(failure) == "GET 127.0.0.1: timed out"


@pytest.mark.parametrize("stream", [False, True])
async def test_response_size_limit(server: TestServer, stream: bool) -> None:
    query = {"size": "5000"} | ({"stream": "1"} if stream else {})
    async with guarded_session(HttpPolicy(max_response_bytes=4096)) as session:
        limit = policy_of(session).max_response_bytes
        async with session.get(server.make_url("/big").with_query(query)) as resp:
            with pytest.raises(ResponseTooLarge, match="response larger than 4096 bytes"):
                await read_limited(resp, limit)
        async with session.get(server.make_url("/big").with_query(size="4000")) as resp:
            assert len(await read_limited(resp, limit)) == 4000


async def test_plain_sessions_get_the_default_policy() -> None:
    async with aiohttp.ClientSession() as plain:
        assert policy_of(plain) == HttpPolicy()


def test_http_failure_classification() -> None:
    assert isinstance(http_failure("GET x", aiohttp.InvalidURL("http://u:pw@x/")), PermanentError)
    assert "pw" not in str(http_failure("GET x", aiohttp.InvalidURL("http://u:pw@x/")))
    assert isinstance(http_failure("GET x", aiohttp.ServerDisconnectedError()), RetryableError)
    too_large = http_failure("GET x", ResponseTooLarge(10))
    assert isinstance(too_large, PermanentError)
    assert str(too_large) == "GET x: response larger than 10 bytes"


# -- http.request and the dispatcher ----------------------------------------------------------


def invocation(url: str) -> Invocation:
    return Invocation(
        function="http.request",
        params={"url": url},
        event=EventInfo(
            id="e", source="t", type="io.snaphook.backup.pre", subject="a/b/c", data={}
        ),
        run_id="run-1",
        step="call",
        attempt=1,
        timeout=5.0,
    )


@pytest.fixture
async def guarded_invoker() -> AsyncIterator[InProcessInvoker]:
    session = guarded_session(HttpPolicy(allow_loopback=False))
    yield InProcessInvoker(default_registry, session, EnvSecretResolver({}))
    await session.close()


async def test_http_request_fails_permanently_with_the_guards_words(
    guarded_invoker: InProcessInvoker,
) -> None:
    with pytest.raises(PermanentError) as info:
        await guarded_invoker.invoke(invocation("http://169.254.169.254/latest/meta-data/"))
    assert str(info.value) == f"GET 169.254.169.254: {METADATA}"
    with pytest.raises(PermanentError, match="loopback"):
        await guarded_invoker.invoke(invocation("http://127.0.0.1:9/"))


def blueprint(url: str) -> str:
    return f"""
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {{name: bp}}
spec:
  actions:
    backup.pre:
      - {{name: call, function: http.request, with: {{url: "{url}"}}, retry: {{attempts: 3}}}}
"""


async def test_dispatcher_builds_ctx_http_from_the_settings(
    harness: HarnessFactory, server: TestServer
) -> None:
    url = str(server.make_url("/hello"))
    allowed = await harness({"bp": blueprint(url)})
    run = await allowed.final((await allowed.emit())["run_id"])
    assert run["status"] == "succeeded", run

    strict = await harness({"bp": blueprint(url)}, http_allow_loopback=False, http_timeout="5s")
    assert strict.settings.http_timeout == 5.0
    run = await strict.final((await strict.emit(event_id=uuid.uuid4().hex))["run_id"])
    (step,) = run["steps"]
    assert step["status"] == "failed" and step["attempts"] == 1  # permanent: not retried
    assert "refusing to connect to 127.0.0.1 (loopback" in step["error"]


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPHOOK_HTTP_ALLOW_PRIVATE", "true")
    monkeypatch.setenv("SNAPHOOK_HTTP_MAX_RESPONSE_BYTES", "2048")
    settings: Any = Settings.load(None)
    assert settings.http_allow_private is True and settings.http_allow_loopback is True
    assert settings.http_max_response_bytes == 2048 and settings.http_timeout == 30.0
