"""RFC 9457 problem details responses."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from dispatcher.errors import EventError
from dispatcher.redaction import redactor

PROBLEM_TYPE = "application/problem+json"


def problem_body(
    status: int, title: str, detail: str, *, field: str | None = None, **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": redactor.redact(detail),
    }
    if field is not None:
        body["field"] = field
    body.update(extra)
    return body


def problem_of(error: EventError) -> dict[str, Any]:
    return problem_body(error.status, error.title, error.detail, field=error.field, **error.extra)


def problem_response(
    status: int,
    title: str,
    detail: str,
    *,
    field: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    body = problem_body(status, title, detail, field=field, **extra)
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type=PROBLEM_TYPE,
        headers=headers,
    )


def error_response(error: EventError) -> web.Response:
    return problem_response(
        error.status,
        error.title,
        error.detail,
        field=error.field,
        headers=error.headers,
        **error.extra,
    )


def http_error_response(exc: web.HTTPException) -> web.Response:
    """aiohttp's own refusals (404, 405 with its ``Allow``, 413, ...) as problems."""
    headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
    return problem_response(exc.status, exc.reason, exc.text or exc.reason, headers=headers)
