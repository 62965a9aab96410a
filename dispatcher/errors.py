"""One root for everything snaphook raises on purpose.

    SnaphookError
    ├── BlueprintError      a blueprint or config file is invalid (file, line)
    ├── EventError          an incoming request/event is unacceptable (HTTP status, field)
    ├── ConfigError         settings or bindings are invalid
    ├── JournalError        the journal cannot record state (the caller may retry)
    └── StepTakenError      another dispatcher replica claimed the step attempt first

Hook functions raise :class:`functions.sdk.FunctionError` and its subclasses; the runner
interprets those, they never reach the HTTP layer.
"""

from __future__ import annotations

from typing import Any

from functions.sdk import FunctionError, PermanentError, RetryableError

__all__ = [
    "BlueprintError",
    "ConfigError",
    "EventError",
    "FunctionError",
    "JournalError",
    "PermanentError",
    "RetryableError",
    "SnaphookError",
    "StepTakenError",
]


class SnaphookError(Exception):
    """Base of snaphook's own errors. Mostly about input that retrying cannot fix; an
    error caused by an outage says so with ``retryable = True`` (the runner retries it)."""

    retryable: bool = False


class BlueprintError(SnaphookError):
    """An invalid blueprint; ``str()`` reads ``file:line: message``."""

    def __init__(self, message: str, *, file: str = "<blueprint>", line: int | None = None) -> None:
        self.message = message
        self.file = file
        self.line = line
        where = f"{file}:{line}" if line is not None else file
        super().__init__(f"{where}: {message}")


class ConfigError(SnaphookError):
    """Invalid settings or bindings."""


class EventError(SnaphookError):
    """A request that cannot be accepted; maps to an RFC 9457 problem response."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.field = field
        self.headers = headers or {}
        # RFC 9457 extension members, e.g. the run holding a 409's lease.
        self.extra = extra or {}


class JournalError(SnaphookError):
    """The journal is unavailable or rejected a write."""


class StepTakenError(SnaphookError):
    """Another replica won the claim on a step attempt: this replica stops executing the run
    (the winner carries it on) and never calls the function."""
