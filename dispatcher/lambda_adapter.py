"""AWS Lambda: run hook functions behind the handler ``functions.lambda_handler.handler``.

Three shapes of Lambda event are understood:

EventBridge
    ``{"detail-type", "source", "detail", ...}`` where ``detail`` is either an invoke
    CloudEvent (structured JSON) or the invocation data itself plus ``function``:
    ``{"function": "notify.slack", "params": {...}, "event": {...}, "run_id", "step",
    "attempt", "timeout", ...}`` (its id becomes ``<run_id>/<step>/<attempt>``).
a CloudEvent
    a structured invoke CloudEvent as the whole Lambda event (direct ``Invoke``).
an HTTP proxy event
    API Gateway (REST or HTTP API) or a Lambda function URL carrying an invoke CloudEvent
    in binary or structured mode; the answer is a proxy response (statusCode, headers,
    body), exactly what ``snaphook function serve`` would answer.

For the first two the handler returns the answer CloudEvent as a dict (type
``io.snaphook.function.result`` or ``.error``), or an RFC 9457 problem dict (with
``status``) for an event it cannot run. It raises only on misconfiguration, never for
bad input: an exception would make Lambda retry an asynchronous invocation that can never
succeed. The deduplication of the function host applies across warm invocations of one
execution environment, so a redelivered event does not run twice there.

Each invocation runs in its own ``asyncio.run``: nothing loop-bound survives between
invocations, which also means a session-bound freeze (``postgres.freeze``,
``mysql.freeze``) cannot be held by Lambda — run those on a function host.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
from collections.abc import Mapping
from typing import Any

from dispatcher.cehttp import STRUCTURED_TYPE, ParsedEvent, encode_event, parse_request
from dispatcher.errors import EventError
from dispatcher.function_events import FUNCTION_EXTENSION, INVOKE_TYPE, Event
from dispatcher.function_host import (
    FunctionHost,
    check_token,
    select_functions,
    token_digest,
)
from dispatcher.invocation_cache import InvocationCache
from dispatcher.invokers.factory import function_session, inprocess_invoker
from dispatcher.problems import PROBLEM_TYPE, problem_of
from dispatcher.secrets import EnvSecretResolver
from dispatcher.settings import Settings
from functions.sdk import FunctionRegistry, SecretResolver

__all__ = ["LambdaAdapter", "default_adapter"]

SAFETY_MARGIN = 0.5  # seconds kept back from Lambda's deadline to answer in time
_STRUCTURED = [(b"content-type", STRUCTURED_TYPE.encode())]


class LambdaAdapter:
    """Callable as a Lambda handler: ``adapter(event, context)``."""

    def __init__(
        self,
        settings: Settings,
        served: FunctionRegistry,
        *,
        secrets: SecretResolver | None = None,
    ) -> None:
        self._settings = settings
        self._served = served
        self._secrets = secrets or EnvSecretResolver()
        # Outlives each asyncio.run: it holds only finished answers between invocations.
        self._cache: InvocationCache[Event] = InvocationCache(
            settings.function_dedup_ttl, settings.function_dedup_max
        )
        self._token = token_digest(settings)

    def __call__(self, event: Any, context: Any = None) -> dict[str, Any]:
        return asyncio.run(self.handle(event, context))

    async def handle(self, event: Any, context: Any = None) -> dict[str, Any]:
        if isinstance(event, dict) and "requestContext" in event and "headers" in event:
            return await self._proxy(event, _budget(context))
        try:
            parsed = _direct(event, self._only_function())
            answer = await self._run(parsed, None, _budget(context))
        except EventError as exc:
            return problem_of(exc)
        return _as_json(answer)

    async def _run(
        self, parsed: ParsedEvent, path_function: str | None, budget: float | None
    ) -> Event:
        if budget is not None and isinstance(parsed.data, dict):
            timeout = parsed.data.get("timeout")
            if isinstance(timeout, int | float) and not isinstance(timeout, bool):
                # Answer before Lambda ends the invocation, rather than be killed mid-way.
                data = {**parsed.data, "timeout": max(0.001, min(timeout, budget))}
                parsed = ParsedEvent(parsed.attributes, data)
        async with function_session(self._settings) as http:
            invoker = inprocess_invoker(self._settings, self._served, self._secrets, http)
            host = FunctionHost(invoker, self._served, self._cache)
            return (await host.handle(parsed, path_function)).event

    async def _proxy(self, event: dict[str, Any], budget: float | None) -> dict[str, Any]:
        headers = _proxy_headers(event)
        try:
            check_token(self._token, headers.get("authorization"))
            raw = _proxy_body(event)
            parsed = parse_request(
                [(name.encode(), value.encode()) for name, value in headers.items()],
                raw,
                max_batch=1,
            )
            if len(parsed.events) != 1:
                raise EventError(415, "Unsupported Media Type", "one invocation per request")
            answer = await self._run(parsed.events[0], _path_function(event), budget)
        except EventError as exc:
            problem = json.dumps(problem_of(exc))
            return _response(exc.status, {"Content-Type": PROBLEM_TYPE, **exc.headers}, problem)
        reply_headers, reply = encode_event(answer, parsed.mode.value)  # the caller's mode
        return _response(200, reply_headers, reply.decode("utf-8"))

    def _only_function(self) -> str | None:
        names = self._served.names()
        return names[0] if len(names) == 1 else None


def _direct(event: Any, only_function: str | None) -> ParsedEvent:
    """An EventBridge event or a bare CloudEvent, as the invoke event it carries."""
    if not isinstance(event, dict):
        raise EventError(400, "Malformed event", "a Lambda event must be a JSON object")
    if "detail" in event and "detail-type" in event:
        detail = event["detail"]
        if not isinstance(detail, dict):
            raise EventError(400, "Malformed event", "detail must be a JSON object", field="detail")
        if "specversion" not in detail:
            detail = _invoke_of(detail, str(event.get("source") or "eventbridge"), only_function)
        event = detail
    elif "specversion" not in event:
        raise EventError(
            400,
            "Malformed event",
            "expected an EventBridge event (detail-type, detail), a CloudEvent (specversion) "
            "or an API Gateway / function URL request",
        )
    body = json.dumps(event).encode()
    return parse_request(_STRUCTURED, body, max_batch=1).events[0]


def _invoke_of(detail: dict[str, Any], source: str, only_function: str | None) -> Event:
    """Invocation data posted to EventBridge, as the invoke event the host expects."""
    data = {key: value for key, value in detail.items() if key != "function"}
    function = detail.get("function") or only_function
    ident = "/".join(str(detail.get(key, "")) for key in ("run_id", "step", "attempt"))
    event: Event = {
        "specversion": "1.0",
        "id": ident,
        "source": source,
        "type": INVOKE_TYPE,
        "datacontenttype": "application/json",
        "data": data,
    }
    if function is not None:
        event[FUNCTION_EXTENSION] = function
    return event


def _proxy_headers(event: Mapping[str, Any]) -> dict[str, str]:
    """Lower-cased single-valued headers (REST APIs may also send multiValueHeaders)."""
    headers = {str(k).lower(): str(v) for k, v in (event.get("headers") or {}).items()}
    for name, values in (event.get("multiValueHeaders") or {}).items():
        if values and str(name).lower() not in headers:
            headers[str(name).lower()] = str(values[-1])
    return headers


def _proxy_body(event: Mapping[str, Any]) -> bytes:
    """The request body a proxy event carries (text, or base64 when it says so)."""
    body = event.get("body") or ""
    if not isinstance(body, str):
        raise EventError(400, "Malformed event", "the request body must be a string", field="body")
    try:
        if event.get("isBase64Encoded"):
            return base64.b64decode(body, validate=True)
        return body.encode()
    except binascii.Error:
        raise EventError(
            400, "Malformed event", "isBase64Encoded, but the body is not base64", field="body"
        ) from None
    except UnicodeEncodeError:
        raise EventError(
            400, "Malformed event", "the request body is not valid UTF-8 text", field="body"
        ) from None


def _path_function(event: Mapping[str, Any]) -> str | None:
    """``<name>`` of a ``.../functions/<name>`` request path (after any stage prefix)."""
    path = str(event.get("rawPath") or event.get("path") or "")
    _, found, name = path.rpartition("/functions/")
    return name if found and name and "/" not in name else None


def _response(status: int, headers: Mapping[str, str], body: str) -> dict[str, Any]:
    return {"statusCode": status, "headers": dict(headers), "body": body, "isBase64Encoded": False}


def _as_json(event: Event) -> dict[str, Any]:
    """The answer as plain JSON (``time`` as an RFC 3339 string), as Lambda returns it."""
    _, body = encode_event(event, "structured")
    answer: dict[str, Any] = json.loads(body)
    return answer


def _budget(context: Any) -> float | None:
    """Seconds Lambda still gives this invocation, minus a margin to answer in."""
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    if remaining is None:
        return None
    return max(0.001, float(remaining()) / 1000 - SAFETY_MARGIN)


def default_adapter() -> LambdaAdapter:
    """The adapter of this execution environment: settings from ``SNAPHOOK_*``, functions
    from the installed families (``SNAPHOOK_FUNCTIONS`` selects, as for ``function
    serve``). Built once per cold start; a misconfiguration raises here."""
    from dispatcher.app import load_functions
    from dispatcher.logs import configure_logging

    settings = Settings.load(None)
    configure_logging(settings.log_level)  # JSON lines on stderr, which CloudWatch keeps
    selection = [s.strip() for s in os.environ.get("SNAPHOOK_FUNCTIONS", "").split(",")]
    served = select_functions(
        load_functions(settings.function_modules), [s for s in selection if s]
    )
    return LambdaAdapter(settings, served)
