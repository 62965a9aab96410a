"""Retry policy shared by steps and lease releases: what is retryable, how long to wait."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from dispatcher.errors import SnaphookError
from dispatcher.redaction import redactor
from functions.sdk import PermanentError, RetryableError


@dataclass(frozen=True)
class Failure:
    message: str  # redacted, fit for the journal
    retryable: bool
    delay: float | None = None  # the function's own hint, overrides backoff


def classify(exc: BaseException, *, timeout: float) -> Failure:
    """Turn whatever an attempt raised into a journal-safe failure."""
    if isinstance(exc, TimeoutError):
        return Failure(f"timed out after {timeout:g}s", retryable=True)
    if isinstance(exc, SnaphookError) and exc.retryable:
        # An outage behind our own machinery (a secret store away): the next attempt may work.
        return Failure(redactor.redact(str(exc) or type(exc).__name__), retryable=True)
    if isinstance(exc, PermanentError | SnaphookError):
        # Our own errors here (a template naming something missing) can't heal by retrying.
        return Failure(redactor.redact(str(exc) or type(exc).__name__), retryable=False)
    if isinstance(exc, RetryableError):
        return Failure(redactor.redact(str(exc) or "retryable error"), True, exc.delay)
    # Anything else is an unexpected bug or a transient fault: retry like kopf does.
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return Failure(redactor.redact(text), retryable=True)


def backoff_delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    rng: Callable[[], float] = random.random,
) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random.

    ``attempt`` is the attempt that just failed (1-based). Half of the exponential step
    is kept so retries never bunch up at zero delay; the random half spreads replicas.
    """
    step: float = min(cap, base * (2.0 ** (attempt - 1)))
    return step / 2 + rng() * step / 2
