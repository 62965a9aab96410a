"""Structured JSON logs: one line per event/step transition, secrets redacted."""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import sys
import threading
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
    """Queue records unformatted: JSON encoding and redaction happen on the writer
    thread, not on the event loop (the stdlib handler formats before queueing)."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.msg, record.args = record.getMessage(), None
        return record


class _BatchWriter(threading.Thread):
    """Formats queued records and writes whatever has piled up with one write and one
    flush: a busy dispatcher logs several lines per event, and a syscall per line shows."""

    _STOP = logging.makeLogRecord({"msg": "stop"})

    def __init__(self, records: queue.SimpleQueue[logging.LogRecord], stream: TextIO) -> None:
        super().__init__(name="snaphook-log-writer", daemon=True)
        self._records = records
        self._stream = stream
        self._formatter = JsonFormatter()

    def run(self) -> None:
        while True:
            batch = [self._records.get()]
            while len(batch) < 512:
                try:
                    batch.append(self._records.get_nowait())
                except queue.Empty:
                    break
            stop = any(record is self._STOP for record in batch)
            lines = [self._formatter.format(r) for r in batch if r is not self._STOP]
            if lines:
                self._stream.write("\n".join(lines) + "\n")
                self._stream.flush()
            if stop:
                return

    def stop(self) -> None:
        self._records.put(self._STOP)
        self.join(timeout=5)


def configure_logging(
    level: str = "info", stream: TextIO | None = None, *, background: bool = False
) -> Callable[[], None]:
    """Log JSON lines to ``stream``; returns a function that flushes and stops logging.

    With ``background`` the lines are encoded and written by a writer thread in batches,
    so a busy dispatcher's event loop pays only for creating the records.
    """
    out = stream or sys.stderr
    handler: logging.Handler
    if background:
        records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        writer = _BatchWriter(records, out)
        writer.start()
        handler, stop = _DeferredQueueHandler(records), writer.stop
    else:
        handler = logging.StreamHandler(out)
        handler.setFormatter(JsonFormatter())
        stop = handler.flush
    # Thread, process and multiprocessing names are never in our lines; skipping them
    # makes each record noticeably cheaper to create on a busy event loop.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log duplicates our own lines; keep only its warnings.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # kubernetes_asyncio logs every API response body at debug: Secret data, pod logs and
    # env values the redactor has never seen. Never, whatever the level.
    logging.getLogger("kubernetes_asyncio.client.rest").setLevel(logging.INFO)
    return stop
