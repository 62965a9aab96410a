"""Journal records as JSON values of a key-value store, and safe keys for their ids.

A stored value is an envelope ``{"v": 1, "<kind>": {field: value, ...}, ...}``: the version
lets replicas of different releases share one store (a reader refuses a newer envelope
instead of misreading it), and unknown fields are ignored on load so a field added later
does not break an older reader. Field encoders check types like the SQLite backend does:
a wrong type raises ``TypeError``/``ValueError`` in the caller, before anything is written.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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
    "ENVELOPE_VERSION",
    "LEASES",
    "RUNS",
    "STEPS",
    "Body",
    "LeaseSummary",
    "RecordCodec",
    "RunSummary",
    "StoredRun",
    "idempotency_key",
    "key_token",
    "lease_summary",
    "pack",
    "summarize_lease",
    "summarize_run",
    "unpack",
]

R = TypeVar("R")
Body = dict[str, Any]  # one record's fields, JSON values
Encoder = Callable[[Any], Any]

ENVELOPE_VERSION: Final = 1

# Verbatim tokens never contain "=", escaped ones always start with it: no collisions.
_PLAIN: Final = re.compile(r"[A-Za-z0-9_-]+")


def key_token(value: str) -> str:
    """A KV key token for any id: ids like ``run-3f2a`` stay readable, anything else
    (dots, spaces, unicode, the empty string) becomes ``=`` + unpadded base64url."""
    if _PLAIN.fullmatch(value):
        return value
    return "=" + base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def idempotency_key(source: str, event_id: str) -> str:
    """The key of an event's (source, id): a hash, so any characters and lengths are fine.
    JSON framing keeps ``("a/b", "c")`` and ``("a", "b/c")`` apart."""
    framed = json.dumps([source, event_id], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(framed.encode()).hexdigest()


def pack(kind: str, body: Body, **extra: Any) -> bytes:
    envelope = {"v": ENVELOPE_VERSION, kind: body, **extra}
    return json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode()


def unpack(kind: str, data: bytes | None) -> dict[str, Any]:
    """The envelope of a stored value; ``JournalError`` if it is not one we can read."""
    try:
        envelope = json.loads(data or b"")
    except ValueError:
        raise JournalError(f"stored {kind} record is not valid JSON") from None
    if not isinstance(envelope, dict) or not isinstance(envelope.get(kind), dict):
        raise JournalError(f"stored {kind} record has an unexpected shape")
    version = envelope.get("v")
    if version != ENVELOPE_VERSION:
        raise JournalError(
            f"stored {kind} record has format version {version!r}; this dispatcher reads "
            f"version {ENVELOPE_VERSION}"
        )
    return envelope


def _same(value: Any) -> Any:
    return value


def _optional(encode: Encoder) -> Encoder:
    return lambda value: None if value is None else encode(value)


def _text(value: Any) -> str:
    if not isinstance(value, str):  # str(None) == "None" must not sneak in
        raise TypeError(f"expected str, got {type(value).__name__}")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected bool, got {type(value).__name__}")
    return value


def _enum(cls: type[enum.StrEnum]) -> Encoder:
    return lambda value: cls(value).value  # ValueError on an unknown status


@dataclass(frozen=True)
class RecordCodec(Generic[R]):
    """How one record type maps to a JSON body: an encoder per field (every field of the
    dataclass), decoders where the stored form differs, and the fields no update may touch."""

    kind: str
    record: Callable[..., R]
    encode: Mapping[str, Encoder]
    decode: Mapping[str, Callable[[Any], Any]]
    fixed: frozenset[str]

    def dump(self, record: R) -> Body:
        return {name: enc(getattr(record, name)) for name, enc in self.encode.items()}

    def load(self, body: Mapping[str, Any]) -> R:
        try:
            values = {n: self.decode.get(n, _same)(body[n]) for n in self.encode if n in body}
            return self.record(**values)
        except (TypeError, ValueError) as exc:
            raise JournalError(f"stored {self.kind} record is unreadable: {exc}") from None

    def changes(self, changes: Mapping[str, Any]) -> Body:
        """Encoded ``changes``; ``ValueError`` naming any field that may not be set."""
        unknown = sorted(set(changes) - (self.encode.keys() - self.fixed))
        if unknown:
            raise ValueError(f"cannot update {self.kind} field(s): {', '.join(unknown)}")
        encoded = {name: self.encode[name](value) for name, value in changes.items()}
        json.dumps(encoded)  # a value JSON cannot hold fails here, before any read or write
        return encoded


_opt_float, _opt_text = _optional(float), _optional(_text)

RUNS: Final = RecordCodec(
    kind="run",
    record=RunRecord,
    encode={
        **dict.fromkeys(("run_id", "source", "event_id", "type", "subject"), _text),
        **dict.fromkeys(("blueprint", "failure_policy"), _text),
        "status": _enum(RunStatus),
        **dict.fromkeys(("created_at", "updated_at"), float),
        **dict.fromkeys(("event", "params"), _same),  # serialised (or refused) by pack
        "decision_timeout": _opt_float,
        "allowed": _optional(_flag),
        "reason": _text,
    },
    decode={"status": RunStatus},
    fixed=frozenset({"run_id", "source", "event_id", "created_at", "updated_at"}),
)
STEPS: Final = RecordCodec(
    kind="step",
    record=StepRecord,
    encode={
        **dict.fromkeys(("run_id", "name", "function"), _text),
        "status": _enum(StepStatus),
        "attempts": int,
        **dict.fromkeys(("started_at", "finished_at"), _opt_float),
        "outputs": _same,
        "error": _opt_text,
    },
    decode={"status": StepStatus},
    fixed=frozenset({"run_id", "name"}),
)
LEASES: Final = RecordCodec(
    kind="lease",
    record=LeaseRecord,
    encode={
        **dict.fromkeys(("lease_id", "run_id", "step", "target", "backup_id"), _text),
        "release_function": _text,
        **dict.fromkeys(("release_with", "context"), _same),
        "expires_at": float,
        "status": _enum(LeaseStatus),
        "created_at": float,
        "released_at": _opt_float,
        **dict.fromkeys(("released_by", "error"), _opt_text),
        "release_outputs": _same,
    },
    decode={"status": LeaseStatus},
    fixed=frozenset({"lease_id", "run_id", "created_at"}),
)


@dataclass(frozen=True)
class StoredRun:
    """A run as stored: its record's body, the step plan (the initial step records, in
    blueprint order), the acceptance order (revision of its idempotency key, which breaks
    ties in ``created_at``), and the revision it was read at (0: not read)."""

    body: Body
    plan: list[Body] = field(default_factory=list)
    order: int = 0
    revision: int = 0

    @classmethod
    def parse(cls, value: bytes | None, revision: int) -> StoredRun:
        envelope = unpack("run", value)
        plan = envelope.get("steps", [])
        if not isinstance(plan, list) or not all(isinstance(step, dict) for step in plan):
            raise JournalError("stored run record has an unreadable step plan")
        return cls(envelope["run"], plan, _int(envelope.get("order", 0)), revision)

    def pack(self, body: Body | None = None) -> bytes:
        return pack("run", self.body if body is None else body, steps=self.plan, order=self.order)

    def summary(self, body: Body | None = None) -> RunSummary:
        return _run_summary(self.body if body is None else body, self.order)


def _int(value: Any) -> int:
    if not isinstance(value, int):
        raise JournalError("stored run record has an unreadable order")
    return value


@dataclass(frozen=True, slots=True)
class RunSummary:
    """What listing runs needs to know of one."""

    run_id: str
    status: RunStatus
    created_at: float
    order: int


@dataclass(frozen=True, slots=True)
class LeaseSummary:
    """What finding leases needs to know of one."""

    lease_id: str
    run_id: str
    target: str
    status: LeaseStatus
    created_at: float
    expires_at: float


def _run_summary(body: Body, order: int) -> RunSummary:
    try:
        status = RunStatus(body["status"])
        return RunSummary(_text(body["run_id"]), status, float(body["created_at"]), order)
    except (KeyError, TypeError, ValueError) as exc:
        raise JournalError(f"stored run record is unreadable: {exc!r}") from None


def lease_summary(body: Body) -> LeaseSummary:
    try:
        return LeaseSummary(
            _text(body["lease_id"]),
            _text(body["run_id"]),
            _text(body["target"]),
            LeaseStatus(body["status"]),
            float(body["created_at"]),
            float(body["expires_at"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise JournalError(f"stored lease record is unreadable: {exc!r}") from None


def summarize_run(value: bytes) -> RunSummary:
    return StoredRun.parse(value, 0).summary()


def summarize_lease(value: bytes) -> LeaseSummary:
    return lease_summary(unpack("lease", value)["lease"])
