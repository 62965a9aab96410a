"""``snaphook`` command line: serve, function serve, emit, validate, plan, runs, auth.

Exit codes: 0 success / allowed, 1 denied / failed / invalid, 2 usage or transport error.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from dispatcher.errors import ConfigError, SnaphookError
from dispatcher.settings import Settings

if TYPE_CHECKING:  # imported lazily below, like the other command modules
    from dispatcher.auth import ClientCredentials


def fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"snaphook: {message}", err=True)
    sys.exit(code)


def load_settings(config: Path | None, **overrides: Any) -> Settings:
    try:
        return Settings.load(config, **overrides)
    except SnaphookError as exc:
        fail(str(exc))


config_option = click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="SNAPHOOK_CONFIG",
    help="YAML config file (settings and bindings).",
)
hooks_option = click.option(
    "--hooks",
    type=click.Path(path_type=Path),
    default=None,
    help="Blueprint directory (default: hooks/).",
)
_pem = click.Path(path_type=Path, dir_okay=False, exists=True)
# Secrets are best passed in the environment: command lines are visible to other users.
_credential_options = [
    click.option("--token", envvar="SNAPHOOK_TOKEN", help="Bearer token [SNAPHOOK_TOKEN]."),
    click.option(
        "--webhook-secret",
        envvar="SNAPHOOK_WEBHOOK_SECRET",
        help="Sign with this whsec_ secret (Standard Webhooks) [SNAPHOOK_WEBHOOK_SECRET].",
    ),
    click.option("--cert", type=_pem, help="Client certificate (PEM), for mTLS."),
    click.option("--key", type=_pem, help="Private key of --cert (if not in the same file)."),
    click.option("--cacert", type=_pem, help="CA that signed the dispatcher's certificate."),
]


def credential_options(command: Any) -> Any:
    for option in reversed(_credential_options):
        command = option(command)
    return command


def credentials_of(options: dict[str, Any]) -> ClientCredentials:
    """Take the credential options out of ``options``; bad ones end the command (exit 2)."""
    from dispatcher.auth import ClientCredentials
    from dispatcher.principals import webhook_key

    names = ("token", "webhook_secret", "cert", "key", "cacert")
    credentials = ClientCredentials(**{name: options.pop(name) for name in names})
    if credentials.key is not None and credentials.cert is None:
        fail("--key needs --cert")
    try:
        if credentials.webhook_secret is not None:
            webhook_key(credentials.webhook_secret)
        credentials.ssl_context()
    except (ValueError, SnaphookError) as exc:
        fail(str(exc))
    return credentials


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """snaphook: application-consistent hooks around Kubernetes backups."""


@main.command()
@click.option("--host", default=None, help="Address to listen on (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default 8080).")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None)
@click.option("--tls-cert", type=_pem, default=None, help="Serve HTTPS with this certificate.")
@click.option("--tls-key", type=_pem, default=None, help="Private key of --tls-cert.")
@click.option("--tls-client-ca", type=_pem, default=None, help="Require client certs (mTLS).")
@click.option(
    "--backend",
    type=click.Choice(["sqlite", "nats"]),
    default=None,
    help="sqlite (one process, default) or nats (replicas, docs/scale-out.md).",
)
@click.option("--nats-url", default=None, help="NATS server(s), comma-separated.")
@click.option("--nats-prefix", default=None, help="Names of the streams and buckets.")
@hooks_option
@config_option
def serve(
    host: str | None,
    port: int | None,
    state_dir: Path | None,
    hooks: Path | None,
    config: Path | None,
    backend: str | None,
    nats_url: str | None,
    nats_prefix: str | None,
    **tls: Path | None,
) -> None:
    """Run the dispatcher (embedded SQLite journal in the state directory, or NATS)."""
    from dispatcher.app import create_app
    from dispatcher.logs import configure_logging
    from dispatcher.tls import serving_context

    settings = load_settings(
        config,
        host=host,
        port=port,
        state_dir=state_dir,
        hooks=hooks,
        backend=backend,
        nats_url=nats_url,
        nats_prefix=nats_prefix,
        **tls,
    )
    stop_logging = configure_logging(settings.log_level, background=True)
    try:
        app = create_app(settings)
        ssl_context = serving_context(settings)
    except SnaphookError as exc:
        stop_logging()
        fail(str(exc), 1)
    problem = None
    try:
        _run(app, settings, ssl_context)
    except ConfigError as exc:  # found while starting, e.g. no Kubernetes access: no traceback
        problem = str(exc)
    finally:
        stop_logging()
    if problem is not None:
        fail(problem, 1)


def _run(app: Any, settings: Settings, ssl_context: Any = None) -> None:
    from aiohttp import web

    scheme = "https" if ssl_context is not None else "http"
    # run_app handles SIGTERM/SIGINT: stop accepting, then the app's cleanup drains runs.
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        ssl_context=ssl_context,
        access_log=None,
        print=lambda _: click.echo(
            f"snaphook serving on {scheme}://{settings.host}:{settings.port}", err=True
        ),
        shutdown_timeout=settings.shutdown_grace,
    )


@main.group("function")
def function_group() -> None:
    """Serve hook functions to remote dispatchers (docs/function-host.md)."""


@function_group.command("serve")
@click.option(
    "--functions",
    envvar="SNAPHOOK_FUNCTIONS",
    default="",
    help="Comma-separated families, names or patterns to serve (default: all installed).",
)
@click.option("--host", default=None, help="Address to listen on (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default $PORT, else 8080).")
@config_option
def function_serve(functions: str, host: str | None, port: int | None, config: Path | None) -> None:
    """Serve functions as CloudEvents endpoints: POST / or /functions/<name>."""
    from dispatcher.app import load_functions
    from dispatcher.function_host import create_function_host, select_functions, serve
    from dispatcher.logs import configure_logging
    from dispatcher.tls import serving_context

    settings = load_settings(config, host=host, port=port)
    stop_logging = configure_logging(settings.log_level, background=True)
    try:
        selection = [entry.strip() for entry in functions.split(",") if entry.strip()]
        served = select_functions(load_functions(settings.function_modules), selection)
        app = create_function_host(settings, served)
        ssl_context = serving_context(settings)
    except SnaphookError as exc:
        stop_logging()
        fail(str(exc), 1)
    try:
        asyncio.run(
            serve(
                app, settings, ssl_context=ssl_context, announce=lambda m: click.echo(m, err=True)
            )
        )
    finally:
        stop_logging()


@main.command()
@click.argument("directory", type=click.Path(path_type=Path), required=False)
@config_option
def validate(directory: Path | None, config: Path | None) -> None:
    """Validate every blueprint (and the config's bindings); one line per problem."""
    from dispatcher.commands import validate_all

    settings = load_settings(config, hooks=directory)
    problems = validate_all(settings)
    for problem in problems:
        click.echo(problem, err=True)
    if problems:
        sys.exit(1)
    click.echo(f"ok: {settings.hooks}")


@main.command()
@click.option(
    "--functions",
    "function_names",
    help="Comma-separated functions, or 'all' (default: those the blueprints call).",
)
@click.option(
    "--namespace",
    "namespaces",
    multiple=True,
    help="Grant the functions' rules in this namespace only (repeatable, or a,b).",
)
@click.option(
    "--service-account",
    default="snaphook:snaphook",
    show_default=True,
    help="namespace:name the roles are bound to.",
)
@click.option("--name", default="snaphook", show_default=True, help="Prefix of role names.")
@click.option("--no-dispatcher", is_flag=True, help="Only the functions' rules (function hosts).")
@hooks_option
@config_option
def rbac(
    function_names: str | None,
    namespaces: tuple[str, ...],
    service_account: str,
    name: str,
    no_dispatcher: bool,
    hooks: Path | None,
    config: Path | None,
) -> None:
    """Print least-privilege Kubernetes RBAC (roles and bindings) as YAML."""
    from dispatcher.app import load_functions
    from dispatcher.rbac import rbac_manifests, select_functions, to_yaml

    account_namespace, _, account = service_account.partition(":")
    if not account_namespace or not account:
        fail("--service-account must be namespace:name")
    settings = load_settings(config, hooks=hooks)
    try:
        registry = load_functions(settings.function_modules)
        functions = select_functions(
            settings, registry, function_names, dispatcher=not no_dispatcher
        )
    except SnaphookError as exc:
        fail(str(exc), 1)
    manifests = rbac_manifests(
        settings,
        functions,
        namespaces=[n.strip() for item in namespaces for n in item.split(",") if n.strip()],
        service_account=(account_namespace, account),
        name=name,
        include_dispatcher=not no_dispatcher,
    )
    for warning in manifests.warnings:
        click.echo(f"snaphook: warning: {warning}", err=True)
    click.echo(to_yaml(manifests.documents), nl=False)


@main.command()
@click.option("--event", "event_file", type=click.File("r"), help="CloudEvent JSON file.")
@click.option("--type", "event_type", help="Event type, e.g. backup.pre.")
@click.option("--subject", help="namespace/kind/name")
@click.option("--data", help="Event data JSON (default: a generated backup reference).")
@click.option("--blueprint", help="Plan this blueprint instead of resolving the binding.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@hooks_option
@config_option
def plan(
    event_file: Any,
    event_type: str | None,
    subject: str | None,
    data: str | None,
    blueprint: str | None,
    as_json: bool,
    hooks: Path | None,
    config: Path | None,
) -> None:
    """Print the step DAG an event would run, without running anything."""
    from dispatcher.commands import plan_for

    settings = load_settings(config, hooks=hooks)
    if event_file is not None:
        document = _json_arg(event_file.read(), "--event")
    elif event_type and subject:
        document = build_event(event_type, subject, _data_arg(data, event_type))
    else:
        fail("give --event FILE, or --type and --subject")
    try:
        result = asyncio.run(plan_for(settings, document, blueprint))
    except SnaphookError as exc:
        fail(str(exc), 1)
    from dispatcher.planner import format_plan

    click.echo(json.dumps(result.to_json(), indent=2) if as_json else format_plan(result))


def _json_arg(text: str, option: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        fail(f"{option}: not valid JSON: {exc}")


def _data_arg(data: str | None, event_type: str, **given: Any) -> dict[str, Any]:
    if data is not None:
        value = _json_arg(data, "--data")
        if not isinstance(value, dict):
            fail("--data must be a JSON object")
        return value
    # A generated id starts with the backup name (velero-3f2a…), so runs stay recognisable.
    prefix = (given.get("backup_name") or "manual")[:200]
    backup_id = given.get("backup_id") or f"{prefix}-{uuid.uuid4().hex[:12]}"
    result: dict[str, Any] = {
        "backup": {"name": given.get("backup_name") or backup_id, "id": backup_id}
    }
    if event_type.endswith(".post"):
        result["outcome"] = given.get("outcome") or "succeeded"
    return result


def build_event(
    event_type: str,
    subject: str,
    data: dict[str, Any],
    *,
    source: str | None = None,
    event_id: str | None = None,
) -> dict[str, Any]:
    full_type = event_type if event_type.startswith("io.") else f"io.snaphook.{event_type}"
    return {
        "specversion": "1.0",
        "id": event_id or uuid.uuid4().hex,
        "source": source or "snaphook-cli",
        "type": full_type,
        "subject": subject,
        "datacontenttype": "application/json",
        "data": data,
    }


@main.command()
@click.option("--type", "event_type", required=True, help="backup.pre, backup.post, ...")
@click.option(
    "--subject",
    required=True,
    envvar="SNAPHOOK_SUBJECT",
    help="namespace/kind/name [SNAPHOOK_SUBJECT]",
)
@click.option("--data", help="Event data JSON object.")
@click.option("--backup-name", help="data.backup.name (when --data is not given).")
@click.option("--backup-id", help="data.backup.id (when --data is not given).")
@click.option(
    "--follow-pre",
    is_flag=True,
    help="Post events: reuse data.backup of the newest pre run of this subject and source "
    "(for platforms that cannot pass one backup id to both hooks).",
)
@click.option("--outcome", type=click.Choice(["succeeded", "failed", "partial"]))
@click.option(
    "--source",
    default="snaphook-cli",
    show_default=True,
    envvar="SNAPHOOK_SOURCE",
    help="CloudEvents source: the platform instance [SNAPHOOK_SOURCE].",
)
@click.option("--id", "event_id", help="Event id (default: random). Same id = same run.")
@click.option(
    "--url",
    default="http://127.0.0.1:8080/v1/events",
    show_default=True,
    envvar="SNAPHOOK_URL",
    help="Events endpoint, or the dispatcher's base URL [SNAPHOOK_URL].",
)
@click.option("--wait", type=float, help="Wait up to S seconds for the decision.")
@click.option("--mode", type=click.Choice(["structured", "binary"]), default="structured")
@click.option("--timeout", type=float, default=None, help="HTTP timeout (default wait + 10 s).")
@credential_options
def emit(**options: Any) -> None:
    """Send one hook event; with --wait, exit 0 if allowed, 1 if denied."""
    from dispatcher.commands import send_event

    credentials = credentials_of(options)
    if options["follow_pre"]:
        options.update(_followed_backup(options, credentials))
    data = _data_arg(
        options["data"],
        options["event_type"],
        backup_name=options["backup_name"],
        backup_id=options["backup_id"],
        outcome=options["outcome"],
    )
    event = build_event(
        options["event_type"],
        options["subject"],
        data,
        source=options["source"],
        event_id=options["event_id"],
    )
    code, body = asyncio.run(
        send_event(
            options["url"],
            event,
            wait=options["wait"],
            mode=options["mode"],
            timeout=options["timeout"],
            credentials=credentials,
        )
    )
    click.echo(json.dumps(body, indent=2) if not isinstance(body, str) else body)
    sys.exit(code)


def _followed_backup(options: dict[str, Any], credentials: ClientCredentials) -> dict[str, str]:
    """backup_name/backup_id of the pre run that ``emit --follow-pre`` follows."""
    from dispatcher.commands import backup_of_pre

    full_type = build_event(options["event_type"], options["subject"], {})["type"]
    if not full_type.endswith(".post"):
        fail("--follow-pre is for post events: it reuses the backup of their pre event")
    if options["data"] or options["backup_id"] or options["backup_name"]:
        fail(
            "--follow-pre takes data.backup from the pre run: drop --data/--backup-id/--backup-name"
        )
    backup = asyncio.run(
        backup_of_pre(
            options["url"],
            pre_type=full_type.removesuffix(".post") + ".pre",
            subject=options["subject"],
            source=options["source"],
            credentials=credentials,
        )
    )
    return {"backup_name": backup["name"], "backup_id": backup["id"]}


@main.group()
def runs() -> None:
    """Inspect runs through a running dispatcher's API."""


url_option = click.option(
    "--url",
    default="http://127.0.0.1:8080",
    show_default=True,
    envvar="SNAPHOOK_URL",
    help="The dispatcher's base URL [SNAPHOOK_URL].",
)


@runs.command("ls")
@url_option
@click.option("--status", type=click.Choice(["accepted", "running", "succeeded", "failed"]))
@click.option("--limit", type=int, default=20, show_default=True)
@credential_options
def runs_ls(url: str, status: str | None, limit: int, **options: Any) -> None:
    """List recent runs, newest first."""
    from dispatcher.commands import api_base, api_get, format_runs

    query = f"?limit={limit}" + (f"&status={status}" if status else "")
    body = asyncio.run(api_get(f"{api_base(url)}/v1/runs{query}", credentials_of(options)))
    click.echo(format_runs(body.get("runs", [])))


@runs.command("show")
@click.argument("run_id")
@url_option
@credential_options
def runs_show(run_id: str, url: str, **options: Any) -> None:
    """Show one run with its steps and leases (JSON)."""
    from dispatcher.commands import api_base, api_get

    body = asyncio.run(api_get(f"{api_base(url)}/v1/runs/{run_id}", credentials_of(options)))
    click.echo(json.dumps(body, indent=2))


@main.group("auth")
def auth_group() -> None:
    """Make credentials for the config file's auth.principals."""


@auth_group.command("hash-token")
def hash_token_command() -> None:
    """Print the SHA-256 (bearer_sha256 entry) of a token read from stdin."""
    from dispatcher.principals import hash_token

    token = sys.stdin.read().strip()
    if not token:
        fail("no token on stdin")
    click.echo(hash_token(token))


@auth_group.command("new-token")
def new_token_command() -> None:
    """Print a new random token on stdout, and its bearer_sha256 entry on stderr."""
    import secrets

    from dispatcher.principals import hash_token

    token = secrets.token_urlsafe(32)
    click.echo(token)
    click.echo(f"bearer_sha256: {hash_token(token)}", err=True)


@auth_group.command("new-webhook-secret")
def new_webhook_secret_command() -> None:
    """Print a new Standard Webhooks secret (whsec_ + 32 random bytes, base64)."""
    import base64
    import secrets

    from dispatcher.principals import WHSEC_PREFIX

    click.echo(WHSEC_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode())
