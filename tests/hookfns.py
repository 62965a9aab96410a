"""Hook functions used by the tests, with observable effects.

Registered into a registry given by the caller (in-process tests get a fresh one), or into
the default registry when a ``snaphook serve`` subprocess imports this module through
``SNAPHOOK_FUNCTION_MODULES=tests.hookfns``; effects then go to the file named by
``SNAPHOOK_TEST_EFFECTS``, one line per effect, so a test can count them after a kill -9.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict

from functions.sdk import (
    Context,
    FunctionRegistry,
    PermanentError,
    RetryableError,
    default_registry,
    function,
)


class Empty(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EffectParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seconds: float = 0.0
    label: str = ""


class FlakyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    failures: int = 1  # fail this many attempts, then succeed
    delay: float | None = None  # RetryableError delay hint


class FreezeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    db: str
    fail: bool = False


class ThawParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    db: str = ""
    lease: str = ""


class FreezeResult(BaseModel):
    db: str
    frozen: bool


class EffectResult(BaseModel):
    effect: int


@dataclass
class Recorder:
    """What the test functions did, as a test would check it."""

    effects: Counter[str] = field(default_factory=Counter)
    calls: list[tuple[str, str, int]] = field(default_factory=list)  # (function, step, attempt)
    frozen: dict[str, bool] = field(default_factory=dict)
    thawed_by: list[tuple[str, str]] = field(default_factory=list)  # (db, lease)
    started: asyncio.Event | None = None

    def record(self, ctx: Context, function: str) -> None:
        self.calls.append((function, ctx.step, ctx.attempt))
        key = f"{ctx.run_id}/{ctx.step}"
        self.effects[key] += 1
        path = os.environ.get("SNAPHOOK_TEST_EFFECTS")
        if path:
            with open(path, "a", encoding="utf-8") as out:
                out.write(f"{key}\n")
        counter = os.environ.get("SNAPHOOK_TEST_EFFECTS_REDIS")
        if counter:
            # Several replicas (processes) count into one Redis hash, per attempt.
            _redis_count(counter, f"{key}/{ctx.attempt}")


def _redis_count(target: str, field: str) -> None:
    """HINCRBY on ``redis://host:port/db#hash``; synchronous: one local round trip."""
    import redis

    url, _, name = target.partition("#")
    with redis.Redis.from_url(url) as client:
        client.hincrby(name, field, 1)


def install(registry: FunctionRegistry, recorder: Recorder) -> FunctionRegistry:
    @function("test.effect", registry=registry)
    async def effect(ctx: Context, p: EffectParams) -> EffectResult:
        """One observable effect per call, after an optional sleep."""
        await asyncio.sleep(p.seconds)
        recorder.record(ctx, "test.effect")
        return EffectResult(effect=recorder.effects[f"{ctx.run_id}/{ctx.step}"])

    @function("test.flaky", registry=registry)
    async def flaky(ctx: Context, p: FlakyParams) -> EffectResult:
        recorder.record(ctx, "test.flaky")
        if ctx.attempt <= p.failures:
            raise RetryableError(f"flaky attempt {ctx.attempt}", delay=p.delay)
        return EffectResult(effect=ctx.attempt)

    @function("test.fail", registry=registry)
    async def fail(ctx: Context, p: Empty) -> None:
        recorder.record(ctx, "test.fail")
        raise PermanentError("refused on purpose")

    @function("test.freeze", registry=registry)
    async def freeze(ctx: Context, p: FreezeParams) -> FreezeResult:
        recorder.record(ctx, "test.freeze")
        recorder.frozen[p.db] = True
        if p.fail:
            raise PermanentError("froze halfway, then failed")
        return FreezeResult(db=p.db, frozen=True)

    @function("test.thaw", registry=registry)
    async def thaw(ctx: Context, p: ThawParams) -> FreezeResult:
        recorder.record(ctx, "test.thaw")
        db = p.db or "db"
        recorder.frozen[db] = False
        recorder.thawed_by.append((db, p.lease or (ctx.lease_id or "")))
        return FreezeResult(db=db, frozen=False)

    return registry


def fresh(recorder: Recorder) -> FunctionRegistry:
    """A registry with the built-ins and the test functions."""
    from functions import http, notify, sleep  # noqa: F401  (registers the built-ins)

    return default_registry.merged(install(FunctionRegistry(), recorder))


# Imported by a subprocess through SNAPHOOK_FUNCTION_MODULES: register into the default.
if os.environ.get("SNAPHOOK_TEST_EFFECTS"):
    install(default_registry, Recorder())
