"""The names a blueprint template sees: event, backup, target, params, outcome, steps,
leases, run. Built from journal records only, so a resumed run renders exactly as before."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dispatcher.journal import LeaseRecord, RunRecord, StepRecord
from functions.sdk import EventInfo


@dataclass(frozen=True)
class LeaseView:
    """``leases.<step>`` in templates; renders as the lease id."""

    id: str
    step: str
    outputs: Mapping[str, Any]
    expires_at: float

    def __str__(self) -> str:
        return self.id


def event_info(run: RunRecord) -> EventInfo:
    event = run.event
    core = {"specversion", "id", "source", "type", "subject", "time", "datacontenttype", "data"}
    return EventInfo(
        id=run.event_id,
        source=run.source,
        type=run.type,
        subject=run.subject,
        data=event.get("data") or {},
        extensions={k: str(v) for k, v in event.items() if k not in core},
    )


def steps_scope(steps: Iterable[StepRecord]) -> dict[str, dict[str, Any]]:
    """``steps.<name>``: status, outputs, error and timings of every finished step."""
    return {s.name: _step_view(s) for s in steps if s.status.final}


def _step_view(step: StepRecord) -> dict[str, Any]:
    duration = None
    if step.started_at is not None and step.finished_at is not None:
        duration = round(step.finished_at - step.started_at, 3)
    return {
        "status": step.status.value,
        "outputs": step.outputs or {},
        "error": step.error,
        "attempts": step.attempts,
        "function": step.function,
        "duration": duration,
    }


def lease_views(
    leases: Iterable[LeaseRecord], outputs: Mapping[str, Mapping[str, Any]]
) -> dict[str, LeaseView]:
    return {
        lease.step: LeaseView(
            id=lease.lease_id,
            step=lease.step,
            outputs=outputs.get(lease.lease_id, {}),
            expires_at=lease.expires_at,
        )
        for lease in leases
    }


def base_scope(run: RunRecord) -> dict[str, Any]:
    """Everything but ``steps`` and ``leases``, which change as the run goes."""
    data = run.event.get("data") or {}
    scope = {
        "event": {k: v for k, v in run.event.items() if k != "data"} | {"data": data},
        "backup": data.get("backup", {}),
        "target": data.get("target", {}),
        "params": run.params,
        "run": {"id": run.run_id, "blueprint": run.blueprint, "type": run.type},
    }
    # Absent rather than None in pre phases, so a template using it fails loudly.
    if data.get("outcome") is not None:
        scope["outcome"] = data["outcome"]
    return scope
