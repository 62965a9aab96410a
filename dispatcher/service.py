"""Accept a hook event: bind, plan, journal, start. Transport-free; ingress calls it."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dispatcher.bindings import Binding, BindingResolver
from dispatcher.blueprints import Blueprint, BlueprintSet
from dispatcher.errors import EventError, JournalError
from dispatcher.events import HookEvent
from dispatcher.journal import Journal, RunRecord, RunStatus, StepRecord
from dispatcher.limits import check_target_free
from dispatcher.metrics import Metrics
from dispatcher.planner import make_plan
from dispatcher.queueing import RunQueue
from dispatcher.runner import Runner

log = logging.getLogger("snaphook.service")


@dataclass(frozen=True)
class Accepted:
    run: RunRecord
    created: bool  # False: the (source, id) was seen before; this is the existing run


class Dispatcher:
    def __init__(
        self,
        journal: Journal,
        runner: Runner,
        resolver: BindingResolver,
        blueprints: Callable[[], BlueprintSet],
        metrics: Metrics,
        queue: RunQueue,
    ) -> None:
        self.journal = journal
        self.runner = runner
        self.queue = queue
        self._resolver = resolver
        self._blueprints = blueprints
        self._metrics = metrics

    async def bind(self, event: HookEvent) -> tuple[Binding, RunRecord, list[StepRecord]]:
        """Resolve the binding and plan the run; 422/400 if that is impossible."""
        binding = await self._resolver.resolve(event)
        if binding is None:
            raise EventError(
                422,
                "No blueprint bound",
                f"no blueprint is bound to {event.subject} (add a binding to the config file)",
                field="subject",
            )
        blueprint = self._blueprints().get(binding.blueprint)
        if blueprint is None:
            raise EventError(
                422,
                "Blueprint not loaded",
                f"{binding.origin or 'the binding'} names blueprint {binding.blueprint!r}, "
                "which is not loaded",
                field="subject",
            )
        try:
            params = blueprint.resolve_params({**binding.params, **event.data.params})
        except ValueError as exc:
            raise EventError(400, "Invalid params", str(exc), field="data.params") from None
        plan = make_plan(
            blueprint,
            event.phase,
            params=params,
            failure_policy=binding.failure_policy,
            timeout=binding.timeout,
        )
        now = time.time()
        run = RunRecord(
            run_id=f"run-{uuid.uuid4().hex[:20]}",
            source=event.source,
            event_id=event.id,
            type=event.type,
            subject=event.subject,
            blueprint=blueprint.metadata.name,
            failure_policy=binding.failure_policy,
            status=RunStatus.ACCEPTED,
            created_at=now,
            updated_at=now,
            event=_masked_event(event, blueprint),
            params=params,
            decision_timeout=binding.timeout,
        )
        steps = [
            StepRecord(run_id=run.run_id, name=p.name, function=p.spec.function) for p in plan.steps
        ]
        return binding, run, steps

    async def accept(self, event: HookEvent) -> Accepted:
        """Journal the event's run (durably) and start it; idempotent on (source, id)."""
        try:
            _, run, steps = await self.bind(event)
            await check_target_free(self.journal, event)
        except EventError:
            # A redelivery is answered from the journal even if bindings changed since, or
            # another backup froze the target since: idempotency comes first.
            existing = await self._existing(event)
            if existing is None:
                raise
            return existing
        try:
            stored, created = await self.journal.accept(run, steps)
            if not stored.status.final:
                await self.queue.enqueue(stored, steps, created=created)
        except JournalError:
            log.exception("journal refused an event", extra={"event_id": event.id})
            raise EventError(
                503,
                "Journal unavailable",
                "the event could not be recorded; retry later",
                headers={"Retry-After": "1"},
            ) from None
        if created:
            self._metrics.events_accepted.labels(type=event.type).inc()
            log.info("event accepted", extra=_fields(stored, event))
        else:
            self._metrics.events_duplicate.inc()
        return Accepted(stored, created)

    async def _existing(self, event: HookEvent) -> Accepted | None:
        run = await self.journal.find_run(event.source, event.id)
        if run is None:
            return None
        self._metrics.events_duplicate.inc()
        return Accepted(run, False)

    async def decision(self, run: RunRecord, wait: float) -> dict[str, Any]:
        """Admission-style answer: wait up to ``wait`` s for the phase decision."""
        waited = min(wait, run.decision_timeout or wait)
        current = await self.runner.wait_decision(run.run_id, waited) or run
        steps = await self.journal.get_steps(run.run_id)
        if current.allowed is None:
            policy_allows = current.failure_policy == "ignore"
            reason = (
                f"no decision within {waited:g}s; failure_policy={current.failure_policy} "
                f"→ {'allowed, the run goes on' if policy_allows else 'denied, the run stops'}"
            )
            # The answer given becomes the decision (unless one landed just now).
            current = await self.runner.settle(run.run_id, policy_allows, reason) or current
        allowed, reason = bool(current.allowed), current.reason
        return {
            "allowed": allowed,
            "reason": reason,
            "run_id": current.run_id,
            "status": current.status.value,
            "steps": [step_summary(s) for s in steps],
        }


def step_summary(step: StepRecord) -> dict[str, Any]:
    return {
        "name": step.name,
        "function": step.function,
        "status": step.status.value,
        "attempts": step.attempts,
        "error": step.error,
    }


def _fields(run: RunRecord, event: HookEvent) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "event_id": event.id,
        "source": event.source,
        "type": event.type,
        "subject": event.subject,
        "blueprint": run.blueprint,
    }


def _masked_event(event: HookEvent, blueprint: Blueprint) -> dict[str, Any]:
    """The event as recorded in the run: secret params never reach the run record."""
    body = event.to_json()
    data = body.get("data") or {}
    if data.get("params"):
        data["params"] = blueprint.masked_params(data["params"])
    return body
