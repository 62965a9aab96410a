"""``sleep``: wait a while. For demos and tests of timeouts and concurrency."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, ConfigDict, Field

from functions.sdk import Context, PermanentError, function


class SleepParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(default=0.0, ge=0, le=86_400)
    fail: bool = False  # raise a permanent error after sleeping: a failing step on demand
    message: str = ""


class SleepResult(BaseModel):
    slept: float


@function("sleep")
async def sleep(ctx: Context, p: SleepParams) -> SleepResult:
    """Sleep ``seconds``; with ``fail: true`` then fail, to demonstrate a denied backup."""
    await asyncio.sleep(p.seconds)
    if p.fail:
        raise PermanentError(p.message or "failing on request (fail: true)")
    return SleepResult(slept=p.seconds)
