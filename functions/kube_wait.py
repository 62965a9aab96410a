"""Waiting on Kubernetes state (a Job finishing, a workload becoming ready), bounded by the
step's timeout.

Polling with backoff rather than a WATCH: each check is one GET, a watch would need its own
resync and 410-Gone handling for waits that last seconds to minutes, and the first polls
come quickly so short waits stay short.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from functions.sdk import Context, RetryableError

_T = TypeVar("_T")

FIRST_DELAY = 0.1  # seconds before the second check; doubles up to MAX_DELAY
MAX_DELAY = 2.0
MARGIN = 1.0  # stop this long before the step's timeout, so the error is ours, not a bare timeout


class WaitTimeout(RetryableError):
    """The awaited state did not arrive in time; a retry may see it arrive."""


def wait_budget(ctx: Context, limit: float | None = None) -> float:
    """Seconds a wait may take: the step's remaining time less a margin, at most ``limit``."""
    remaining = ctx.remaining()
    budget = max(0.0, remaining - min(MARGIN, remaining / 10))
    return budget if limit is None else min(budget, limit)


async def poll_until(
    ctx: Context,
    check: Callable[[], Awaitable[_T | None]],
    waiting_for: Callable[[], str],
    *,
    limit: float | None = None,
) -> _T:
    """Call ``check`` until it returns something other than ``None``, and return that.

    ``waiting_for`` describes, at the time of the timeout, what was awaited and how far it
    got ("Deployment db/web to have 3 ready replicas (1 ready)"): it becomes the error.
    """
    budget = wait_budget(ctx, limit)
    deadline = time.monotonic() + budget
    delay = FIRST_DELAY
    while True:
        result = await check()
        if result is not None:
            return result
        left = deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeout(f"timed out after {budget:.1f}s waiting for {waiting_for()}")
        await asyncio.sleep(min(delay, left))
        delay = min(delay * 2, MAX_DELAY)
