"""Limits on what one caller can make the dispatcher do.

A request to snaphook can freeze a production database, so the ingress bounds its work
before anything is journaled:

* the **shape of the event data** — nesting depth and encoded size — checked before the
  data is validated (``400`` / ``413`` naming the limit);
* a **rate per CloudEvents source** — a token bucket per ``source``, off by default —
  checked once the caller is authorized for that source, before journaling (``429`` with
  ``Retry-After``);
* **one freeze per target** — a ``*.pre`` event for a target that a run of another backup
  holds frozen (an open lease) is refused with ``409`` naming the holding run and lease.

Body size, batch length and the body timeout are enforced where the bytes are read
(:mod:`dispatcher.ingress`, :mod:`dispatcher.cehttp`); the HTTP server's own limits —
header sizes, the header-read timeout — are the handler arguments of :func:`server_limits`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

from dispatcher.errors import EventError
from dispatcher.events import HookEvent
from dispatcher.journal import Journal, LeaseRecord, LeaseStatus
from dispatcher.settings import Settings

# Buckets kept at most; a full bucket is the same as none, so those go first.
MAX_TRACKED_SOURCES = 10_000


class RateLimiter:
    """Token buckets keyed by CloudEvents source: ``rate`` tokens/s, ``burst`` at most."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_sources: int = MAX_TRACKED_SOURCES,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._max_sources = max_sources
        # source -> (tokens, when they were counted); dict order = least recently used first.
        self._buckets: dict[str, tuple[float, float]] = {}

    def acquire(self, source: str) -> float:
        """Take a token for ``source``: 0.0 if admitted, else seconds until one is free."""
        now = self._clock()
        tokens, then = self._buckets.pop(source, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        if tokens >= 1.0:
            self._buckets[source] = (tokens - 1.0, now)
            self._evict(now)
            return 0.0
        self._buckets[source] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def _evict(self, now: float) -> None:
        if len(self._buckets) <= self._max_sources:
            return
        # Refilled buckets carry no state worth keeping; if that is not enough (many sources
        # busy at once), forget the least recently used ones: they start over with a burst.
        full = [s for s, (t, then) in self._buckets.items() if t + (now - then) * self.rate >= 1]
        for source in full[: len(self._buckets) - self._max_sources]:
            del self._buckets[source]
        while len(self._buckets) > self._max_sources:
            del self._buckets[next(iter(self._buckets))]


@dataclass(frozen=True)
class Limits:
    """The per-event limits of one app, built from its settings."""

    max_data_depth: int = 32
    max_data_bytes: int = 256 * 1024
    rate: RateLimiter | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, *, clock: Callable[[], float] = time.monotonic
    ) -> Limits:
        rate = None
        if settings.rate_limit_per_source is not None:
            rate = RateLimiter(
                settings.rate_limit_per_source, settings.rate_limit_burst, clock=clock
            )
        return cls(settings.max_data_depth, settings.max_data_bytes, rate)

    def check_data(self, data: Any) -> None:
        check_data(data, max_depth=self.max_data_depth, max_bytes=self.max_data_bytes)

    def check_rate(self, source: str) -> None:
        if self.rate is not None:
            check_rate(self.rate, source)


def check_rate(limiter: RateLimiter, source: str) -> None:
    wait = limiter.acquire(source)
    if wait <= 0:
        return
    retry_after = max(1, math.ceil(wait))  # Retry-After is whole seconds
    raise EventError(
        429,
        "Too Many Requests",
        f"source {source[:100]!r} is over its rate limit (rate_limit_per_source "
        f"{limiter.rate:g}/s, rate_limit_burst {limiter.burst}); retry in {retry_after} s",
        field="source",
        headers={"Retry-After": str(retry_after)},
        extra={"limit": "rate_limit_per_source", "retry_after": retry_after},
    )


def check_data(data: Any, *, max_depth: int, max_bytes: int) -> None:
    """``data`` nests at most ``max_depth`` levels below itself and encodes to at most
    ``max_bytes`` of JSON; checked before pydantic spends time on it."""
    deep = _too_deep(data, max_depth)
    if deep is not None:
        field = "data" if deep == "" else f"data.{deep}"
        raise EventError(
            400,
            "Event data too deep",
            f"{field} nests more than max_data_depth ({max_depth}) levels",
            field=field,
            extra={"limit": "max_data_depth"},
        )
    size = _encoded_size(data)
    if size > max_bytes:
        raise EventError(
            413,
            "Event data too large",
            f"data is {size} bytes, over max_data_bytes ({max_bytes})",
            field="data",
            extra={"limit": "max_data_bytes"},
        )


