"""Journal records as JSON values of a key-value store, and safe keys for their ids.

A stored value is an envelope ``{"v": 1, "<kind>": {field: value, ...}, ...}``: the version
lets replicas of different releases share one store (a reader refuses a newer envelope
instead of misreading it), and unknown fields are ignored on load so a field added later
does not break an older reader. A record's body is what :mod:`dispatcher.journal.fields`
encodes, the same checks as in the SQLite backend.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Final

from dispatcher.errors import JournalError
from dispatcher.journal import LeaseStatus, RunStatus
from dispatcher.journal.fields import Body, text

__all__ = [
    "ENVELOPE_VERSION",
    "LeaseSummary",
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
        return RunSummary(text(body["run_id"]), status, float(body["created_at"]), order)
    except (KeyError, TypeError, ValueError) as exc:
        raise JournalError(f"stored run record is unreadable: {exc!r}") from None


def lease_summary(body: Body) -> LeaseSummary:
    try:
        return LeaseSummary(
            text(body["lease_id"]),
            text(body["run_id"]),
            text(body["target"]),
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
