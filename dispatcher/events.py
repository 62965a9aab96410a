"""The snaphook event contract: CloudEvent types and the pydantic model of their data."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dispatcher.cehttp import extensions_of
from dispatcher.errors import EventError

TYPE_PREFIX = "io.snaphook."
NAME_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$"
MAX_PARAMS_DEPTH = 32  # levels of nesting in data.params, counting params itself


class Phase(enum.StrEnum):
    """A blueprint action; the event type without the ``io.snaphook.`` prefix."""

    BACKUP_PRE = "backup.pre"
    BACKUP_POST = "backup.post"
    RESTORE_PRE = "restore.pre"
    RESTORE_POST = "restore.post"

    @property
    def event_type(self) -> str:
        return TYPE_PREFIX + self.value

    @property
    def is_post(self) -> bool:
        return self.value.endswith(".post")

    @classmethod
    def from_event_type(cls, event_type: str) -> Phase | None:
        """The phase of an event type; accepts the short form (``backup.pre``) too."""
        short = event_type.removeprefix(TYPE_PREFIX)
        try:
            return cls(short)
        except ValueError:
            return None


RUN_COMPLETED = TYPE_PREFIX + "run.completed"
RUN_FAILED = TYPE_PREFIX + "run.failed"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackupRef(_Strict):
    name: str = Field(min_length=1, max_length=253)
    id: str = Field(min_length=1, max_length=253)


class TargetRef(_Strict):
    namespace: str = Field(pattern=NAME_PATTERN)
    kind: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9]{0,62}$")
    name: str = Field(pattern=NAME_PATTERN)
    labels: dict[str, str] = Field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.kind}/{self.name}"

    @classmethod
    def parse_subject(cls, subject: str) -> TargetRef:
        parts = subject.split("/")
        if len(parts) != 3:
            raise ValueError("subject must be 'namespace/kind/name'")
        return cls(namespace=parts[0], kind=parts[1], name=parts[2])


Outcome = Literal["succeeded", "failed", "partial"]


class HookEventData(_Strict):
    """``data`` of every ``io.snaphook.*`` hook event."""

    backup: BackupRef
    target: TargetRef | None = None  # defaults to the one named by ``subject``
    outcome: Outcome | None = None  # required on post events
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _params_are_small(self) -> HookEventData:
        if len(self.params) > 256:
            raise ValueError("params: at most 256 entries")
        return self

    @field_validator("params")
    @classmethod
    def _params_are_plain_json(cls, params: dict[str, Any]) -> dict[str, Any]:
        # Deep nesting would break serialising the run (a 500), and a number literal too
        # large for a float (1e999) would be stored as Infinity, which is not JSON.
        level: list[Any] = [params]
        for _ in range(MAX_PARAMS_DEPTH):
            if any(isinstance(v, float) and not math.isfinite(v) for v in level):
                raise ValueError("numbers must be finite")
            level = [
                child
                for v in level
                if isinstance(v, dict | list)
                for child in (v.values() if isinstance(v, dict) else v)
            ]
            if not level:
                return params
        raise ValueError(f"nested more than {MAX_PARAMS_DEPTH} levels deep")


@dataclass(frozen=True)
class HookEvent:
    """An accepted hook event: CloudEvent attributes plus validated data."""

    id: str
    source: str
    type: str
    phase: Phase
    subject: str
    target: TargetRef
    data: HookEventData
    time: datetime | None = None
    extensions: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        """The idempotency key."""
        return (self.source, self.id)

    def to_json(self) -> dict[str, Any]:
        """The event as a structured-mode CloudEvent JSON object."""
        body: dict[str, Any] = {
            "specversion": "1.0",
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "subject": self.subject,
            "datacontenttype": "application/json",
            **self.extensions,
            "data": self.data.model_dump(mode="json", exclude_none=True),
        }
        if self.time is not None:
            body["time"] = self.time.isoformat()
        return body


def _validation_problem(exc: ValidationError) -> EventError:
    first = exc.errors(include_input=False, include_url=False)[0]
    field = ".".join(["data", *(str(p) for p in first["loc"])])
    return EventError(400, "Invalid event data", f"{field}: {first['msg']}", field=field)


def hook_event_from(attributes: Mapping[str, Any], data: Any) -> HookEvent:
    """Validate a parsed CloudEvent against the snaphook contract.

    Unknown types are 422 (well-formed, but nothing here handles them); everything else
    wrong is 400 naming the field.
    """
    event_type = str(attributes["type"])
    phase = Phase.from_event_type(event_type)
    if phase is None or not event_type.startswith(TYPE_PREFIX):
        known = ", ".join(p.event_type for p in Phase)
        raise EventError(
            422,
            "Unknown event type",
            f"type {event_type[:100]!r} is not one of {known}",
            field="type",
        )
    subject = attributes.get("subject")
    if not isinstance(subject, str) or not subject:
        raise EventError(
            400, "Missing subject", "subject 'namespace/kind/name' is required", field="subject"
        )
    try:
        target = TargetRef.parse_subject(subject)
    except (ValueError, ValidationError):
        raise EventError(
            400,
            "Invalid subject",
            f"subject {subject[:100]!r} is not "
            "'namespace/kind/name' (DNS names, kind alphanumeric)",
            field="subject",
        ) from None
    if not isinstance(data, dict):
        raise EventError(
            400,
            "Invalid event data",
            "data must be a JSON object (datacontenttype application/json)",
            field="data",
        )
    try:
        model = HookEventData.model_validate(data)
    except ValidationError as exc:
        raise _validation_problem(exc) from None
    model = _with_target(model, target)
    if phase.is_post and model.outcome is None:
        raise EventError(
            400,
            "Invalid event data",
            f"data.outcome is required on {phase} events (succeeded, failed or partial)",
            field="data.outcome",
        )
    return HookEvent(
        id=str(attributes["id"]),
        source=str(attributes["source"]),
        type=phase.event_type,
        phase=phase,
        subject=target.key,
        target=model.target or target,
        data=model,
        time=attributes.get("time") if isinstance(attributes.get("time"), datetime) else None,
        # Canonical strings (a Boolean is "true", not Python's "True").
        extensions=extensions_of(attributes),
    )


def _with_target(model: HookEventData, target: TargetRef) -> HookEventData:
    given = model.target
    if given is None:
        return model.model_copy(update={"target": target})
    if (given.namespace, given.kind, given.name) != (target.namespace, target.kind, target.name):
        raise EventError(
            400,
            "Invalid event data",
            f"data.target ({given.key}) does not match subject ({target.key})",
            field="data.target",
        )
    return model
