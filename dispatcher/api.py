"""Read-only HTTP API: runs, health, readiness, metrics."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dispatcher.errors import EventError
from dispatcher.journal import LeaseRecord, RunRecord, RunStatus, StepRecord
from dispatcher.redaction import MASK, redactor
from dispatcher.state import STATE

MAX_LIMIT = 1000


def run_json(run: RunRecord) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "status": run.status.value,
        "allowed": run.allowed,
        "reason": run.reason,
        "blueprint": run.blueprint,
        "type": run.type,
        "subject": run.subject,
        "source": run.source,
        "event_id": run.event_id,
        "failure_policy": run.failure_policy,
        "created_at": run.created_at,
        "updated_at": run.updated_at,
    }


def step_json(step: StepRecord) -> dict[str, Any]:
    duration = None
    if step.started_at is not None and step.finished_at is not None:
        duration = round(step.finished_at - step.started_at, 6)
    return {
        "name": step.name,
        "function": step.function,
        "status": step.status.value,
        "attempts": step.attempts,
        "started_at": step.started_at,
        "finished_at": step.finished_at,
        "duration": duration,
        "outputs": step.outputs,
        "error": step.error,
    }


def lease_json(lease: LeaseRecord) -> dict[str, Any]:
    return {
        "lease_id": lease.lease_id,
        "step": lease.step,
        "target": lease.target,
        "status": lease.status.value,
        "release_function": lease.release_function,
        "expires_at": lease.expires_at,
        "released_at": lease.released_at,
        "released_by": lease.released_by,
        "error": lease.error,
        "release_outputs": lease.release_outputs,
    }


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", "50")
    # isdigit() alone admits "²" and 5000-digit strings, which int() refuses (a 500).
    value = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 10 else 0
    if not 1 <= value <= MAX_LIMIT:
        raise EventError(
            400, "Invalid query", f"limit must be an integer 1..{MAX_LIMIT}", field="limit"
        )
    return value


def _status(request: web.Request) -> RunStatus | None:
    raw = request.query.get("status")
    if raw is None:
        return None
    try:
        return RunStatus(raw)
    except ValueError:
        allowed = ", ".join(s.value for s in RunStatus)
        raise EventError(
            400, "Invalid query", f"status must be one of {allowed}", field="status"
        ) from None


async def list_runs(request: web.Request) -> web.Response:
    state = request.app[STATE]
    runs = await state.journal.list_runs(limit=_limit(request), status=_status(request))
    return web.json_response({"runs": [run_json(r) for r in runs]})


async def get_run(request: web.Request) -> web.Response:
    state = request.app[STATE]
    run_id = request.match_info["run_id"]
    run = await state.journal.get_run(run_id)
    if run is None:
        raise EventError(404, "Not Found", f"no run {run_id[:80]!r}", field="run_id")
    steps = await state.journal.get_steps(run_id)
    leases = await state.journal.find_leases(run_id=run_id)
    blueprint = state.blueprints.get(run.blueprint)
    # Without the blueprint nobody can tell which params are secret: show none of them.
    params = (
        blueprint.masked_params(run.params)
        if blueprint is not None
        else dict.fromkeys(run.params, MASK)
    )
    body = run_json(run) | {
        "event": run.event,
        "params": params,
        "steps": [step_json(s) for s in steps],
        "leases": [lease_json(lease) for lease in leases],
    }
    # Whatever else a known secret slipped into, the one redaction path masks it.
    return web.json_response(redactor.redact_obj(body))


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not state.ready:
        return web.json_response({"status": "not ready"}, status=503)
    return web.json_response({"status": "ready", "blueprints": state.blueprints.names()})


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = generate_latest(state.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def routes() -> list[web.RouteDef]:
    return [
        web.get("/v1/runs", list_runs),
        web.get("/v1/runs/{run_id}", get_run),
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
        web.get("/metrics", metrics),
    ]
