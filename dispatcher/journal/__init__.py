"""The journal: the durable record of events, runs, steps and freeze leases.

Every state change is written here before it is acted on, so a restarted dispatcher can
resume or cleanly fail every unfinished run. Backends implement :class:`Journal`;
``sqlite`` is the embedded default.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "Journal",
    "LeaseRecord",
    "LeaseStatus",
    "RunRecord",
    "RunStatus",
    "StepRecord",
    "StepStatus",
]


class RunStatus(enum.StrEnum):
    ACCEPTED = "accepted"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self in (RunStatus.SUCCEEDED, RunStatus.FAILED)


class StepStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"

    @property
    def final(self) -> bool:
        return self in (StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.SKIPPED)


class LeaseStatus(enum.StrEnum):
    OPEN = "open"
    RELEASING = "releasing"  # claimed by one releaser; retried after a crash
    RELEASED = "released"
    FAILED = "failed"  # the release function failed; needs an operator


@dataclass
class RunRecord:
    """One run: the execution of one event's phase of one blueprint."""

    run_id: str
    source: str
    event_id: str
    type: str
    subject: str
    blueprint: str
    failure_policy: str  # "fail" | "ignore"
    status: RunStatus
    created_at: float  # unix seconds
    updated_at: float
    event: dict[str, Any]  # the CloudEvent, structured JSON form
    params: dict[str, Any] = field(default_factory=dict)  # resolved blueprint params
    decision_timeout: float | None = None  # seconds; from the binding
    allowed: bool | None = None  # the phase decision; None until decided
    reason: str = ""


@dataclass
class StepRecord:
    run_id: str
    name: str
    function: str
    status: StepStatus = StepStatus.PENDING
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    outputs: dict[str, Any] | None = None  # secrets already masked
    error: str | None = None  # already redacted


@dataclass
class LeaseRecord:
    """A freeze lease: who froze what, how to undo it, and until when it may stay frozen."""

    lease_id: str
    run_id: str
    step: str
    target: str  # namespace/kind/name
    backup_id: str
    release_function: str
    release_with: dict[str, Any]  # unrendered templates: secrets are resolved at release time
    context: dict[str, Any]  # template context at lease time (no secret values)
    expires_at: float
    status: LeaseStatus = LeaseStatus.OPEN
    created_at: float = 0.0
    released_at: float | None = None
    released_by: str | None = None  # "post:<run_id>" | "run-failed" | "reaper" | ...
    error: str | None = None
    # What the release function returned (e.g. PostgreSQL's backup label), whoever called it.
    release_outputs: dict[str, Any] | None = None


class Journal(Protocol):
    """Storage of runs, steps and leases. All methods are coroutine-safe."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def accept(self, run: RunRecord, steps: list[StepRecord]) -> tuple[RunRecord, bool]:
        """Store a new run with its steps, unless ``(run.source, run.event_id)`` exists.

        Returns the stored run and ``True`` if it was created now, or the existing run
        for that idempotency key and ``False``. Durable when it returns.
        """
        ...

    async def get_run(self, run_id: str) -> RunRecord | None: ...

    async def find_run(self, source: str, event_id: str) -> RunRecord | None:
        """The run of an idempotency key, if that event was accepted before."""
        ...

    async def list_runs(
        self, *, limit: int = 50, status: RunStatus | None = None
    ) -> list[RunRecord]:
        """Newest first."""
        ...

    async def unfinished_runs(self) -> list[RunRecord]:
        """Runs not in a final state, oldest first."""
        ...

    async def update_run(self, run_id: str, **changes: Any) -> None:
        """Set fields of a run (status, allowed, reason); ``updated_at`` is set too."""
        ...

    async def get_steps(self, run_id: str) -> list[StepRecord]:
        """In blueprint order."""
        ...

    async def update_step(self, run_id: str, name: str, **changes: Any) -> None: ...

    async def claim_step(self, run_id: str, name: str, attempt: int, started_at: float) -> bool:
        """Compare-and-set the start of one attempt: mark the step ``running`` with
        ``attempts=attempt`` only if it is ``pending`` and its stored ``attempts`` is below
        ``attempt``.

        Returns whether this caller won. With several dispatcher replicas on one journal,
        a replica that lost the claim must not call the function: exactly one effect per
        (run, step, attempt). ``started_at`` is kept if the step has one already.
        """
        ...

    async def put_lease(self, lease: LeaseRecord) -> None: ...

    async def get_lease(self, lease_id: str) -> LeaseRecord | None: ...

    async def find_leases(
        self,
        *,
        target: str | None = None,
        run_id: str | None = None,
        status: LeaseStatus | None = None,
    ) -> list[LeaseRecord]:
        """Oldest first."""
        ...

    async def expired_leases(self, now: float) -> list[LeaseRecord]:
        """Open leases whose ``expires_at`` is at or before ``now``."""
        ...

    async def transition_lease(self, lease_id: str, expected: LeaseStatus, **changes: Any) -> bool:
        """Compare-and-set: apply ``changes`` only if the lease is still ``expected``.

        Returns whether it applied, so exactly one caller wins a release.
        """
        ...
