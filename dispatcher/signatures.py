"""Standard Webhooks signatures (https://www.standardwebhooks.com), both sides.

A signed request carries ``webhook-id``, ``webhook-timestamp`` (Unix seconds) and
``webhook-signature``: space-separated ``v1,<base64 HMAC-SHA256>`` over
``{id}.{timestamp}.{body}``, keyed with the bytes behind ``whsec_``. Several signatures let a
sender sign with an old and a new secret while a rotation is under way.

Replays: a captured request cannot be re-signed, so it comes back with its original id *and*
timestamp. :class:`ReplayCache` remembers (principal, id, timestamp) for as long as that
timestamp is acceptable; older requests fail the tolerance check anyway. A sender's own retry
(same id, fresh timestamp and signature, as the spec describes) is not a replay; the event's
(source, id) idempotency then answers it with the existing run.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from dispatcher.principals import webhook_key

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
HEADERS = (ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)
MAX_ID_LENGTH = 256
MAX_SIGNATURES = 16  # bounds the HMAC work one request can ask for

Owner = TypeVar("Owner")


class SignatureError(Exception):
    """Why a signed request is refused; ``reason`` is a short category for logs."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Signed(Generic[Owner]):
    owner: Owner  # whose key produced a matching signature
    msg_id: str
    timestamp: int


def _digest(key: bytes, msg_id: str, timestamp: int, body: bytes) -> bytes:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return hmac.new(key, signed, hashlib.sha256).digest()


def sign(
    secret: str, body: bytes, *, msg_id: str | None = None, now: float | None = None
) -> dict[str, str]:
    """The three headers that sign ``body`` with a ``whsec_`` secret."""
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    timestamp = int(time.time() if now is None else now)
    signature = base64.b64encode(_digest(webhook_key(secret), msg_id, timestamp, body)).decode()
    return {
        ID_HEADER: msg_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: f"v1,{signature}",
    }


def verify(
    msg_id: str,
    timestamp: str,
    signatures: str,
    body: bytes,
    keys: Iterable[tuple[Owner, bytes]],
    *,
    tolerance: float,
    now: float | None = None,
) -> Signed[Owner]:
    """The owner of the key that signed this request, or :class:`SignatureError`."""
    if not msg_id or len(msg_id) > MAX_ID_LENGTH:
        raise SignatureError("malformed_signature", f"{ID_HEADER} must be 1-{MAX_ID_LENGTH} chars")
    ts = _timestamp(timestamp, tolerance, time.time() if now is None else now)
    candidates = _v1_signatures(signatures)
    for owner, key in keys:
        expected = _digest(key, msg_id, ts, body)
        # Every candidate is compared in constant time; which one matched is not secret.
        if any(hmac.compare_digest(expected, given) for given in candidates):
            return Signed(owner, msg_id, ts)
    raise SignatureError(
        "bad_signature",
        "no webhook-signature matches the body with any known secret "
        "(wrong secret, or the body was changed)",
    )


def _timestamp(raw: str, tolerance: float, now: float) -> int:
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 12):
        raise SignatureError(
            "malformed_signature", f"{TIMESTAMP_HEADER} must be Unix seconds (an integer)"
        )
    ts = int(raw)
    if abs(now - ts) > tolerance:
        direction = "old" if ts < now else "far in the future"
        raise SignatureError(
            "stale_timestamp",
            f"{TIMESTAMP_HEADER} is too {direction}: more than {tolerance:g}s from the "
            "server clock (a replay, or clocks out of sync)",
        )
    return ts


def _v1_signatures(header: str) -> list[bytes]:
    found: list[bytes] = []
    for item in header.split()[:MAX_SIGNATURES]:
        version, _, encoded = item.partition(",")
        if version != "v1":  # other schemes (v1a: asymmetric) are not ours to check
            continue
        try:
            found.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            continue
    if not found:
        raise SignatureError(
            "malformed_signature", f"{SIGNATURE_HEADER} holds no v1,<base64> signature"
        )
    return found


class ReplayCache:
    """Signed messages already seen, remembered while their timestamp is still acceptable.

    In memory and per process: right for the single-process SQLite mode. With several
    replicas a replay could reach another one within the tolerance window; the event's
    (source, id) idempotency still keeps it from running anything twice. Bounded: when full,
    the oldest entry goes (only verified requests get in, so only a sender holding a valid
    secret and sending faster than ``size`` per window can push entries out).
    """

    def __init__(
        self, tolerance: float, size: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        # A timestamp up to ``tolerance`` in the future stays acceptable for 2 x tolerance.
        self._ttl = 2 * tolerance
        self._size = size
        self._clock = clock
        self._seen: OrderedDict[Hashable, float] = OrderedDict()

    def claim(self, key: Hashable) -> bool:
        """Record ``key``; False if it was already recorded (a replay)."""
        now = self._clock()
        while self._seen and next(iter(self._seen.values())) <= now:
            self._seen.popitem(last=False)
        if key in self._seen:
            return False
        self._seen[key] = now + self._ttl
        if len(self._seen) > self._size:
            self._seen.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._seen)
