"""What the CLI commands do, apart from argument parsing."""

from __future__ import annotations

import sys
from typing import Any

import aiohttp

from dispatcher.auth import ClientCredentials
from dispatcher.bindings import ConfigBindingResolver, unknown_bindings
from dispatcher.blueprint_loader import load_blueprints
from dispatcher.blueprints import BlueprintErrors
from dispatcher.cehttp import encode_event
from dispatcher.errors import BlueprintError, EventError, SnaphookError
from dispatcher.events import hook_event_from
from dispatcher.planner import Plan, make_plan
from dispatcher.secrets import EnvSecretResolver
from dispatcher.settings import Settings
from dispatcher.templating import TemplateEngine


def _functions(settings: Settings) -> Any:
    from dispatcher.app import load_functions

    return load_functions(settings.function_modules)


def validate_all(settings: Settings) -> list[str]:
    """Every problem in the blueprints and the bindings, one message each."""
    registry = _functions(settings)
    engine = TemplateEngine(EnvSecretResolver())
    try:
        blueprints = load_blueprints(settings.hooks, registry, engine=engine)
    except BlueprintErrors as exc:
        return [str(e) for e in exc.errors]
    except BlueprintError as exc:
        return [str(exc)]
    return unknown_bindings(settings, blueprints.names())


async def plan_for(settings: Settings, document: Any, blueprint_name: str | None) -> Plan:
    if not isinstance(document, dict) or "data" not in document:
        raise SnaphookError("the event must be a structured CloudEvent JSON object with data")
    registry = _functions(settings)
    blueprints = load_blueprints(
        settings.hooks, registry, engine=TemplateEngine(EnvSecretResolver())
    )
    attributes = {k: v for k, v in document.items() if k != "data"}
    try:
        event = hook_event_from(attributes, document["data"])
    except (EventError, KeyError) as exc:
        raise SnaphookError(f"invalid event: {exc}") from None
    binding = await ConfigBindingResolver(settings.bindings).resolve(event)
    name = blueprint_name or (binding.blueprint if binding else None)
    if name is None:
        raise SnaphookError(f"no blueprint is bound to {event.subject}; use --blueprint")
    blueprint = blueprints.get(name)
    if blueprint is None:
        raise SnaphookError(f"blueprint {name!r} is not loaded from {settings.hooks}")
    try:
        params = blueprint.resolve_params(
            {**(binding.params if binding else {}), **event.data.params}
        )
    except ValueError as exc:
        raise SnaphookError(f"invalid params: {exc}") from None
    return make_plan(
        blueprint,
        event.phase,
        params=params,
        failure_policy=binding.failure_policy if binding else "fail",
        timeout=binding.timeout if binding else 30.0,
    )


async def send_event(
    url: str,
    event: dict[str, Any],
    *,
    wait: float | None,
    mode: str,
    timeout: float | None,
    credentials: ClientCredentials | None = None,
) -> tuple[int, Any]:
    """POST one event; returns (exit code, answer). 0 allowed/accepted, 1 denied, 2 error."""
    credentials = credentials or ClientCredentials()
    headers, body = encode_event(event, mode)
    headers.update(credentials.headers(body))  # a signature covers the exact body sent
    params = {"wait": f"{wait:g}"} if wait is not None else {}
    client_timeout = aiohttp.ClientTimeout(total=timeout or (wait or 0) + 10)
    try:
        async with (
            aiohttp.ClientSession(timeout=client_timeout) as session,
            session.post(
                url, data=body, headers=headers, params=params, ssl=credentials.ssl_context()
            ) as resp,
        ):
            answer = await _answer(resp)
            status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        print(f"snaphook: cannot reach {url}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2, {"error": str(exc) or type(exc).__name__}
    if status >= 300:
        detail = answer.get("detail", answer) if isinstance(answer, dict) else answer
        print(f"snaphook: {url} answered {status}: {detail}", file=sys.stderr)
        return 2, answer
    if wait is not None and isinstance(answer, dict):
        return (0 if answer.get("allowed") else 1), answer
    return 0, answer


def api_base(url: str) -> str:
    """The dispatcher's base URL from an events URL (``…/v1/events`` or ``…/``)."""
    base = url.split("?", 1)[0].rstrip("/")
    return base.removesuffix("/v1/events")


# How far back --follow-pre looks: the runs API answers at most this many, newest first.
FOLLOW_WINDOW = 1000


async def backup_of_pre(
    url: str,
    *,
    pre_type: str,
    subject: str,
    source: str,
    credentials: ClientCredentials | None = None,
) -> dict[str, str]:
    """``data.backup`` of the newest ``pre_type`` run of ``subject`` from ``source``.

    For platforms that run the pre and post hooks as separate commands and cannot hand one
    backup id to both (K10's backupPrehook/backupPosthook, Velero's pod hooks): the post
    event must carry the pre event's ``backup.id`` to release its leases. One freeze per
    target (409) keeps the newest pre run of a target the one in progress.
    """
    base = api_base(url)
    listing = await api_get(f"{base}/v1/runs?limit={FOLLOW_WINDOW}", credentials)
    for run in listing.get("runs", []):
        if (run.get("type"), run.get("subject"), run.get("source")) == (pre_type, subject, source):
            detail = await api_get(f"{base}/v1/runs/{run['run_id']}", credentials)
            backup = ((detail.get("event") or {}).get("data") or {}).get("backup")
            if isinstance(backup, dict) and backup.get("id"):
                return {"name": str(backup.get("name") or backup["id"]), "id": str(backup["id"])}
    raise SystemExit(
        _report(
            f"--follow-pre: no {pre_type} run of {subject} from source {source!r} among the "
            f"newest {FOLLOW_WINDOW} runs at {base}; send the pre event first, or give --backup-id"
        )
    )


async def _answer(resp: aiohttp.ClientResponse) -> Any:
    text = await resp.text()
    try:
        return await resp.json(content_type=None)
    except ValueError:
        return text


async def api_get(url: str, credentials: ClientCredentials | None = None) -> dict[str, Any]:
    credentials = credentials or ClientCredentials()
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.get(
                url, headers=credentials.headers(b""), ssl=credentials.ssl_context()
            ) as resp,
        ):
            body = await resp.json(content_type=None)
            if resp.status >= 300:
                raise SystemExit(_report(f"{url} answered {resp.status}: {body}"))
            return dict(body)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise SystemExit(_report(f"cannot read {url}: {type(exc).__name__}: {exc}")) from None


def _report(message: str) -> int:
    print(f"snaphook: {message}", file=sys.stderr)
    return 2


def format_runs(runs: list[dict[str, Any]]) -> str:
    if not runs:
        return "no runs"
    rows = [("RUN", "STATUS", "ALLOWED", "TYPE", "SUBJECT", "BLUEPRINT")]
    for run in runs:
        rows.append(
            (
                run["run_id"],
                run["status"],
                "-" if run["allowed"] is None else str(run["allowed"]).lower(),
                run["type"].removeprefix("io.snaphook."),
                run["subject"],
                run["blueprint"],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )
