"""Reply events: ``io.snaphook.run.completed|run.failed`` when a run finishes.

Sent in binary mode to the configured sink (``K_SINK`` as Knative's SinkBinding sets it),
with retries; also returned inline for ``Prefer: reply``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from datetime import UTC, datetime
from typing import Any

import aiohttp

from dispatcher.cehttp import to_binary_message
from dispatcher.events import RUN_COMPLETED, RUN_FAILED
from dispatcher.journal import RunRecord, RunStatus, StepRecord
from dispatcher.metrics import Metrics
from dispatcher.retrying import backoff_delay
from dispatcher.service import step_summary

log = logging.getLogger("snaphook.replies")

_PROPAGATED = ("traceparent", "tracestate")


def reply_event(
    run: RunRecord, steps: list[StepRecord], source: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """CloudEvent attributes and data describing a finished run."""
    attributes: dict[str, Any] = {
        "specversion": "1.0",
        "id": f"{run.run_id}.reply",  # stable: a redelivered reply deduplicates downstream
        "source": source,
        "type": RUN_COMPLETED if run.status is RunStatus.SUCCEEDED else RUN_FAILED,
        "subject": run.subject,
        "time": datetime.now(UTC),
        "datacontenttype": "application/json",
    }
    for name in _PROPAGATED:
        if name in run.event:
            attributes[name] = str(run.event[name])
    data = {
        "run_id": run.run_id,
        "status": run.status.value,
        "allowed": run.allowed,
        "reason": run.reason,
        "blueprint": run.blueprint,
        "event": {"source": run.source, "id": run.event_id, "type": run.type},
        "steps": [step_summary(s) for s in steps],
    }
    return attributes, data


class ReplySender:
    def __init__(
        self,
        sink: str,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        *,
        source: str,
        attempts: int = 5,
        timeout: float = 10.0,
    ) -> None:
        self._sink = sink
        self._session = session
        self._metrics = metrics
        self._source = source
        self._attempts = attempts
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._pending: set[asyncio.Task[bool]] = set()

    async def on_final(self, run: RunRecord, steps: list[StepRecord]) -> None:
        """Runner hook: deliver in the background so a slow sink never holds a run."""
        task = asyncio.create_task(self.send(run, steps))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def send(self, run: RunRecord, steps: list[StepRecord]) -> bool:
        headers, body = to_binary_message(*reply_event(run, steps, self._source))
        for attempt in range(1, self._attempts + 1):
            problem, retryable = await self._post(headers, body)
            if problem is None:
                self._metrics.replies.labels(result="sent").inc()
                return True
            log.warning(
                "reply delivery failed",
                extra={"run_id": run.run_id, "attempt": attempt, "error": problem},
            )
            if not retryable:
                break
            if attempt < self._attempts:
                await asyncio.sleep(backoff_delay(attempt, base=0.5, cap=30.0, rng=random.random))
        self._metrics.replies.labels(result="failed").inc()
        return False

    async def _post(self, headers: dict[str, str], body: bytes) -> tuple[str | None, bool]:
        """(why it failed or ``None``, whether trying again can help)."""
        try:
            async with self._session.post(
                self._sink, headers=headers, data=body, timeout=self._timeout
            ) as resp:
                if resp.status < 300:
                    return None, False
                # Knative's data-plane table: these are worth retrying, other 4xx are not.
                retryable = resp.status >= 500 or resp.status in (404, 408, 409, 429)
                return f"sink answered {resp.status}", retryable
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"{type(exc).__name__}: {exc}", True

    async def close(self, grace: float = 5.0) -> None:
        if self._pending:
            await asyncio.wait(self._pending, timeout=grace)
        pending = list(self._pending)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
