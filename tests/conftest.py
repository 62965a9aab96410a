"""Shared fixtures: a real dispatcher app on 127.0.0.1 with test functions."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from dispatcher.app import create_app
from dispatcher.cehttp import encode_event
from dispatcher.invokers import Invocation, Invoker
from dispatcher.invokers.inprocess import InProcessInvoker
from dispatcher.redaction import redactor
from dispatcher.settings import Settings
from dispatcher.state import STATE, AppState
from functions.sdk import AwsConfig, EventInfo, FunctionRegistry, ObjectStore
from tests.hookfns import Recorder, fresh

# Looks for the test secrets in every log line, HTTP answer and journal row of the session;
# serves the fake Kubernetes API server (kube_cluster, kube_call).
pytest_plugins = ["tests.secret_hygiene", "tests.kube_fake"]

SUBJECT = "ns/Deployment/app"


def event_json(
    event_type: str = "backup.pre",
    subject: str = SUBJECT,
    data: dict[str, Any] | None = None,
    *,
    event_id: str | None = None,
    source: str = "test",
    backup_id: str = "b1",
    outcome: str | None = None,
) -> dict[str, Any]:
    if data is None:
        data = {"backup": {"name": "nightly", "id": backup_id}}
        if outcome is not None or event_type.endswith(".post"):
            data["outcome"] = outcome or "succeeded"
    return {
        "specversion": "1.0",
        "id": event_id or uuid.uuid4().hex,
        "source": source,
        "type": f"io.snaphook.{event_type}",
        "subject": subject,
        "datacontenttype": "application/json",
        "data": data,
    }


@dataclass
class Harness:
    client: TestClient[Any, Any]
    recorder: Recorder
    settings: Settings

    @property
    def state(self) -> AppState:
        state: AppState = self.client.app[STATE]
        return state

    @property
    def url(self) -> str:
        """The server's base URL (no trailing ``/``), for a client outside the test client."""
        return str(self.client.server.make_url("/")).rstrip("/")

    async def send(
        self,
        event: dict[str, Any],
        *,
        mode: str = "structured",
        wait: float | None = None,
        headers: dict[str, str] | None = None,
        path: str = "/v1/events",
    ) -> aiohttp.ClientResponse:
        hdrs, body = encode_event(event, mode)
        hdrs.update(headers or {})
        params = {"wait": str(wait)} if wait is not None else {}
        return await self.client.post(path, data=body, headers=hdrs, params=params)

    async def emit(self, event_type: str = "backup.pre", **kw: Any) -> dict[str, Any]:
        wait = kw.pop("wait", None)
        resp = await self.send(event_json(event_type, **kw), wait=wait)
        assert resp.status in (200, 202), await resp.text()
        body: dict[str, Any] = await resp.json()
        return body

    async def final(self, run_id: str, timeout: float = 10.0) -> dict[str, Any]:
        run = await self.state.runner.wait_final(run_id, timeout)
        assert run is not None and run.status.final, f"run {run_id} not final: {run}"
        resp = await self.client.get(f"/v1/runs/{run_id}")
        body: dict[str, Any] = await resp.json()
        return body


HarnessFactory = Callable[..., Awaitable[Harness]]


@pytest.fixture(autouse=True)
def _isolated_redactor() -> Iterator[None]:
    """The redactor is process-wide: a secret one test hands out (a username "backup") must
    not mask ordinary text in the next test on the same worker."""
    before = redactor.known()
    yield
    redactor.reset(before)


def write_blueprints(directory: Path, blueprints: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in blueprints.items():
        (directory / f"{name}.yaml").write_text(text, encoding="utf-8")


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[HarnessFactory]:
    made: list[Harness] = []

    async def make(
        blueprints: dict[str, str],
        *,
        bind: str | None = None,
        bindings: list[dict[str, Any]] | None = None,
        **overrides: Any,
    ) -> Harness:
        hooks = tmp_path / f"hooks{len(made)}"
        write_blueprints(hooks, blueprints)
        if bindings is None:
            bindings = [{"blueprint": bind or next(iter(blueprints)), "match": {"namespace": "ns"}}]
        settings = Settings.load(
            None,
            state_dir=overrides.pop("state_dir", tmp_path / "state"),
            hooks=hooks,
            bindings=bindings,
            lease_reap_interval=overrides.pop("lease_reap_interval", 0.05),
            **overrides,
        )
        recorder = Recorder()
        app = create_app(settings, registry=fresh(recorder))
        client: TestClient[Any, Any] = TestClient(TestServer(app))
        await client.start_server()
        h = Harness(client, recorder, settings)
        made.append(h)
        return h

    yield make
    for h in made:
        await h.client.close()


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 10.0, *, what: str | None = None
) -> None:
    """Poll until ``check()`` holds, for state a test cannot wait on otherwise (another
    process, a server without events). ``what`` names the awaited state in the failure."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, f"{what or check} did not hold within {timeout:g} s"
        await asyncio.sleep(0.02)


# --- function hosts (``snaphook function serve``) in-process --------------------------------


@dataclass
class FunctionHostHandle:
    client: TestClient[Any, Any]
    recorder: Recorder  # what the host's test functions did

    @property
    def url(self) -> str:
        return str(self.client.make_url("/"))


FunctionHostFactory = Callable[..., Awaitable[FunctionHostHandle]]


@pytest.fixture
async def function_host() -> AsyncIterator[FunctionHostFactory]:
    """Function hosts on 127.0.0.1 serving ``registry`` (default: built-ins + test
    functions recording into their own Recorder); ``invoker`` replaces the in-process one;
    other keywords are settings."""
    from dispatcher.function_host import create_function_host

    made: list[TestClient[Any, Any]] = []

    async def make(
        registry: FunctionRegistry | None = None,
        recorder: Recorder | None = None,
        *,
        invoker: Invoker | None = None,
        **settings: Any,
    ) -> FunctionHostHandle:
        recorder = recorder or Recorder()
        served = registry if registry is not None else fresh(recorder)
        app = create_function_host(Settings.load(None, **settings), served, invoker=invoker)
        client: TestClient[Any, Any] = TestClient(TestServer(app))
        await client.start_server()
        made.append(client)
        return FunctionHostHandle(client, recorder)

    yield make
    for client in made:
        await client.close()


# --- AWS: moto in server mode over real HTTP ---------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    """One moto server per test worker; tests isolate themselves by bucket name."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def object_store(moto_url: str) -> ObjectStore:
    return ObjectStore(endpoint_url=moto_url, region="us-east-1")


