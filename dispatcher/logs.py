"""Structured JSON logs: one line per event/step transition, secrets redacted."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from dispatcher.redaction import redactor

# Attributes every LogRecord has; anything else was passed in ``extra=`` and is a field.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        # The one redaction path: whatever a field held, a known secret never leaves. Redact
        # the values before encoding: JSON escapes quotes, backslashes and control characters,
        # so a secret holding one would no longer match in the encoded line.
        line = json.dumps(
            redactor.redact_obj(entry),
            default=lambda value: redactor.redact(str(value)),
            ensure_ascii=False,
        )
        return redactor.redact(line)


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log duplicates our own lines; keep only its warnings.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
