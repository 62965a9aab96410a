"""How an accepted run reaches a runner: in this process, or through a shared queue.

With the embedded SQLite journal one process accepts and executes, so the queue is a
direct hand-over (:class:`LocalQueue`). With a distributed backend the accepted run is
published to a durable stream and whichever replica pulls it executes it; the queue then
also tells the local runner when a run changed elsewhere, so ``wait`` answers work on any
replica.
"""

from __future__ import annotations

from typing import Protocol

from dispatcher.journal import RunRecord, StepRecord
from dispatcher.runner import Runner

__all__ = ["LocalQueue", "RunQueue"]


class RunQueue(Protocol):
    async def start(self, runner: Runner) -> int:
        """Begin delivering runs to ``runner``; returns how many unfinished runs it resumed."""
        ...

    async def enqueue(self, run: RunRecord, steps: list[StepRecord], *, created: bool) -> None:
        """Hand an accepted run over for execution; durable when it returns.

        Called for a redelivered event too (``created=False``): a backend whose accept and
        publish are two writes re-publishes, idempotently, so a crash between them loses
        nothing. Raises :class:`dispatcher.errors.JournalError` if it cannot.
        """
        ...

    async def close(self, grace: float) -> None:
        """Stop taking runs; let running ones finish for ``grace`` seconds."""
        ...


class LocalQueue:
    """One process: accepted runs go straight to the runner; restarts resume from the journal."""

    def __init__(self) -> None:
        self._runner: Runner | None = None

    async def start(self, runner: Runner) -> int:
        self._runner = runner
        return await runner.recover()

    async def enqueue(self, run: RunRecord, steps: list[StepRecord], *, created: bool) -> None:
        if created and self._runner is not None:
            self._runner.submit(run.run_id, fresh=(run, steps))

    async def close(self, grace: float) -> None:
        if self._runner is not None:
            await self._runner.close(grace)
