"""The CloudEvents of a remote function call: invoke, result, error.

The dispatcher's :class:`~dispatcher.invokers.remote.RemoteInvoker` sends one
``io.snaphook.function.invoke`` event per attempt; a function host (HTTP or Lambda)
answers with ``io.snaphook.function.result`` or ``io.snaphook.function.error``::

    invoke   id          <run>/<step>/<attempt>   (the host deduplicates by source + id)
             snaphookfunction  the function name (or the request path /functions/<name>)
             data        {params, event, run_id, step, attempt, timeout, outputs, lease_id}
    result   data        {outputs}
    error    data        {message, retryable, delay}

A function that ran and failed is *answered*, not refused: the error event travels with
HTTP 200, so a proxy's or broker's own 4xx/5xx can never be mistaken for the function's
verdict, and ``retryable`` alone decides whether the dispatcher tries again.

This module only builds and reads those events (as attribute dicts plus data); the bytes
on the wire are :mod:`dispatcher.cehttp`'s business.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dispatcher.cehttp import ParsedEvent
from dispatcher.errors import EventError
from dispatcher.invokers import Invocation
from functions.sdk import EventInfo, PermanentError, RetryableError

__all__ = [
    "ERROR_TYPE",
    "FUNCTION_EXTENSION",
    "INVOKE_TYPE",
    "RESULT_TYPE",
    "InvokeRequest",
    "error_event",
    "invocation_event",
    "invoke_request",
    "outcome_of",
    "result_event",
]

INVOKE_TYPE = "io.snaphook.function.invoke"
RESULT_TYPE = "io.snaphook.function.result"
ERROR_TYPE = "io.snaphook.function.error"
FUNCTION_EXTENSION = "snaphookfunction"  # names the function to run
INVOCATION_EXTENSION = "snaphookinvocation"  # on answers: the invoke event's id
MAX_MESSAGE = 2000  # characters of a host's error message kept by the dispatcher

Event = dict[str, Any]  # structured-JSON-shaped: attributes plus "data"


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WireEvent(_Wire):
    """:class:`functions.sdk.EventInfo` on the wire: the event that started the run."""

    id: str
    source: str
    type: str
    subject: str = ""
    data: dict[str, Any] = Field(default_factory=dict)
    extensions: dict[str, str] = Field(default_factory=dict)


class InvokeData(_Wire):
    params: dict[str, Any] = Field(default_factory=dict)
    event: WireEvent
    run_id: str = Field(min_length=1, max_length=256)
    step: str = Field(min_length=1, max_length=256)
    attempt: int = Field(ge=1, le=1_000_000)
    timeout: float = Field(gt=0, le=86_400)  # seconds left for this attempt
    outputs: dict[str, dict[str, Any]] = Field(default_factory=dict)
    lease_id: str | None = None


class ErrorData(_Wire):
    message: str
    retryable: bool
    delay: float | None = Field(default=None, ge=0, le=86_400)


def invocation_event(invocation: Invocation, *, source: str, timeout: float) -> Event:
    """The invoke event for one attempt; ``timeout`` is what is left of the attempt's."""
    event = invocation.event
    attributes: Event = {
        "specversion": "1.0",
        "id": invocation.invocation_id,
        "source": source,
        "type": INVOKE_TYPE,
        "subject": invocation.function,
        FUNCTION_EXTENSION: invocation.function,
        "datacontenttype": "application/json",
    }
    if "traceparent" in event.extensions:  # one trace from the backup tool to the function
        attributes["traceparent"] = event.extensions["traceparent"]
    attributes["data"] = {
        "params": invocation.params,
        "event": {
            "id": event.id,
            "source": event.source,
            "type": event.type,
            "subject": event.subject,
            "data": dict(event.data),
            "extensions": dict(event.extensions),
        },
        "run_id": invocation.run_id,
        "step": invocation.step,
        "attempt": invocation.attempt,
        "timeout": timeout,
        "outputs": {name: dict(values) for name, values in invocation.outputs.items()},
        "lease_id": invocation.lease_id,
    }
    return attributes


@dataclass(frozen=True)
class InvokeRequest:
    """A validated invoke event, as a host sees it."""

    key: tuple[str, str]  # (source, id): the deduplication key
    invocation: Invocation


