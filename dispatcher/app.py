"""The aiohttp application: build the services, recover, serve, drain."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.metadata import entry_points

import aiohttp
from aiohttp import web

from dispatcher import api, auth, ingress, openapi
from dispatcher.bindings import unknown_bindings
from dispatcher.blueprint_loader import load_blueprints
from dispatcher.blueprints import BlueprintSet
from dispatcher.errors import ConfigError, EventError, JournalError
from dispatcher.invokers import Invoker
from dispatcher.invokers.factory import function_session, inprocess_invoker
from dispatcher.invokers.remote import RemoteInvoker
from dispatcher.invokers.routing import RoutingInvoker
from dispatcher.journal import Journal
from dispatcher.journal.sqlite import SQLiteJournal
from dispatcher.kube import KUBE, KubeAccess
from dispatcher.kube_bindings import binding_resolver
from dispatcher.kube_secrets import secret_resolver
from dispatcher.leases import LeaseManager
from dispatcher.limits import Limits, server_limits
from dispatcher.metrics import Metrics
from dispatcher.problems import error_response, http_error_response, problem_response
from dispatcher.queueing import LocalQueue, RunQueue
from dispatcher.replies import ReplySender
from dispatcher.runner import Runner
from dispatcher.service import Dispatcher
from dispatcher.settings import Settings
from dispatcher.state import STATE, AppState
from dispatcher.templating import TemplateEngine
from functions.sdk import FunctionRegistry, SecretResolver, default_registry

log = logging.getLogger("snaphook.app")

ENTRY_POINT_GROUP = "snaphook.functions"


def load_functions(extra_modules: list[str]) -> FunctionRegistry:
    """Import every installed function family (entry points) plus ``extra_modules``."""
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()
    for name in extra_modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"function_modules: cannot import {name!r}: {exc}") from None
    return default_registry


def check_bindings(settings: Settings, blueprints: BlueprintSet) -> None:
    """A binding to a blueprint that is not loaded is a startup error, not a 422 later."""
    problems = unknown_bindings(settings, blueprints.names())
    if problems:
        raise ConfigError("\n".join(problems))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def problems_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error answer is RFC 9457 problem+json; nothing a client sends yields a 5xx."""
    state = request.app[STATE]
    try:
        return await handler(request)
    except EventError as exc:
        if request.method == "POST":  # a mistyped run id is not a rejected event
            state.metrics.events_rejected.labels(status=str(exc.status)).inc()
        return error_response(exc)
    except JournalError:
        # Not the client's fault and worth retrying: Knative-style senders retry a 503.
        log.exception("journal unavailable", extra={"path": request.path})
        return problem_response(
            503, "Journal unavailable", "retry later", headers={"Retry-After": "1"}
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if request.method == "POST":
            state.metrics.events_rejected.labels(status=str(exc.status)).inc()
        return http_error_response(exc)
    except (asyncio.CancelledError, KeyboardInterrupt):
        raise
    except Exception:
        log.exception("unhandled error", extra={"path": request.path})
        return problem_response(500, "Internal Server Error", "see the dispatcher log")


def create_app(
    settings: Settings,
    *,
    registry: FunctionRegistry | None = None,
    secrets: SecretResolver | None = None,
) -> web.Application:
    """Build the app. Blueprints are loaded and validated here, before anything serves."""
    registry = registry if registry is not None else load_functions(settings.function_modules)
    kube = KubeAccess.when_needed(settings)  # for annotation bindings and Secrets
    secrets = secrets or secret_resolver(settings, kube)
    engine = TemplateEngine(secrets, env_allow=settings.env_allow)
    blueprints = load_blueprints(settings.hooks, registry, engine=engine)
    check_bindings(settings, blueprints)
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[problems_middleware, auth.middleware],
        # Applies to run_app and test servers alike (it overrides their keyword arguments).
        handler_args=server_limits(settings),
    )
    app.add_routes(ingress.routes())
    app.add_routes(api.routes())
    app.add_routes(openapi.routes(settings))
    auth.install(app, settings.auth)
    if kube is not None:
        app[KUBE] = kube
        app.cleanup_ctx.append(kube.lifespan)  # connects before the runs start, closes after
    app.cleanup_ctx.append(_lifecycle(settings, registry, secrets, engine, blueprints))
    return app


