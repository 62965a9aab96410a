"""The OpenAPI 3.1 document of snaphook's HTTP API, served at ``GET /openapi.json``.

Schemas come from pydantic models: the event data from :class:`HookEventData`, the
answers from :mod:`dispatcher.answers`. Limits that an operator configures (``max_batch``)
are read from the settings, so the document describes the server that serves it.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from dispatcher.answers import (
    Accepted,
    Decision,
    Health,
    Problem,
    Ready,
    ReplyData,
    RunDetail,
    RunList,
)
from dispatcher.events import NAME_PATTERN, HookEventData, Phase
from dispatcher.journal import RunStatus
from dispatcher.problems import PROBLEM_TYPE
from dispatcher.settings import Settings

REF = "#/components/schemas/{model}"
JSON = "application/json"
STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"

MODELS: list[type[BaseModel]] = [
    HookEventData,
    Accepted,
    Decision,
    ReplyData,
    RunDetail,
    RunList,
    Problem,
    Health,
    Ready,
]


def component_schemas() -> dict[str, Any]:
    _, top = models_json_schema([(m, "serialization") for m in MODELS], ref_template=REF)
    schemas: dict[str, Any] = top["$defs"]
    # The model checks this in a validator, which JSON Schema cannot see.
    schemas["HookEventData"]["properties"]["params"]["maxProperties"] = 256
    return schemas


# --- requests -------------------------------------------------------------------------------

# What the dispatcher accepts in a CloudEvents String attribute: no control characters or
# noncharacters (core spec, "Type System"). Lone surrogates are refused too, but a range of
# them is a pattern that regex engines (and so schema-driven generators) cannot use.
CE_STRING = "^[^\\u0000-\\u001f\\u007f-\\u009f\\ufdd0-\\ufdef\\ufffe\\uffff]*$"
NAME = NAME_PATTERN.strip("^$")
SUBJECT = f"^{NAME}/[A-Za-z][A-Za-z0-9]{{0,62}}/{NAME}$"


def _string(**more: Any) -> dict[str, Any]:
    return {"type": "string", "pattern": CE_STRING, **more}


def _optional(schema: dict[str, Any]) -> dict[str, Any]:
    """An optional attribute: the JSON format reads ``null`` as leaving it out."""
    return {"anyOf": [schema, {"type": "null"}]}


def cloud_event_schema() -> dict[str, Any]:
    types = [p.event_type for p in Phase]
    post = [p.event_type for p in Phase if p.is_post]
    return {
        "type": "object",
        "description": "A CloudEvent in the JSON format. Another type than these is 422.",
        "required": ["specversion", "id", "source", "type", "subject", "data"],
        "properties": {
            "specversion": {"const": "1.0"},
            "id": _string(minLength=1, description="(source, id) is the idempotency key"),
            "source": _string(minLength=1, description="the platform instance, e.g. k10/prod"),
            "type": {"enum": types},
            "subject": {"type": "string", "pattern": SUBJECT},
            "time": _optional({"type": "string", "format": "date-time"}),
            # Structured mode: data is a JSON value whatever this says.
            "datacontenttype": _optional(_string()),
            "data": {"$ref": REF.format(model="HookEventData")},
        },
        # Extension attributes: lowercase alphanumeric names (core spec).
        "propertyNames": {"pattern": "^[a-z0-9]+$"},
        "additionalProperties": {  # null: the JSON format's way of leaving one out
            "anyOf": [
                _string(),
                {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1},  # Integer
                {"type": ["boolean", "null"]},
            ],
        },
        # Post events report how the backup went.
        "if": {"properties": {"type": {"enum": post}}},
        "then": {
            "properties": {
                "data": {"required": ["outcome"], "properties": {"outcome": {"type": "string"}}}
            }
        },
    }


def _request_body(max_batch: int) -> dict[str, Any]:
    event = {"$ref": REF.format(model="CloudEvent")}
    # Batch elements are judged one by one: an object that breaks the event contract gets
    # its own problem in the answer while the others are accepted, so any object may be an
    # element (an element that is no CloudEvent at all rejects the whole batch: 400).
    element = {"anyOf": [event, {"type": "object"}]}
    return {
        "required": True,
        "content": {
            STRUCTURED: {"schema": event},
            BATCH: {"schema": {"type": "array", "items": element, "maxItems": max_batch}},
            # Binary mode: the data alone; the attributes travel in ce-* headers.
            JSON: {"schema": {"$ref": REF.format(model="HookEventData")}},
        },
    }


def _header(name: str, description: str, *, required: bool = False) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if required:
        schema["pattern"] = "\\S"  # blank is the same as absent
    return {
        "name": name,
        "in": "header",
        "required": required,
        "description": description,
        "schema": schema,
    }


def _event_parameters() -> list[dict[str, Any]]:
    binary = "binary mode (application/json body)"
    return [
        {
            "name": "wait",
            "in": "query",
            "required": False,
            "description": "seconds to wait for the pre-phase decision (capped by max_wait)",
            "schema": {"type": "number", "minimum": 0},
        },
        _header("Prefer", "RFC 7240: wait=<seconds>, reply, respond-async"),
        _header("ce-specversion", f"{binary}: 1.0"),
        _header("ce-id", binary),
        _header("ce-source", binary),
        _header("ce-type", binary),
        _header("ce-subject", f"{binary}: namespace/kind/name"),
        _header("ce-time", f"{binary}: RFC 3339"),
        _header("ce-traceparent", f"{binary}: W3C trace context"),
    ]


# --- responses ------------------------------------------------------------------------------

PROBLEMS = {
    "400": "malformed CloudEvent, JSON, data, params, wait; or data nested deeper than "
    "max_data_depth",
    "401": "not authenticated",
    "403": "authenticated, but not allowed to send for this source or origin",
    "408": "the body did not arrive within body_timeout",
    "409": "the target is frozen by a run of another backup (retry later)",
    "413": "body over max_body_bytes, data over max_data_bytes, or batch over max_batch",
    "415": "not a CloudEvents content type",
    "422": "unknown event type, or no blueprint bound to the subject",
    "429": "the source is over its rate limit (retry after Retry-After seconds)",
    "503": "the journal could not record the event (retry)",
}


def _problem(description: str, *, batch: bool = False, **headers: Any) -> dict[str, Any]:
    problem = {"$ref": REF.format(model="Problem")}
    content: dict[str, Any] = {PROBLEM_TYPE: {"schema": problem}}
    if batch:  # a batch none of whose events was accepted: one problem per event
        content[JSON] = {"schema": {"type": "array", "items": problem}}
    answer: dict[str, Any] = {"description": description, "content": content}
    if headers:
        answer["headers"] = headers
    return answer


RETRY_AFTER = {
    "description": "seconds",
    "required": True,
    "schema": {"type": "string", "pattern": "^[1-9][0-9]*$"},
}


def _json(schema: str | dict[str, Any], description: str, **headers: Any) -> dict[str, Any]:
    """A JSON answer: a component by name, or a schema."""
    if isinstance(schema, str):
        schema = {"$ref": REF.format(model=schema)}
    answer: dict[str, Any] = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        answer["headers"] = headers
    return answer


def _one_or_batch(*answers: str) -> dict[str, Any]:
    """One event's answer (any of ``answers``), or a batch's: per event the first kind of
    answer, or a problem."""
    refs = [{"$ref": REF.format(model=model)} for model in answers]
    problem = {"$ref": REF.format(model="Problem")}
    batch = {"type": "array", "items": {"anyOf": [refs[0], problem]}}
    return {"anyOf": [*refs, batch]}


def _post_events(operation_id: str, max_batch: int) -> dict[str, Any]:
    location = {"description": "/v1/runs/{run_id}", "schema": {"type": "string"}}
    problems = {
        status: _problem(
            text,
            batch=status not in ("408", "413", "415"),
            **({"Retry-After": RETRY_AFTER} if status in ("429", "503") else {}),
        )
        for status, text in PROBLEMS.items()
    }
    return {
        "operationId": operation_id,
        "summary": "Deliver hook events (CloudEvents HTTP binding: structured, binary, batch)",
        "parameters": _event_parameters(),
        "requestBody": _request_body(max_batch),
        "responses": {
            "200": _json(
                _one_or_batch("Decision", "ReplyData"),
                "the decision (wait), the reply event (Prefer: reply, its attributes in ce-* "
                "headers), or a batch's answers",
            ),
            "202": _json(
                _one_or_batch("Accepted"),
                "accepted: the run is journaled (a batch: one entry per event)",
                Location=location,
            ),
            **problems,
        },
    }


def _handshake(operation_id: str) -> dict[str, Any]:
    return {
        "operationId": operation_id,
        "summary": "CloudEvents webhook abuse-protection handshake",
        "parameters": [
            _header("WebHook-Request-Origin", "who asks to deliver events", required=True)
        ],
        "responses": {
            "200": {
                "description": "granted",
                "headers": {
                    "WebHook-Allowed-Origin": {"schema": {"type": "string"}},
                    "WebHook-Allowed-Rate": {"schema": {"type": "string"}},
                },
            },
            "400": _problem("no WebHook-Request-Origin header"),
            "403": _problem("origin not allowed"),
        },
    }


def _get(
    operation_id: str, summary: str, responses: dict[str, Any], *parameters: dict[str, Any]
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": operation_id,
        "summary": summary,
        "responses": responses,
    }
    if parameters:
        operation["parameters"] = list(parameters)
    return {"get": operation}


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


def _paths(max_batch: int) -> dict[str, Any]:
    events = {
        "post": _post_events("postEvents", max_batch),
        "options": _handshake("eventsHandshake"),
    }
    root = {
        "post": _post_events("postEventsRoot", max_batch),
        "options": _handshake("rootHandshake"),
    }
    root["post"]["summary"] += "; the root path, for Knative and function platforms"
    return {
        "/v1/events": events,
        "/": root,
        "/v1/runs": _list_runs(),
        "/v1/runs/{run_id}": _get_run(),
        "/healthz": _get("healthz", "liveness", {"200": _json("Health", "alive")}),
        "/readyz": _get(
            "readyz",
            "readiness: recovery done, not draining",
            {"200": _json("Ready", "ready"), "503": _json("Ready", "not ready")},
        ),
        "/metrics": _get(
            "metrics",
            "Prometheus metrics",
            {"200": {"description": "text exposition", "content": {"text/plain": {}}}},
        ),
    }


def _list_runs() -> dict[str, Any]:
    return _get(
        "listRuns",
        "recent runs, newest first",
        {
            "200": _json("RunList", "runs"),
            "400": _problem("bad limit or status"),
            "401": _problem(PROBLEMS["401"]),
        },
        _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50}),
        _query("status", {"enum": [s.value for s in RunStatus]}),
    )


def _get_run() -> dict[str, Any]:
    run_id = {"name": "run_id", "in": "path", "required": True, "schema": {"type": "string"}}
    return _get(
        "getRun",
        "one run with its steps and leases",
        {
            "200": _json("RunDetail", "the run"),
            "401": _problem(PROBLEMS["401"]),
            "404": _problem("no such run"),
        },
        run_id,
    )


# Where authentication applies when it is enforced (docs/events.md#authentication).
AUTHENTICATED = [
    ("/v1/events", "post"),
    ("/", "post"),
    ("/v1/runs", "get"),
    ("/v1/runs/{run_id}", "get"),
]
SECURITY_SCHEMES = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "a token, or a Kubernetes service account token (TokenReview)",
    },
    "webhookSignature": {
        "type": "apiKey",
        "in": "header",
        "name": "webhook-signature",
        "description": "Standard Webhooks: with webhook-id and webhook-timestamp",
    },
    "clientCertificate": {"type": "mutualTLS"},
}


def _secure(doc: dict[str, Any]) -> None:
    doc["components"]["securitySchemes"] = SECURITY_SCHEMES
    for path, method in AUTHENTICATED:
        doc["paths"][path][method]["security"] = [{name: []} for name in SECURITY_SCHEMES]


def document(settings: Settings) -> dict[str, Any]:
    """The OpenAPI 3.1 document for a server with these settings."""
    schemas = component_schemas()
    schemas["CloudEvent"] = cloud_event_schema()
    doc = {
        "openapi": "3.1.0",
        "info": {
            "title": "snaphook",
            "version": "1",
            "description": "Application-consistent hooks around Kubernetes backups: "
            "CloudEvents in, hook runs and admission-style decisions out.",
        },
        "paths": _paths(settings.max_batch),
        "components": {"schemas": schemas},
    }
    if settings.auth.enforced:  # without it, declaring credentials would be untrue
        _secure(doc)
    return doc


def routes(settings: Settings) -> list[web.RouteDef]:
    body = json.dumps(document(settings)).encode()  # built once: the settings are fixed

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=JSON)

    return [web.get("/openapi.json", openapi_json)]
