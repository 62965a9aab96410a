"""Durations as blueprint authors write them: ``30s``, ``15m``, ``1h30m``, or plain seconds.

:data:`Duration` is a pydantic annotated ``float`` (seconds), so models keep doing arithmetic
on plain numbers while YAML stays readable. The units follow Go's ``time.ParseDuration``
(``ms``, ``s``, ``m``, ``h``) plus ``d`` for days, and parts combine (``1h30m``). Nothing may
be negative: a negative timeout or TTL is always a mistake.
"""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import BeforeValidator, WithJsonSchema

__all__ = ["Duration", "format_duration", "parse_duration"]

_UNITS = {"d": 86_400.0, "h": 3_600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_NUMBER = r"\d+(?:\.\d+)?"
# ``ms`` must be tried before ``m``; the whole string must be parts and nothing else.
_PART = re.compile(rf"({_NUMBER})(ms|d|h|m|s)")
_WHOLE = re.compile(rf"(?:{_NUMBER}(?:ms|d|h|m|s))+")
_PLAIN = re.compile(_NUMBER)
_HINT = "use e.g. 30s, 15m, 1h30m"


def parse_duration(value: object) -> float:
    """Seconds from a non-negative number or a duration string; ``ValueError`` otherwise."""
    # bool is an int subclass, but ``timeout: true`` is never meant as one second.
    if isinstance(value, int | float) and not isinstance(value, bool):
        if math.isfinite(value) and value >= 0:
            return float(value)
    elif isinstance(value, str):
        seconds = _parse_text(value.strip())
        if seconds is not None:
            return seconds
    raise ValueError(f"invalid duration '{value}': {_HINT}")


def _parse_text(text: str) -> float | None:
    # Bare numbers arrive as strings from environment variables and CLI flags.
    if _PLAIN.fullmatch(text):
        return float(text)
    if not _WHOLE.fullmatch(text):
        return None
    return sum(float(number) * _UNITS[unit] for number, unit in _PART.findall(text))


def format_duration(seconds: float) -> str:
    """The shortest unit string for ``seconds`` (millisecond precision): ``1h30m``, ``500ms``."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"cannot format duration {seconds!r}")
    millis = round(seconds * 1000)
    if millis < 1000:
        return f"{millis}ms"
    parts: list[str] = []
    for unit in ("d", "h", "m"):
        count, millis = divmod(millis, round(_UNITS[unit] * 1000))
        if count:
            parts.append(f"{count}{unit}")
    if millis:
        whole, frac = divmod(millis, 1000)
        parts.append(f"{whole}.{frac:03d}".rstrip("0").rstrip(".") + "s")
    return "".join(parts)


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "pattern": r"^(\d+(\.\d+)?(ms|d|h|m|s))+$"},
            ],
            "description": "seconds, or a duration such as 30s, 15m, 1h30m",
        }
    ),
]
"""Seconds as a ``float``; validated from a number or a string like ``1h30m``."""