def _containers(value: Any) -> Iterator[tuple[str, Any]]:
    """The (key, child) pairs of ``value`` whose child is itself an object or array."""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, child in items:
        if isinstance(child, dict | list):
            yield str(key), child


def _too_deep(data: Any, max_depth: int) -> str | None:
    """The top-level key of ``data`` under which it nests deeper than ``max_depth``
    ("" if ``data`` is an array), or ``None``. Level by level: no recursion to overflow."""
    if not isinstance(data, dict | list):
        return None
    level = [(key[:100], child) for key, child in _containers(data)]
    depth = 1
    while level:
        if depth > max_depth:
            return level[0][0] if isinstance(data, dict) else ""
        level = [(top, child) for top, value in level for _, child in _containers(value)]
        depth += 1
    return None


def _encoded_size(data: Any) -> int:
    if isinstance(data, bytes):
        return len(data)
    if isinstance(data, str):
        return len(data.encode("utf-8", "surrogatepass"))
    # Compact JSON: what the run record will hold, whatever whitespace the sender used.
    return len(
        json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
    )


# --- one freeze per target ----------------------------------------------------------------


async def check_target_free(journal: Journal, event: HookEvent) -> None:
    """Refuse a pre event for a target that another backup's run holds frozen (409).

    The check sees leases, which a run takes when its freeze step starts: two pre events
    for one target arriving before either run has frozen anything are both accepted.
    """
    if event.phase.is_post:
        return  # post events thaw: never in the way
    holder = await _holding_lease(journal, event)
    if holder is None:
        return
    raise EventError(
        409,
        "Target frozen",
        f"{event.subject} is frozen by run {holder.run_id} (lease {holder.lease_id}, "
        f"backup {holder.backup_id!r}) until its post event releases it or the lease "
        "expires; retry later",
        field="subject",
        extra={"holding_run_id": holder.run_id, "lease_id": holder.lease_id},
    )


async def _holding_lease(journal: Journal, event: HookEvent) -> LeaseRecord | None:
    leases = await journal.find_leases(target=event.subject, status=LeaseStatus.OPEN)
    # The same backup may re-send its pre event (a new id after a denied decision): its
    # own freeze is no conflict.
    return next((lease for lease in leases if lease.backup_id != event.data.backup.id), None)


# --- the HTTP server ------------------------------------------------------------------------


class _ClientErrorFilter(logging.Filter):
    """aiohttp logs a request it cannot parse (an oversized header, bytes that are not
    HTTP) as an error with a traceback. That is the client's fault, and anyone can send
    it: log one warning line, without the traceback and without echoing the client's bytes
    (an oversized ``Authorization`` header would be quoted in the message)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            message = record.getMessage()  # "Error handling request from <peer>"
            record.msg, record.args = "%s: %s (%s)", (message, type(exc).__name__, exc.code)
            record.exc_info = record.exc_text = None
        return True


# The logger aiohttp's request handler is given (see server_limits), so the filter sees
# exactly the protocol errors and nothing else.
HTTP_LOG = logging.getLogger("snaphook.http")
HTTP_LOG.addFilter(_ClientErrorFilter())


def server_limits(settings: Settings) -> dict[str, Any]:
    """aiohttp request-handler arguments against slow and oversized clients.

    Oversized request lines and headers get aiohttp's own ``400`` and a closed connection.
    ``keepalive_timeout`` closes a connection with no request being handled — idle, or
    still sending its headers — so it is also the header-read timeout. After a rejected
    request, the unread rest of its body is drained for at most ``body_timeout`` (so the
    client sees the answer rather than a reset), then the connection is closed.
    """
    return {
        "keepalive_timeout": settings.idle_timeout,
        "lingering_time": settings.body_timeout,
        "max_line_size": settings.max_header_size,
        "max_field_size": settings.max_header_size,
        "max_headers": settings.max_headers,
        "logger": HTTP_LOG,
    }