@pytest.fixture
async def bucket(object_store: ObjectStore) -> AsyncIterator[str]:
    """A fresh bucket, emptied and deleted afterwards."""
    from functions.storage import s3_client

    name = f"test-{uuid.uuid4().hex[:12]}"
    async with s3_client(object_store) as s3:
        await s3.create_bucket(Bucket=name)
    yield name
    async with s3_client(object_store) as s3:
        listed = await s3.list_objects_v2(Bucket=name)
        for item in listed.get("Contents", []):
            await s3.delete_object(Bucket=name, Key=item["Key"])
        await s3.delete_bucket(Bucket=name)


# --- NATS JetStream: a real server (CI starts one) ---------------------------------------


@pytest.fixture(scope="session")
def nats_url() -> str:
    """The NATS server with JetStream (``SNAPHOOK_TEST_NATS_URL``); unreachable = fail loudly."""
    import json
    import socket

    url = os.environ.get("SNAPHOOK_TEST_NATS_URL", "nats://127.0.0.1:4222")
    host, _, port = url.rpartition("://")[2].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            info = sock.makefile("rb").readline()  # the server greets with INFO {...}
    except OSError as exc:
        pytest.fail(
            f"NATS is not reachable at {url} ({exc}): start `nats-server -js`", pytrace=False
        )
    if not info.startswith(b"INFO ") or not json.loads(info[5:]).get("jetstream"):
        pytest.fail(f"the NATS server at {url} has no JetStream: start it with -js", pytrace=False)
    return url


@pytest.fixture
async def nats_prefix(nats_url: str) -> AsyncIterator[str]:
    """A unique name prefix; afterwards every JetStream stream (and so every key-value
    bucket) whose name contains it is deleted."""
    import json

    import nats

    prefix = f"t{uuid.uuid4().hex[:12]}"
    yield prefix
    nc = await nats.connect(nats_url)
    try:
        names: list[str] = []
        while True:  # the names API pages (1024 a page)
            query = json.dumps({"offset": len(names)}).encode()
            page = json.loads((await nc.request("$JS.API.STREAM.NAMES", query, timeout=5)).data)
            names += page.get("streams") or []
            if not page.get("streams") or len(names) >= page["total"]:
                break
        js = nc.jetstream()
        for name in names:
            if prefix in name:
                await js.delete_stream(name)
    finally:
        await nc.close()


@dataclass
class FunctionCaller:
    """Calls registered functions the way the dispatcher does (InProcessInvoker)."""

    invoker: InProcessInvoker

    async def __call__(
        self,
        function: str,
        params: dict[str, Any],
        *,
        lease_id: str | None = None,
        step: str = "step",
        timeout: float = 60.0,
    ) -> dict[str, Any]:
        invocation = Invocation(
            function=function,
            params=params,
            event=EventInfo(
                id="e1",
                source="test",
                type="io.snaphook.backup.pre",
                subject="ns/Deployment/app",
                data={},
            ),
            run_id=f"run-{uuid.uuid4().hex[:8]}",
            step=step,
            attempt=1,
            timeout=timeout,
            lease_id=lease_id,
        )
        return await self.invoker.invoke(invocation)


@pytest.fixture
async def call_function(object_store: ObjectStore) -> AsyncIterator[FunctionCaller]:
    """Every installed function family, called in-process against moto's S3."""
    from dispatcher.app import load_functions
    from dispatcher.secrets import EnvSecretResolver

    registry = load_functions([])
    async with aiohttp.ClientSession() as http:
        aws = AwsConfig(endpoint_url=object_store.endpoint_url, region="us-east-1")
        invoker = InProcessInvoker(registry, http, EnvSecretResolver(), object_store, aws)
        yield FunctionCaller(invoker)
