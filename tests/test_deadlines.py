"""Deadlines: many calls' timeouts on one loop timer, with asyncio.timeout's semantics."""

from __future__ import annotations

import asyncio

import pytest

from dispatcher.deadlines import Deadlines


async def _sleep_within(deadlines: Deadlines, delay: float, finished: list[str], name: str) -> str:
    try:
        async with deadlines.within(delay):
            await asyncio.sleep(30)
    except TimeoutError:
        finished.append(name)
        raise
    return name


async def test_a_call_past_its_deadline_gets_timeout_error() -> None:
    deadlines = Deadlines()
    with pytest.raises(TimeoutError):
        async with deadlines.within(0.05):
            await asyncio.sleep(30)
    assert len(deadlines) == 0


async def test_a_call_done_in_time_returns_and_is_forgotten() -> None:
    deadlines = Deadlines()
    async with deadlines.within(30):
        await asyncio.sleep(0)
        assert len(deadlines) == 1
    assert len(deadlines) == 0


async def test_each_call_expires_at_its_own_deadline_whatever_the_order() -> None:
    deadlines = Deadlines()
    finished: list[str] = []
    release = asyncio.Event()

    async def long_call() -> str:
        async with deadlines.within(30):
            await release.wait()
        return "long"

    long = asyncio.create_task(long_call())
    await asyncio.sleep(0)  # the long deadline is armed first; the short ones come after
    calls = [
        asyncio.create_task(_sleep_within(deadlines, delay, finished, name))
        for name, delay in [("third", 0.3), ("first", 0.05), ("second", 0.15)]
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(result, TimeoutError) for result in results)
    assert finished == ["first", "second", "third"]
    assert not long.done()  # a later deadline is not cut short by earlier ones
    release.set()
    assert await long == "long"
    assert len(deadlines) == 0


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    deadlines = Deadlines()
    started = asyncio.Event()

    async def call() -> None:
        async with deadlines.within(30):
            started.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(call())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(deadlines) == 0
