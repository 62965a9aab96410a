"""Callers waiting for a run to reach a milestone (phase decided, run finished)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from dispatcher.journal import RunRecord


class Waiters:
    """One future per waiting caller, woken by :meth:`signal` and always cleaned up."""

    def __init__(self) -> None:
        self._futures: dict[str, list[asyncio.Future[None]]] = {}

    def signal(self, run_id: str) -> None:
        for future in self._futures.pop(run_id, []):
            if not future.done():
                future.set_result(None)

    async def wait(
        self,
        run_id: str,
        timeout: float,
        read: Callable[[], Awaitable[RunRecord | None]],
        reached: Callable[[RunRecord], bool],
    ) -> RunRecord | None:
        """The run once ``reached``, or as it stands when ``timeout`` expires."""
        future = asyncio.get_running_loop().create_future()
        # Registered before reading, so a milestone landing in between still wakes us.
        self._futures.setdefault(run_id, []).append(future)
        try:
            run = await read()
            if run is None or reached(run) or timeout <= 0:
                return run
            try:
                async with asyncio.timeout(timeout):
                    await future
            except TimeoutError:
                pass
            return await read()
        finally:
            self._discard(run_id, future)

    def _discard(self, run_id: str, future: asyncio.Future[None]) -> None:
        futures = self._futures.get(run_id)
        if futures is not None and future in futures:
            futures.remove(future)
            if not futures:
                del self._futures[run_id]

    def __contains__(self, run_id: object) -> bool:
        """Whether anyone waits for ``run_id``."""
        return run_id in self._futures

    def __len__(self) -> int:
        return sum(len(f) for f in self._futures.values())
