"""Structured JSON logs: one JSON object per line, known secrets never written."""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from dispatcher.logs import configure_logging
from dispatcher.redaction import MASK, redactor


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    out = io.StringIO()
    configure_logging("info", stream=out)
    yield out
    root.handlers[:], level = saved
    root.setLevel(level)


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def secret() -> str:
    # Unique per test: the redactor is process-wide and keeps what it learned.
    return f"s3cr3t-{uuid.uuid4().hex}"


def test_lines_are_json_with_standard_and_extra_fields(stream: io.StringIO) -> None:
    log = logging.getLogger("snaphook.test")
    log.info("step %s started", "freeze", extra={"run_id": "run-1", "attempt": 2})
    log.debug("not shown at info")
    log.warning("careful")
    first, second = lines(stream)
    assert first["msg"] == "step freeze started"
    assert first["level"] == "info"
    assert first["logger"] == "snaphook.test"
    assert first["run_id"] == "run-1"
    assert first["attempt"] == 2
    assert first["ts"].endswith("+00:00") and "T" in first["ts"]
    assert second["level"] == "warning" and second["msg"] == "careful"
    # Nothing of the LogRecord's plumbing leaks in as a field.
    assert not {"args", "levelno", "pathname", "lineno", "exc_info"} & set(first)


def test_level_setting(stream: io.StringIO) -> None:
    configure_logging("warning", stream=stream)
    logging.getLogger("snaphook.test").info("hidden")
    logging.getLogger("snaphook.test").error("shown")
    assert [entry["msg"] for entry in lines(stream)] == ["shown"]


def test_configure_replaces_handlers(stream: io.StringIO) -> None:
    configure_logging("info", stream=stream)  # a second call must not double every line
    logging.getLogger("snaphook.test").info("once")
    assert len(lines(stream)) == 1


def test_non_json_extra_values_are_stringified(stream: io.StringIO) -> None:
    logging.getLogger("snaphook.test").info("x", extra={"obj": object(), "items": ("a", 1)})
    (entry,) = lines(stream)
    assert entry["obj"].startswith("<object object")
    assert entry["items"] == ["a", 1]


class Holder:
    def __init__(self, password: str) -> None:
        self.password = password

    def __str__(self) -> str:
        return f"<conn password={self.password}>"


def test_registered_secret_never_appears(stream: io.StringIO) -> None:
    value = secret()
    redactor.add(SecretStr(value))
    log = logging.getLogger("snaphook.test")
    log.info("connecting with %s", value)
    log.info("step done", extra={"dsn": f"host=db password={value}", "nested": {"k": [value]}})
    log.info("object field", extra={"conn": Holder(value)})
    try:
        raise RuntimeError(f"login failed for password {value}")
    except RuntimeError:
        log.exception("freeze failed")
    text = stream.getvalue()
    assert value not in text
    first, second, third, fourth = lines(stream)
    assert first["msg"] == f"connecting with {MASK}"
    assert second["dsn"] == f"host=db password={MASK}"
    assert second["nested"] == {"k": [MASK]}
    assert third["conn"] == f"<conn password={MASK}>"
    assert "RuntimeError: login failed for password " + MASK in fourth["exc"]
    assert fourth["msg"] == "freeze failed"


@pytest.mark.parametrize("special", ['pa"ss', "pa\\ss", "pa\nss", "pa\tss"])
def test_secret_with_json_escaped_characters_never_appears(
    stream: io.StringIO, special: str
) -> None:
    # JSON escapes quotes, backslashes and control characters: the secret must not reach a
    # reader who parses the line either.
    value = secret() + special
    redactor.add(value)
    logging.getLogger("snaphook.test").info("got %s", value, extra={"field": value})
    (entry,) = lines(stream)
    assert value not in entry["msg"] and value not in entry["field"]
    assert entry["field"] == MASK


def test_short_values_are_not_treated_as_secrets(stream: io.StringIO) -> None:
    redactor.add("ab")  # would mask innocent substrings everywhere
    logging.getLogger("snaphook.test").info("table abc")
    assert lines(stream)[0]["msg"] == "table abc"


def test_url_passwords_are_masked(stream: io.StringIO) -> None:
    log = logging.getLogger("snaphook.test")
    log.info("connecting to postgres://app:hunter2-pw@db:5432/app")
    log.info("x", extra={"url": "redis://default:p4ssw0rd@cache:6379/0"})
    text = stream.getvalue()
    assert "hunter2-pw" not in text and "p4ssw0rd" not in text
    first, second = lines(stream)
    assert first["msg"] == f"connecting to postgres://app:{MASK}@db:5432/app"
    assert second["url"] == f"redis://default:{MASK}@cache:6379/0"


def test_url_without_password_is_untouched(stream: io.StringIO) -> None:
    logging.getLogger("snaphook.test").info("see https://example.com:8443/x and a@b")
    assert lines(stream)[0]["msg"] == "see https://example.com:8443/x and a@b"


def test_background_logging_writes_redacted_lines_off_the_caller_thread() -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    out = io.StringIO()
    token = secret()
    redactor.add(token)
    stop = configure_logging("info", stream=out, background=True)
    try:
        logging.getLogger("snaphook.test").info("token %s", token, extra={"run_id": "r1"})
    finally:
        stop()  # flushes the queue
        root.handlers[:], level = saved
        root.setLevel(level)
    [entry] = lines(out)
    assert entry["msg"] == f"token {MASK}" and entry["run_id"] == "r1"
    assert token not in out.getvalue()
