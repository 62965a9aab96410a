"""The answers of snaphook's HTTP API as pydantic models, for the OpenAPI document.

They mirror what :mod:`dispatcher.ingress` and :mod:`dispatcher.api` write; the tests hold
live answers against the schemas generated from them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dispatcher.journal import LeaseStatus, RunStatus, StepStatus


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Accepted(_Answer):
    """The async answer (202): the run is in the journal."""

    run_id: str
    status: RunStatus


class StepSummary(_Answer):
    name: str
    function: str
    status: StepStatus
    attempts: int = Field(ge=0)
    error: str | None


class Decision(_Answer):
    """The sync answer (200 with ``wait``): may the backup proceed?"""

    allowed: bool
    reason: str
    run_id: str
    status: RunStatus
    steps: list[StepSummary]


class EventRef(_Answer):
    source: str
    id: str
    type: str


class ReplyData(_Answer):
    """``data`` of a reply event (``Prefer: reply``, and what the sink receives)."""

    run_id: str
    status: RunStatus
    allowed: bool | None
    reason: str
    blueprint: str
    event: EventRef
    steps: list[StepSummary]


class Run(_Answer):
    run_id: str
    status: RunStatus
    allowed: bool | None
    reason: str
    blueprint: str
    type: str
    subject: str
    source: str
    event_id: str
    failure_policy: Literal["fail", "ignore"]
    created_at: float = Field(description="unix seconds")
    updated_at: float


class Step(_Answer):
    name: str
    function: str
    status: StepStatus
    attempts: int = Field(ge=0)
    started_at: float | None
    finished_at: float | None
    duration: float | None = Field(description="seconds")
    outputs: dict[str, Any] | None
    error: str | None


class Lease(_Answer):
    lease_id: str
    step: str
    target: str
    status: LeaseStatus
    release_function: str
    expires_at: float
    released_at: float | None
    released_by: str | None
    error: str | None
    release_outputs: dict[str, Any] | None


class RunDetail(Run):
    event: dict[str, Any] = Field(description="the CloudEvent, structured JSON; secrets masked")
    params: dict[str, Any] = Field(description="resolved blueprint params; secrets masked")
    steps: list[Step]
    leases: list[Lease]


class RunList(_Answer):
    runs: list[Run]


class Problem(BaseModel):
    """RFC 9457 problem details; ``field`` names the offending input."""

    model_config = ConfigDict(extra="allow")  # RFC 9457 allows extension members

    type: str = "about:blank"
    title: str
    status: int = Field(ge=400, le=599)
    detail: str
    field: str | None = None
    holding_run_id: str | None = Field(default=None, description="409: the run holding it")
    lease_id: str | None = Field(default=None, description="409: the lease holding the target")
    limit: str | None = Field(default=None, description="the setting whose limit was hit")
    retry_after: int | None = Field(default=None, ge=1, description="429: seconds to wait")


class Health(_Answer):
    status: Literal["ok"]


class Ready(_Answer):
    status: Literal["ready", "not ready"]
    blueprints: list[str] = Field(default_factory=list)
