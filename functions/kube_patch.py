"""Compare-and-set patches: read, decide, patch with the resourceVersion that was read.

A JSON merge patch carrying ``metadata.resourceVersion`` is applied only if the object is
still at that version; otherwise the API server answers 409 Conflict. :func:`retry_conflicts`
then runs the whole read-decide-patch again, so a decision is never based on a stale read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from functions.kube_client import Conflict

_T = TypeVar("_T")

CONFLICT_ATTEMPTS = 5
CONFLICT_PAUSE = 0.05  # seconds, doubled per conflict: a competing writer finishes meanwhile


def guarded(obj: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``patch`` made conditional on ``obj`` being unchanged since it was read."""
    meta = {**patch.get("metadata", {}), "resourceVersion": obj["metadata"]["resourceVersion"]}
    return {**patch, "metadata": meta}


async def retry_conflicts(attempt: Callable[[], Awaitable[_T]]) -> _T:
    """Run ``attempt`` again while the object keeps changing under it (409), a few times."""
    pause = CONFLICT_PAUSE
    for number in range(1, CONFLICT_ATTEMPTS + 1):
        try:
            return await attempt()
        except Conflict:
            if number == CONFLICT_ATTEMPTS:
                raise
        await asyncio.sleep(pause)
        pause *= 2
    raise AssertionError("unreachable: the last attempt returns or raises")
