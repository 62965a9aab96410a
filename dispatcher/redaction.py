"""The one redaction path for logs, run records, error messages and metric labels.

Secret values become known to the :class:`Redactor` the moment a template resolves them
(``secret(...)``) or a pydantic ``SecretStr`` is seen; from then on every string that leaves
the process through a log line, a journal record or an HTTP answer passes ``redact``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from typing import Any

from pydantic import SecretBytes, SecretStr

MASK = "**********"
_MIN_LEN = 4  # shorter values would mask innocent substrings everywhere

# Credentials that appear inline even when nobody declared them secret.
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]+:)(?P<pw>[^@/\s]+)@")


class Redactor:
    """A process-wide set of secret values, replaced by :data:`MASK` wherever they appear."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self._lock = threading.Lock()

    def add(self, *values: str | SecretStr | SecretBytes | None) -> None:
        with self._lock:
            for value in values:
                plain = _plain(value)
                if plain and len(plain) >= _MIN_LEN and plain not in self._values:
                    self._values.add(plain)
                    self._pattern = None

    def add_all(self, values: Iterable[str]) -> None:
        self.add(*values)

    def known(self) -> frozenset[str]:
        """The values being masked now (for a test harness to snapshot)."""
        with self._lock:
            return frozenset(self._values)

    def reset(self, values: Iterable[str] = ()) -> None:
        """Mask exactly ``values`` from now on. The set is process-wide: a test runner resets
        it between tests so one test's secret ("backup" as a username) cannot mask another's
        ordinary text."""
        with self._lock:
            self._values = set(values)
            self._pattern = None

    def _compiled(self) -> re.Pattern[str] | None:
        with self._lock:
            if self._pattern is None and self._values:
                # Longest first so a secret containing another is masked whole.
                ordered = sorted(self._values, key=len, reverse=True)
                self._pattern = re.compile("|".join(re.escape(v) for v in ordered))
            return self._pattern

    def redact(self, text: str) -> str:
        pattern = self._compiled()
        if pattern is not None:
            text = pattern.sub(MASK, text)
        return _URL_PASSWORD.sub(lambda m: m.group("scheme") + MASK + "@", text)

    def redact_obj(self, obj: Any) -> Any:
        """A copy of a JSON-like structure with every string redacted, mapping keys too
        (a peer's answer or a function's output may be keyed by a credential)."""
        if isinstance(obj, str):
            return self.redact(obj)
        if isinstance(obj, SecretStr | SecretBytes):
            return MASK
        if isinstance(obj, dict):
            return {self.redact(str(k)): self.redact_obj(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [self.redact_obj(v) for v in obj]
        return obj


def _plain(value: str | SecretStr | SecretBytes | None) -> str | None:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, SecretBytes):
        return value.get_secret_value().decode("utf-8", "replace")
    return value


redactor = Redactor()
