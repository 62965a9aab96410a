"""The fields of the journal's records, checked and encoded alike by every backend.

Each record type (run, step, lease) has an encoder per field, in the dataclass's order, that
turns a value into its stored form, JSON-native: text must be a ``str`` (``str(None) ==
"None"`` must not sneak in), a flag a ``bool``, a status a member of its enum, a time a
float. A wrong type raises ``TypeError``/``ValueError`` in the caller, before anything is
written. Fields holding JSON documents (a run's event, a step's outputs, ...) pass as they
are: the NATS backend stores the JSON body as it is, SQLite stores those fields as JSON text
(:mod:`dispatcher.journal.sqlite` overrides their encoders).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from dispatcher.errors import JournalError
from dispatcher.journal import (
    LeaseRecord,
    LeaseStatus,
    RunRecord,
    RunStatus,
    StepRecord,
    StepStatus,
)

__all__ = [
    "LEASES",
    "RUNS",
    "STEPS",
    "Body",
    "Encoder",
    "RecordFields",
    "optional",
    "some",
    "text",
]

R = TypeVar("R")
Body = dict[str, Any]  # one record's fields, JSON values
Encoder = Callable[[Any], Any]


def _same(value: Any) -> Any:
    return value


def optional(encode: Encoder) -> Encoder:
    return lambda value: None if value is None else encode(value)


def text(value: Any) -> str:
    if not isinstance(value, str):  # str(None) == "None" must not sneak in
        raise TypeError(f"expected str, got {type(value).__name__}")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected bool, got {type(value).__name__}")
    return value  # SQLite stores a bool as the integer 0 or 1


def _status(cls: type[enum.StrEnum]) -> Encoder:
    return lambda value: cls(value).value  # ValueError on an unknown status


def some(changes: dict[str, Any]) -> dict[str, Any]:
    """``changes``, or ``ValueError`` if there are none."""
    if not changes:
        raise ValueError("no changes given")
    return changes


@dataclass(frozen=True)
class RecordFields(Generic[R]):
    """How one record type maps to a JSON body: an encoder per field (every field of the
    dataclass), decoders where the stored form differs, and the fields no update may touch."""

    kind: str
    record: Callable[..., R]
    encode: Mapping[str, Encoder]
    decode: Mapping[str, Encoder]
    fixed: frozenset[str]

    def dump(self, record: R) -> Body:
        return {name: enc(getattr(record, name)) for name, enc in self.encode.items()}

    def load(self, body: Mapping[str, Any]) -> R:
        try:
            values = {n: self.decode.get(n, _same)(body[n]) for n in self.encode if n in body}
            return self.record(**values)
        except (TypeError, ValueError) as exc:
            raise JournalError(f"stored {self.kind} record is unreadable: {exc}") from None

    def check(self, changes: Mapping[str, Any]) -> None:
        """``ValueError`` naming any field of ``changes`` that an update may not set."""
        unknown = sorted(set(changes) - (self.encode.keys() - self.fixed))
        if unknown:
            raise ValueError(f"cannot update {self.kind} field(s): {', '.join(unknown)}")

    def changes(self, changes: Mapping[str, Any]) -> Body:
        """Encoded ``changes``; ``ValueError`` naming any field that may not be set."""
        self.check(changes)
        encoded = {name: self.encode[name](value) for name, value in changes.items()}
        json.dumps(encoded)  # a value JSON cannot hold fails here, before any read or write
        return encoded


_opt_float, _opt_text = optional(float), optional(text)

RUNS: Final = RecordFields(
    kind="run",
    record=RunRecord,
    encode={
        **dict.fromkeys(("run_id", "source", "event_id", "type", "subject"), text),
        **dict.fromkeys(("blueprint", "failure_policy"), text),
        "status": _status(RunStatus),
        **dict.fromkeys(("created_at", "updated_at"), float),
        **dict.fromkeys(("event", "params"), _same),  # JSON documents
        "decision_timeout": _opt_float,
        "allowed": optional(_flag),
        "reason": text,
    },
    decode={"status": RunStatus},
    fixed=frozenset({"run_id", "source", "event_id", "created_at", "updated_at"}),
)
STEPS: Final = RecordFields(
    kind="step",
    record=StepRecord,
    encode={
        **dict.fromkeys(("run_id", "name", "function"), text),
        "status": _status(StepStatus),
        "attempts": int,
        **dict.fromkeys(("started_at", "finished_at"), _opt_float),
        "outputs": _same,  # a JSON document
        "error": _opt_text,
    },
    decode={"status": StepStatus},
    fixed=frozenset({"run_id", "name"}),
)
LEASES: Final = RecordFields(
    kind="lease",
    record=LeaseRecord,
    encode={
        **dict.fromkeys(("lease_id", "run_id", "step", "target", "backup_id"), text),
        "release_function": text,
        **dict.fromkeys(("release_with", "context"), _same),  # JSON documents
        "expires_at": float,
        "status": _status(LeaseStatus),
        "created_at": float,
        "released_at": _opt_float,
        **dict.fromkeys(("released_by", "error"), _opt_text),
        "release_outputs": _same,  # a JSON document
    },
    decode={"status": LeaseStatus},
    fixed=frozenset({"lease_id", "run_id", "created_at"}),
)
