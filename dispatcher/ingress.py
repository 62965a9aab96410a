"""CloudEvents HTTP ingress: ``POST /v1/events`` and ``POST /`` (Knative, cloud functions).

Modes per the HTTP binding (see :mod:`dispatcher.cehttp`); answers:

* async (default): ``202 {"run_id", "status"}`` with ``Location: /v1/runs/{id}``;
* sync, ``?wait=S`` or ``Prefer: wait=S``: ``200 {"allowed", "reason", "run_id", "steps"}``
  once the phase is decided (or the binding's failure_policy decides on timeout);
* ``Prefer: reply``: ``200`` carrying the run's reply CloudEvent (binary mode) when the run
  finishes in time;
* batch mode: a JSON array, one entry per event.

The run is in the journal before any 2xx leaves. Status codes follow Knative's data-plane
table so senders retry only what is worth retrying: 400/413/415/422 are final; 408, 409
(target frozen), 429 (rate limit, see :mod:`dispatcher.limits`) and 503 are not.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from dispatcher.auth import AUTH, Caller
from dispatcher.bodies import read_body
from dispatcher.cehttp import (
    Mode,
    ParsedEvent,
    parse_request,
    to_binary_message,
    webhook_options_response,
)
from dispatcher.durations import parse_duration
from dispatcher.errors import EventError
from dispatcher.events import hook_event_from
from dispatcher.problems import problem_of
from dispatcher.replies import reply_event
from dispatcher.state import STATE, AppState

# Statuses a sender should retry (Knative's contract), most urgent first.
RETRYABLE = (503, 429, 409)


@dataclass(frozen=True)
class Preferences:
    wait: float | None  # seconds to wait for the decision; None = answer at once (async)
    reply: bool  # the caller wants the reply event in the response


def _parse_wait(raw: str, field: str, cap: float) -> float:
    """Seconds (``30``, ``2.5``) or a duration (``30s``, ``1m``), capped at ``max_wait``."""
    try:
        value = parse_duration(raw)
    except ValueError:
        raise EventError(
            400,
            "Invalid wait",
            f"{field} must be seconds >= 0 or a duration like 30s, got {raw[:40]!r}",
            field=field,
        ) from None
    return min(value, cap)


def preferences(request: web.Request, cap: float) -> Preferences:
    """Read ``Prefer`` (RFC 7240: unordered, parameters after ``;`` ignored) and ``?wait=``.

    ``?wait=`` wins over ``Prefer: wait=``. ``respond-async`` alone means answer at once;
    beside ``wait`` it means "wait that long, then answer" — which is what waiting does.
    """
    prefs: dict[str, str] = {}
    for header in request.headers.getall("Prefer", []):
        for token in header.split(","):
            name, _, value = token.split(";", 1)[0].partition("=")
            if name.strip():
                prefs[name.strip().lower()] = value.strip().strip('"')
    wait: float | None = None
    if prefs.get("wait"):
        wait = _parse_wait(prefs["wait"], "Prefer: wait", cap)
    if "wait" in request.query:
        wait = _parse_wait(request.query["wait"], "wait", cap)
    return Preferences(wait=wait, reply="reply" in prefs)


async def post_events(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    gate = request.app[AUTH]
    gate.require_credentials(request)  # none at all: 401 before the body is read
    settings = state.settings
    body = await read_body(request, limit=settings.max_body_bytes, timeout=settings.body_timeout)
    # Before parsing: a caller without valid credentials learns nothing but 401.
    caller = await gate.authenticate(request, body)
    prefs = preferences(request, settings.max_wait)
    parsed = parse_request(request.raw_headers, body, max_batch=settings.max_batch)
    if parsed.mode is Mode.BATCH:
        return await _batch(state, parsed.events, prefs, caller)
    entry = await _one(state, parsed.events[0], prefs, caller)
    if prefs.reply:
        replied = await _reply(state, entry["run_id"], prefs)
        if replied is not None:
            return replied
    if prefs.wait is not None:
        return web.json_response(entry)
    return web.json_response(entry, status=202, headers={"Location": f"/v1/runs/{entry['run_id']}"})


async def _one(
    state: AppState, parsed: ParsedEvent, prefs: Preferences, caller: Caller
) -> dict[str, Any]:
    state.limits.check_data(parsed.data)  # depth and size, before pydantic reads it
    event = hook_event_from(parsed.attributes, parsed.data)
    caller.authorize(event)  # 401/403 for this event; nothing is journaled yet
    # After authorize: a caller cannot spend the tokens of a source it may not send for.
    state.limits.check_rate(event.source)
    accepted = await state.dispatcher.accept(event)
    if prefs.wait is None:
        return {"run_id": accepted.run.run_id, "status": accepted.run.status.value}
    return await state.dispatcher.decision(accepted.run, prefs.wait)


async def _batch(
    state: AppState, events: list[ParsedEvent], prefs: Preferences, caller: Caller
) -> web.Response:
    async def settle(parsed: ParsedEvent) -> dict[str, Any]:
        try:
            return await _one(state, parsed, prefs, caller)
        except EventError as exc:
            state.metrics.events_rejected.labels(status=str(exc.status)).inc()
            return problem_of(exc)

    # Events are independent: one bad event neither blocks nor undoes the others.
    results = list(await asyncio.gather(*(settle(p) for p in events)))
    status = 200 if prefs.wait is not None else 202
    headers: dict[str, str] = {}
    if results and all("run_id" not in r for r in results):
        statuses = {int(r["status"]) for r in results}
        # Nothing accepted: answer so the sender retries if any of it is worth retrying.
        status = next((s for s in RETRYABLE if s in statuses), min(statuses))
        if status == 429:
            retry = max(int(r.get("retry_after", 1)) for r in results if r["status"] == 429)
            headers["Retry-After"] = str(retry)
    return web.json_response(results, status=status, headers=headers)


async def _reply(state: AppState, run_id: str, prefs: Preferences) -> web.Response | None:
    wait = prefs.wait if prefs.wait is not None else state.settings.reply_wait
    run = await state.runner.wait_final(run_id, wait)
    if run is None or not run.status.final:
        return None
    steps = await state.journal.get_steps(run_id)
    headers, body = to_binary_message(*reply_event(run, steps, state.settings.reply_source))
    headers["Preference-Applied"] = "reply"
    return web.Response(status=200, body=body, headers=headers)


async def options_events(request: web.Request) -> web.Response:
    """The CloudEvents webhook abuse-protection handshake."""
    state = request.app[STATE]
    status, headers = webhook_options_response(
        request.headers, state.settings.webhook_allowed_origins
    )
    if status == 400:
        raise EventError(
            400,
            "Missing WebHook-Request-Origin",
            "the webhook validation handshake needs a WebHook-Request-Origin header",
            field="WebHook-Request-Origin",
            headers=headers,
        )
    if status == 403:
        raise EventError(
            403,
            "Origin not allowed",
            "this WebHook-Request-Origin may not deliver events here",
            field="WebHook-Request-Origin",
            headers=headers,
        )
    return web.Response(status=status, headers=headers)


def routes() -> list[web.RouteDef]:
    return [
        web.post("/v1/events", post_events),
        web.options("/v1/events", options_events),
        web.post("/", post_events),
        web.options("/", options_events),
    ]