def invoke_request(event: ParsedEvent, path_function: str | None = None) -> InvokeRequest:
    """Read an invoke event; :class:`EventError` (400/422) names what is wrong.

    The function is named by the ``snaphookfunction`` extension or by the request path;
    when both are given they must agree.
    """
    attributes = event.attributes
    if attributes.get("type") != INVOKE_TYPE:
        raise EventError(
            422,
            "Unsupported event type",
            f"a function host accepts only {INVOKE_TYPE} events, not {attributes.get('type')!r}",
            field="type",
        )
    function = _function_name(attributes.get(FUNCTION_EXTENSION), path_function)
    if not isinstance(event.data, dict):
        raise EventError(
            400, "Malformed invocation", "data must be a JSON object (the invocation)", field="data"
        )
    try:
        data = InvokeData.model_validate(event.data)
    except ValidationError as exc:
        raise _invalid(exc) from None
    wire = data.event
    invocation = Invocation(
        function=function,
        params=data.params,
        event=EventInfo(
            id=wire.id,
            source=wire.source,
            type=wire.type,
            subject=wire.subject,
            data=wire.data,
            extensions=wire.extensions,
        ),
        run_id=data.run_id,
        step=data.step,
        attempt=data.attempt,
        timeout=data.timeout,
        outputs=data.outputs,
        lease_id=data.lease_id,
    )
    return InvokeRequest((str(attributes["source"]), str(attributes["id"])), invocation)


def _function_name(extension: Any, path_function: str | None) -> str:
    if extension is not None and not isinstance(extension, str):
        raise EventError(
            400,
            "Malformed invocation",
            f"{FUNCTION_EXTENSION} must be a string",
            field=FUNCTION_EXTENSION,
        )
    if extension and path_function and extension != path_function:
        raise EventError(
            400,
            "Conflicting function names",
            f"the path names {path_function!r} but {FUNCTION_EXTENSION} names {extension!r}",
            field=FUNCTION_EXTENSION,
        )
    name = extension or path_function
    if not name:
        raise EventError(
            400,
            "No function named",
            f"name the function in the {FUNCTION_EXTENSION} extension attribute "
            "or POST to /functions/<name>",
            field=FUNCTION_EXTENSION,
        )
    return name


def _invalid(exc: ValidationError) -> EventError:
    """400 naming every bad field of the invocation, never its value (params hold secrets)."""
    fields, problems = [], []
    for error in exc.errors(include_input=False, include_url=False):
        fields.append(".".join(["data", *(str(part) for part in error["loc"])]))
        problems.append(f"{fields[-1]}: {error['msg']}")
    return EventError(400, "Malformed invocation", "; ".join(problems), field=fields[0])


def _answer(kind: str, request_id: str, function: str, source: str, data: Event) -> Event:
    return {
        "specversion": "1.0",
        # Unique as the invocation id is (and a replay is the very same event).
        "id": f"{request_id}/{kind.rsplit('.', 1)[-1]}",
        "source": source,
        "type": kind,
        # Set here, not by the encoder: a replayed answer must be the very same event.
        "time": datetime.now(UTC),
        "subject": function,
        INVOCATION_EXTENSION: request_id,
        "datacontenttype": "application/json",
        "data": data,
    }


def result_event(
    request_id: str, function: str, outputs: Mapping[str, Any], *, source: str
) -> Event:
    return _answer(RESULT_TYPE, request_id, function, source, {"outputs": dict(outputs)})


def error_event(
    request_id: str,
    function: str,
    message: str,
    *,
    retryable: bool,
    delay: float | None = None,
    source: str,
) -> Event:
    data = {"message": message, "retryable": retryable, "delay": delay}
    return _answer(ERROR_TYPE, request_id, function, source, data)


def outcome_of(event: ParsedEvent, where: str) -> dict[str, Any]:
    """The outputs a result event carries; an error event raises the error it describes.

    ``where`` names the host in messages. Anything else is a host (or a URL) that does not
    speak this protocol: permanent, since asking again will not change what it is.
    """
    kind, data = event.attributes.get("type"), event.data
    if kind == RESULT_TYPE:
        outputs = data.get("outputs") if isinstance(data, dict) else None
        if not isinstance(outputs, dict):
            raise PermanentError(f"{where} answered a result without an outputs object")
        return outputs
    if kind == ERROR_TYPE:
        try:
            error = ErrorData.model_validate(data)
        except ValidationError:
            raise PermanentError(f"{where} answered a malformed error event") from None
        message = error.message[:MAX_MESSAGE] or "function failed"
        if error.retryable:
            raise RetryableError(message, delay=error.delay)
        raise PermanentError(message)
    raise PermanentError(
        f"{where} answered a CloudEvent of type {str(kind)[:100]!r}, "
        f"not {RESULT_TYPE} or {ERROR_TYPE}: is the URL a snaphook function host?"
    )