def _lifecycle(
    settings: Settings,
    registry: FunctionRegistry,
    secrets: SecretResolver,
    engine: TemplateEngine,
    blueprints: BlueprintSet,
) -> Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            journal, queue = open_backend(settings)
            await journal.open()
            stack.push_async_callback(journal.close)
            http = function_session(settings)
            stack.push_async_callback(http.close)
            # Function hosts are operator configuration too: their own sessions.
            remote = RemoteInvoker.from_settings(settings)
            stack.push_async_callback(remote.close)
            # The reply sink is operator configuration (often an in-cluster, private
            # address), not blueprint input: it goes out on its own, unguarded session.
            sink_http = aiohttp.ClientSession(trust_env=False)
            stack.push_async_callback(sink_http.close)
            state = _build(
                app, settings, registry, secrets, engine, blueprints, journal, queue, http, remote
            )
            if settings.sink_url:
                state.replies = ReplySender(
                    settings.sink_url,
                    sink_http,
                    state.metrics,
                    source=settings.reply_source,
                    attempts=settings.reply_attempts,
                )
                state.runner.on_final = state.replies.on_final
            stack.push_async_callback(_stop, state, settings)
            resumed = await queue.start(state.runner)
            # Releases left half-done by a crash may call slow functions: not before serving.
            state.background.append(asyncio.create_task(state.leases.recover()))
            state.background.append(
                asyncio.create_task(state.leases.run_reaper(settings.lease_reap_interval))
            )
            state.ready = True
            log.info(
                "snaphook ready",
                extra={"blueprints": blueprints.names(), "resumed_runs": resumed},
            )
            yield

    return lifecycle


def open_backend(settings: Settings) -> tuple[Journal, RunQueue]:
    """The journal and run queue chosen by ``settings.backend`` (unopened)."""
    if settings.backend == "nats":
        # Imported here: a SQLite deployment never loads the NATS client.
        from dispatcher.journal.nats import NatsJournal
        from dispatcher.nats_queue import NatsQueue, QueueConfig

        journal = NatsJournal(
            settings.nats_url, prefix=settings.nats_prefix, replicas=settings.nats_replicas
        )
        return journal, NatsQueue(journal, QueueConfig.from_settings(settings))
    return (
        SQLiteJournal(settings.journal_path, synchronous=settings.journal_sync),
        LocalQueue(),
    )


def _build(
    app: web.Application,
    settings: Settings,
    registry: FunctionRegistry,
    secrets: SecretResolver,
    engine: TemplateEngine,
    blueprints: BlueprintSet,
    journal: Journal,
    queue: RunQueue,
    http: aiohttp.ClientSession,
    remote: Invoker,
) -> AppState:
    metrics = Metrics()
    local = inprocess_invoker(settings, registry, secrets, http)
    invoker = RoutingInvoker(local, remote, settings.remote_functions)
    leases = LeaseManager(journal, invoker, engine, registry, metrics)
    runner = Runner(
        journal,
        invoker,
        leases,
        engine,
        lambda: blueprints,
        metrics,
        max_concurrent=settings.max_concurrent_runs,
    )
    resolver = binding_resolver(settings, app.get(KUBE), lambda: blueprints)
    dispatcher = Dispatcher(journal, runner, resolver, lambda: blueprints, metrics, queue)
    state = AppState(settings, blueprints, journal, runner, leases, dispatcher, metrics)
    state.limits = Limits.from_settings(settings)
    app[STATE] = state
    return state


async def _stop(state: AppState, settings: Settings) -> None:
    """Drain: stop being ready, let runs finish (grace), stop background work, flush replies."""
    state.ready = False
    await state.dispatcher.queue.close(settings.shutdown_grace)
    for task in state.background:
        task.cancel()
    await asyncio.gather(*state.background, return_exceptions=True)
    if state.replies is not None:
        await state.replies.close()
