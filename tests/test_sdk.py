"""The function SDK: registration checks at decoration time, Context, in-process invocation."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from dispatcher.invokers import Invocation
from dispatcher.invokers.inprocess import InProcessInvoker
from dispatcher.redaction import MASK
from dispatcher.secrets import EnvSecretResolver
from functions.sdk import (
    Context,
    EventInfo,
    FunctionError,
    FunctionRegistry,
    PermanentError,
    RetryableError,
    function,
)


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dsn: SecretStr
    port: int = Field(default=5432, ge=1, le=65535)
    database: str = "app"


class Result(BaseModel):
    database: str
    token: SecretStr
    note: str = ""


class Empty(BaseModel):
    pass


EVENT = EventInfo(
    id="e1",
    source="test",
    type="io.snaphook.backup.pre",
    subject="ns/Deployment/app",
    data={"backup": {"name": "b", "id": "b1"}},
)


# -- registration -------------------------------------------------------------------------


def test_registers_spec_with_models_and_doc() -> None:
    registry = FunctionRegistry()

    @function("db.freeze", registry=registry)
    async def freeze(ctx: Context, p: Params) -> Result:
        """Freeze the database."""
        return Result(database=p.database, token=SecretStr("t"))

    @function("db.noop", registry=registry)
    async def noop(ctx: Context, p: Empty) -> None:
        return None

    spec = registry.get("db.freeze")
    assert spec is not None
    assert spec.fn is freeze
    assert spec.params_model is Params and spec.result_model is Result
    assert spec.description == "Freeze the database."
    noop_spec = registry.get("db.noop")
    assert noop_spec is not None and noop_spec.result_model is None
    assert registry.names() == ["db.freeze", "db.noop"]
    assert "db.freeze" in registry and "db.thaw" not in registry
    assert registry.get("db.thaw") is None


def test_rejects_plain_def() -> None:
    registry = FunctionRegistry()
    with pytest.raises(TypeError, match="'async def'"):

        @function("db.sync", registry=registry)  # type: ignore[arg-type]
        def sync(ctx: Context, p: Params) -> None:
            return None

    assert "db.sync" not in registry


def test_rejects_duplicate_name() -> None:
    registry = FunctionRegistry()

    @function("db.freeze", registry=registry)
    async def first(ctx: Context, p: Empty) -> None:
        return None

    with pytest.raises(ValueError, match=re.escape("'db.freeze' is already registered")):

        @function("db.freeze", registry=registry)
        async def second(ctx: Context, p: Empty) -> None:
            return None

    spec = registry.get("db.freeze")
    assert spec is not None and spec.fn is first


async def _one(ctx: Context) -> None:
    return None


async def _three(ctx: Context, p: Empty, extra: int) -> None:
    return None


async def _dict_params(ctx: Context, p: dict[str, Any]) -> None:
    return None


async def _model_instance_hint(ctx: Context, p: int) -> None:
    return None


async def _unannotated(ctx, p):  # type: ignore[no-untyped-def]
    return None


async def _union_result(ctx: Context, p: Empty) -> Result | Empty:
    return Empty()


async def _dict_result(ctx: Context, p: Empty) -> dict[str, Any]:
    return {}


async def _str_result(ctx: Context, p: Empty) -> str:
    return ""


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (_one, "must take \\(ctx, params\\), got 1 arguments"),
        (_three, "must take \\(ctx, params\\), got 3 arguments"),
        (_dict_params, "parameter 'p' must be a pydantic model"),
        (_model_instance_hint, "parameter 'p' must be a pydantic model"),
        (_unannotated, "parameter 'p' must be a pydantic model"),
        (_dict_result, "must return a pydantic model or None"),
        (_union_result, "must return a pydantic model or None"),
        (_str_result, "must return a pydantic model or None"),
    ],
)
def test_rejects_bad_signatures(fn: Any, message: str) -> None:
    registry = FunctionRegistry()
    with pytest.raises(TypeError, match=message) as info:
        function("bad.fn", registry=registry)(fn)
    assert "'bad.fn'" in str(info.value)  # the error names the function being registered
    assert "bad.fn" not in registry  # a rejected function does not take the name


def test_optional_model_return_is_accepted() -> None:
    registry = FunctionRegistry()

    @function("db.maybe", registry=registry)
    async def maybe(ctx: Context, p: Empty) -> Result | None:
        return None

    spec = registry.get("db.maybe")
    assert spec is not None and spec.result_model is Result


def test_merged_combines_and_refuses_conflicts() -> None:
    a, b, c = FunctionRegistry(), FunctionRegistry(), FunctionRegistry()

    @function("x.one", registry=a)
    async def one(ctx: Context, p: Empty) -> None:
        return None

    @function("x.two", registry=b)
    async def two(ctx: Context, p: Empty) -> None:
        return None

    @function("x.one", registry=c)
    async def other_one(ctx: Context, p: Empty) -> None:
        return None

    merged = a.merged(b)
    assert merged.names() == ["x.one", "x.two"]
    # The inputs are left alone.
    assert a.names() == ["x.one"] and b.names() == ["x.two"]
    with pytest.raises(ValueError, match=re.escape("'x.one' is already registered")):
        a.merged(c)


def test_error_hierarchy() -> None:
    assert issubclass(RetryableError, FunctionError)
    assert issubclass(PermanentError, FunctionError)
    assert RetryableError("busy", delay=2.5).delay == 2.5
    assert RetryableError("busy").delay is None


# -- Context --------------------------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    session = aiohttp.ClientSession()
    yield session
    await session.close()


def make_context(
    http: aiohttp.ClientSession, *, deadline: float, lease_id: str | None = None, **kw: Any
) -> Context:
    import logging

    return Context(
        event=EVENT,
        run_id="run-1",
        step="freeze",
        attempt=1,
        deadline=deadline,
        http=http,
        secrets=EnvSecretResolver({}),
        logger=logging.LoggerAdapter(logging.getLogger("test"), {}),
        lease_id=lease_id,
        **kw,
    )


async def test_context_remaining(http: aiohttp.ClientSession) -> None:
    ctx = make_context(http, deadline=time.monotonic() + 30)
    assert 29 < ctx.remaining() <= 30
    assert make_context(http, deadline=time.monotonic() - 5).remaining() == 0.0


async def test_context_progress(http: aiohttp.ClientSession) -> None:
    seen: list[tuple[int, int | None]] = []
    ctx = make_context(
        http, deadline=time.monotonic() + 1, on_progress=lambda d, t: seen.append((d, t))
    )
    ctx.progress(10, 100)
    ctx.progress(20)
    assert seen == [(10, 100), (20, None)]
    # Without a listener, progress is a no-op rather than an error.
    make_context(http, deadline=time.monotonic() + 1).progress(1, 2)


async def test_context_hold_keeps_resource_for_the_lease(http: aiohttp.ClientSession) -> None:
    lease = f"lease-{uuid.uuid4().hex}"
    ctx = make_context(http, deadline=time.monotonic() + 1, lease_id=lease)
    connection = object()
    ctx.hold(connection)
    assert ctx.release_held(lease) is connection
    assert ctx.release_held(lease) is None  # released once


async def test_context_hold_without_lease_is_permanent_error(http: aiohttp.ClientSession) -> None:
    ctx = make_context(http, deadline=time.monotonic() + 1)
    with pytest.raises(
        PermanentError, match="step 'freeze' holds a resource but declares no lease"
    ):
        ctx.hold(object())


# -- in-process invocation ------------------------------------------------------------------


def invocation(function_name: str, params: dict[str, Any], **kw: Any) -> Invocation:
    return Invocation(
        function=function_name,
        params=params,
        event=EVENT,
        run_id="run-1",
        step="freeze",
        attempt=kw.pop("attempt", 1),
        timeout=kw.pop("timeout", 5.0),
        **kw,
    )


@pytest.fixture
def registry() -> FunctionRegistry:
    registry = FunctionRegistry()

    @function("db.freeze", registry=registry)
    async def freeze(ctx: Context, p: Params) -> Result:
        return Result(
            database=p.database,
            token=SecretStr(f"token-{p.dsn.get_secret_value()}"),
            note=f"{ctx.step}/{ctx.attempt}/{ctx.run_id}/{ctx.event.subject}/{ctx.lease_id}",
        )

    @function("db.noop", registry=registry)
    async def noop(ctx: Context, p: Empty) -> None:
        assert 0 < ctx.remaining() <= 2.0
        return None

    return registry


async def test_invoke_unknown_function(
    registry: FunctionRegistry, http: aiohttp.ClientSession
) -> None:
    invoker = InProcessInvoker(registry, http, EnvSecretResolver({}))
    with pytest.raises(PermanentError, match=re.escape("unknown function 'db.nope'")):
        await invoker.invoke(invocation("db.nope", {}))


async def test_invalid_params_name_the_fields_never_the_values(
    registry: FunctionRegistry, http: aiohttp.ClientSession
) -> None:
    secret = f"hunter2-{uuid.uuid4().hex}"
    invoker = InProcessInvoker(registry, http, EnvSecretResolver({}))
    with pytest.raises(PermanentError) as info:
        await invoker.invoke(
            invocation(
                "db.freeze",
                {"dsn": [secret], "port": f"{secret}-port", "colour": f"{secret}-extra"},
            )
        )
    message = str(info.value)
    assert message.startswith("invalid params for db.freeze: ")
    assert "dsn:" in message and "port:" in message and "colour:" in message
    assert secret not in message


async def test_missing_param_is_named(
    registry: FunctionRegistry, http: aiohttp.ClientSession
) -> None:
    invoker = InProcessInvoker(registry, http, EnvSecretResolver({}))
    with pytest.raises(PermanentError, match="dsn: Field required"):
        await invoker.invoke(invocation("db.freeze", {"port": 1}))


async def test_outputs_mask_secret_fields(
    registry: FunctionRegistry, http: aiohttp.ClientSession
) -> None:
    secret = f"pw-{uuid.uuid4().hex}"
    invoker = InProcessInvoker(registry, http, EnvSecretResolver({}))
    outputs = await invoker.invoke(
        invocation(
            "db.freeze", {"dsn": secret, "database": "orders"}, lease_id="lease-9", attempt=2
        )
    )
    assert outputs == {
        "database": "orders",
        "token": MASK,
        "note": "freeze/2/run-1/ns/Deployment/app/lease-9",
    }
    assert secret not in repr(outputs)


async def test_none_result_is_empty_outputs_and_deadline_from_timeout(
    registry: FunctionRegistry, http: aiohttp.ClientSession
) -> None:
    invoker = InProcessInvoker(registry, http, EnvSecretResolver({}))
    assert await invoker.invoke(invocation("db.noop", {}, timeout=2.0)) == {}


async def test_secret_params_echoed_into_plain_outputs_are_masked(
    http: aiohttp.ClientSession,
) -> None:
    registry = FunctionRegistry()

    @function("db.echo", registry=registry)
    async def echo(ctx: Context, p: Params) -> Result:
        # A careless function copying the DSN into a plain string output.
        return Result(database=p.dsn.get_secret_value(), token=SecretStr("x"), note="")

    secret = f"pw-{uuid.uuid4().hex}"
    invoker = InProcessInvoker(registry, http, EnvSecretResolver({}))
    outputs = await invoker.invoke(invocation("db.echo", {"dsn": secret}))
    assert outputs["database"] == MASK and secret not in repr(outputs)


async def test_function_log_records_keep_their_extra_fields(
    registry: FunctionRegistry, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    registry = FunctionRegistry()

    @function("db.talk", registry=registry)
    async def talk(ctx: Context, p: Empty) -> None:
        ctx.logger.info("hello", extra={"rows": 3})

    invoker = InProcessInvoker(registry, http, EnvSecretResolver({}))
    with caplog.at_level("INFO", logger="snaphook.functions"):
        await invoker.invoke(invocation("db.talk", {}))
    [record] = [r for r in caplog.records if r.getMessage() == "hello"]
    assert (record.__dict__["rows"], record.__dict__["run_id"]) == (3, "run-1")
