"""The in-memory state of one executing run, mirrored from (and written to) the journal."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from dispatcher.journal import LeaseRecord, LeaseStatus, RunRecord, StepRecord, StepStatus
from dispatcher.planner import Plan, PlannedStep
from dispatcher.scope import base_scope, event_info, lease_views, steps_scope
from dispatcher.templating import TemplateEngine
from functions.sdk import EventInfo


@dataclass
class Execution:
    run: RunRecord
    plan: Plan
    steps: dict[str, StepRecord]
    leases: dict[str, LeaseRecord] = field(default_factory=dict)  # by the step that took it
    lease_outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # by lease id
    claimed: dict[str, list[LeaseRecord]] = field(default_factory=dict)  # by releasing step
    lease_errors: list[str] = field(default_factory=list)
    release_functions: dict[str, str] = field(default_factory=dict)  # lease step → release fn
    all_leases: list[LeaseRecord] = field(default_factory=list)  # every lease, oldest first
    starting: bool = False  # the run is still "accepted": mark it running with the first step
    decision_pending: bool = False  # allowed is decided in memory, written with the final state
    masked_params: dict[str, Any] = field(default_factory=dict)  # secret params masked

    @cached_property
    def event(self) -> EventInfo:
        return event_info(self.run)

    @cached_property
    def backup_id(self) -> str:
        return str((self.run.event.get("data") or {}).get("backup", {}).get("id", ""))

    @cached_property
    def namespace(self) -> str | None:
        return self.run.subject.split("/", 1)[0] or None

    @property
    def failed(self) -> bool:
        """Whether the phase failed: a main step that must not fail, failed."""
        return self.run.allowed is False or any(self.final_failed(p) for p in self.plan.main)

    def final_failed(self, planned: PlannedStep) -> bool:
        step = self.steps[planned.name]
        return step.status is StepStatus.FAILED and planned.spec.on_error == "fail"

    def scope(self) -> dict[str, Any]:
        scope = base_scope(self.run)
        scope["steps"] = steps_scope(self.steps.values())
        scope["leases"] = lease_views(self.leases.values(), self.lease_outputs)
        # What a report step (a finalizer) needs: did the phase fail, and where.
        scope["run"] |= {
            "failed": self.failed,
            "allowed": self.run.allowed,
            "reason": self.run.reason,
            "failed_steps": [
                name for name, s in self.steps.items() if s.status is StepStatus.FAILED
            ],
        }
        return scope

    def _need_problem(self, need: str) -> str | None:
        step = self.steps.get(need)
        if step is None:
            return None
        if step.status is StepStatus.SKIPPED:
            return f"not started: needs {need}, which was skipped"
        if step.status is StepStatus.FAILED and self._on_error(need) == "fail":
            return f"not started: needs {need}, which failed"
        return None

    def _on_error(self, name: str) -> str:
        try:
            return self.plan.step(name).spec.on_error
        except KeyError:
            return "fail"

    def blocked(
        self, pending: list[PlannedStep], *, stop_on_failure: bool
    ) -> list[tuple[PlannedStep, str]]:
        """Pending steps that can never start, with the reason."""
        result = []
        for planned in pending:
            # A failed dependency is the more useful reason, so it is looked for first.
            problems = (self._need_problem(need) for need in planned.spec.needs)
            problem = next((p for p in problems if p is not None), None)
            if problem is None and stop_on_failure and self.failed:
                problem = "not started: the phase already failed"
            if problem is not None:
                result.append((planned, problem))
        return result

    def ready(self, pending: list[PlannedStep]) -> list[PlannedStep]:
        return [
            planned
            for planned in pending
            if all(
                need not in self.steps or self.steps[need].status.final
                for need in planned.spec.needs
            )
        ]

    def released_names(self, planned: PlannedStep, engine: TemplateEngine) -> set[str]:
        """Lease steps this step releases: it names ``leases.<x>`` and calls x's release."""
        return {
            path[1]
            for value in _strings(planned.spec.with_)
            for path in engine.referenced(value)
            if len(path) >= 2
            and path[0] == "leases"
            and self.release_functions.get(path[1]) == planned.spec.function
        }

    def releasable(self, planned: PlannedStep, engine: TemplateEngine) -> list[LeaseRecord]:
        """The leases this step releases, whatever their state."""
        names = self.released_names(planned, engine)
        return [lease for name, lease in self.leases.items() if name in names]

    def nothing_to_release(self, planned: PlannedStep, engine: TemplateEngine) -> str | None:
        """Why a releasing step has nothing left to do (so it is skipped), else ``None``.

        A thaw after the reaper already thawed, or a post event whose pre run never took
        the lease, must not call the release function a second time.
        """
        names = self.released_names(planned, engine)
        if not names:
            return None
        reasons = []
        for name in sorted(names):
            lease = self.leases.get(name)
            if lease is None:
                reasons.append(f"no lease {name} for this target and backup")
            elif lease.status is not LeaseStatus.OPEN:
                reasons.append(f"lease {name} already {lease.status.value} by {lease.released_by}")
            else:
                return None
        return "nothing to release: " + "; ".join(reasons)

    def log_fields(self, **more: Any) -> dict[str, Any]:
        return {"run_id": self.run.run_id, "phase": self.plan.phase.value, **more}


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []
