"""Deadlines for many concurrent calls on one event-loop timer.

``asyncio.timeout(delay)`` arms a timer when entered and cancels it on exit: a
``TimerHandle``, a heap push (ordered by a Python ``__lt__``) and a cancelled entry for
the loop to sweep later. A function host answers thousands of calls a second, most done
in microseconds, and that bookkeeping was a tenth of the work of each call. Here each
call enters an ``asyncio.Timeout`` with no deadline of its own and is listed with it; one
timer, armed for the earliest deadline listed, gives the calls that are due their
deadline through ``Timeout.reschedule``. From there asyncio does what it does for
``asyncio.timeout``: it cancels the call and turns the cancellation into
``TimeoutError`` — or leaves a cancellation from elsewhere alone.

    deadlines = Deadlines()
    async with deadlines.within(invocation.timeout):
        await run(invocation)
"""

from __future__ import annotations

import asyncio
from types import TracebackType

__all__ = ["Deadline", "Deadlines"]


class Deadlines:
    """The deadlines of calls in progress, in one event loop."""

    def __init__(self) -> None:
        self._due: dict[asyncio.Timeout, float] = {}  # loop.time() values
        self._timer: asyncio.TimerHandle | None = None  # set for the earliest of them

    def within(self, delay: float) -> Deadline:
        """An async context raising :class:`TimeoutError` after ``delay`` seconds."""
        return Deadline(self, delay)

    def __len__(self) -> int:
        """Calls being watched now."""
        return len(self._due)

    def _watch(self, timeout: asyncio.Timeout, when: float) -> None:
        self._due[timeout] = when
        timer = self._timer
        # Calls mostly carry alike timeouts, so a later call rarely has the earliest deadline.
        if timer is None or when < timer.when():
            if timer is not None:
                timer.cancel()
            self._arm(when)

    def _forget(self, timeout: asyncio.Timeout) -> None:
        self._due.pop(timeout, None)

    def _arm(self, when: float) -> None:
        self._timer = asyncio.get_running_loop().call_at(when, self._expire, when)

    def _expire(self, now: float) -> None:
        # Every deadline up to the one this timer was set for: asyncio would have fired all
        # of their timers by now too.
        self._timer = None
        for timeout, when in list(self._due.items()):
            if when <= now:
                del self._due[timeout]
                timeout.reschedule(when)  # past: asyncio cancels the call at once
        if self._due:
            self._arm(min(self._due.values()))


class Deadline:
    """``async with``: the call inside gets ``TimeoutError`` once ``delay`` has passed."""

    __slots__ = ("_deadlines", "_delay", "_timeout")

    def __init__(self, deadlines: Deadlines, delay: float) -> None:
        self._deadlines = deadlines
        self._delay = delay
        self._timeout = asyncio.timeout(None)  # no timer of its own: Deadlines keeps one

    async def __aenter__(self) -> None:
        await self._timeout.__aenter__()
        when = asyncio.get_running_loop().time() + self._delay
        self._deadlines._watch(self._timeout, when)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._deadlines._forget(self._timeout)
        await self._timeout.__aexit__(exc_type, exc, traceback)
