"""``http.request``: call an HTTP endpoint and check the status it answers.

It goes through ``ctx.http``, the dispatcher's guarded session (:mod:`functions.httpguard`):
an address the policy refuses fails the step at once with the guard's message.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Literal

import aiohttp
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, SecretStr

from functions.httpguard import http_failure
from functions.sdk import Context, PermanentError, RetryableError, function

_MAX_BODY = 64 * 1024  # kept in outputs; larger answers are truncated
MASK = "**********"  # what a SecretStr serialises to; the dispatcher's redactor uses it too
_MIN_SECRET = 4  # shorter values would mask innocent text


class RequestParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: AnyHttpUrl
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"] = "GET"
    headers: dict[str, str] = Field(default_factory=dict)
    # Header values that carry credentials; masked everywhere but on the wire.
    secret_headers: dict[str, SecretStr] = Field(default_factory=dict)
    json_body: Any = Field(default=None, alias="json")
    body: str | None = None
    timeout: float = Field(default=10.0, gt=0, le=3600)
    expect_status: list[int] = Field(default_factory=lambda: [200, 201, 202, 204])


class RequestResult(BaseModel):
    status: int
    body: str
    json_body: Any = Field(default=None, serialization_alias="json")


def _mask(text: str, secrets: Iterable[SecretStr]) -> str:
    """``text`` with every secret header value masked: a peer that echoes what it was sent
    (an error page, a debug endpoint) must not put the credential into the step outputs."""
    for secret in secrets:
        value = secret.get_secret_value()
        if len(value) >= _MIN_SECRET:
            # As sent, and as a JSON string would carry it (quotes, backslashes escaped).
            for form in {value, json.dumps(value)[1:-1]}:
                text = text.replace(form, MASK)
    return text


def _decode(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


@function("http.request")
async def request(ctx: Context, p: RequestParams) -> RequestResult:
    """Send one request; a 5xx or connection error is retryable, an unexpected 4xx is not."""
    headers = dict(p.headers)
    headers.update({k: v.get_secret_value() for k, v in p.secret_headers.items()})
    timeout = aiohttp.ClientTimeout(total=min(p.timeout, ctx.remaining() or p.timeout))
    try:
        async with ctx.http.request(
            p.method,
            str(p.url),
            headers=headers,
            json=p.json_body if p.body is None else None,
            data=p.body,
            timeout=timeout,
        ) as resp:
            raw = await resp.content.read(_MAX_BODY)
            status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        # Refused by the SSRF guard → permanent; connection trouble → retryable.
        raise http_failure(f"{p.method} {p.url.host}", exc) from None
    text = _mask(raw.decode("utf-8", errors="replace"), p.secret_headers.values())
    if status not in p.expect_status:
        message = f"{p.method} {p.url.host}{p.url.path or ''} answered {status}"
        raise (RetryableError if status >= 500 or status == 429 else PermanentError)(message)
    return RequestResult(status=status, body=text, json_body=_decode(text))
