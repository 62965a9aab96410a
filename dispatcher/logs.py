"""Structured JSON logs: one line per event/step transition, secrets redacted."""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import sys
from collections.abc import Callable
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


class _DeferredQueueHandler(logging.handlers.QueueHandler):
    """Queue records unformatted: JSON encoding and redaction happen on the listener's
    thread, not on the event loop (the stdlib handler formats before queueing)."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.msg, record.args = record.getMessage(), None
        return record


def configure_logging(
    level: str = "info", stream: TextIO | None = None, *, background: bool = False
) -> Callable[[], None]:
    """Log JSON lines to ``stream``; returns a function that flushes and stops logging.

    With ``background`` the lines are written by a listener thread, so a busy dispatcher's
    event loop does not pay for encoding, redaction and the write itself.
    """
    handler: logging.Handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    stop: Callable[[], None] = handler.flush
    if background:
        records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        listener = logging.handlers.QueueListener(records, handler, respect_handler_level=True)
        listener.start()
        handler, stop = _DeferredQueueHandler(records), listener.stop
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log duplicates our own lines; keep only its warnings.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return stop
