"""``elasticsearch.*``: snapshots through Elasticsearch's snapshot API, with the official
async client.

    register_repository   make sure a snapshot repository is registered with these settings
    snapshot              start a snapshot, wait until it ends, fail unless it is SUCCESS
    restore               restore indices of a snapshot, optionally under new names

A refused request (missing repository or snapshot, bad name or settings, an index in the
way) is a :class:`PermanentError`; an unreachable node, a timeout or a 5xx is retryable.
Messages name the host, never a credential.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Annotated, Any

from elasticsearch import (
    ApiError,
    AsyncElasticsearch,
    BadRequestError,
    NotFoundError,
    SSLError,
    TransportError,
    UnsupportedProductError,
)
from pydantic import (
    AnyHttpUrl,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)

from functions.rendered import OptionalSecret, OptionalText
from functions.sdk import Context, FunctionError, PermanentError, RetryableError, function

_REQUEST_TIMEOUT = 30.0  # one API call; waiting for a snapshot is many short calls
_MARGIN = 1.0  # seconds kept back so we, not the runner's timeout, say why we stopped
_SHOWN_FAILURES = 10
_SHOWN_REASON = 300
# Errors Elasticsearch answers with a 500 that retrying cannot fix, where they can come
# up. Elsewhere a repository_exception may be a storage blip, so 5xx stay retryable.
_BAD_SETTINGS = frozenset({"repository_exception"})  # registering: e.g. "missing location"
_RESTORE_REFUSED = frozenset({"snapshot_restore_exception"})  # e.g. an open index in the way


def _index_list(value: Any) -> Any:
    """``"logs-*, metrics"`` (as a template renders it) → a list; nothing → ``None``."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",")]
    if isinstance(value, list):
        value = [part for part in value if part] or None
    return value


IndexList = Annotated[list[str] | None, BeforeValidator(_index_list)]


class Connection(BaseModel):
    """Where the cluster is, and an API key or a user and password (or neither)."""

    model_config = ConfigDict(extra="forbid")

    url: AnyHttpUrl
    api_key: OptionalSecret = None  # the encoded key (base64 of id:key), as Kibana shows it
    username: OptionalText = None
    password: OptionalSecret = None
    ca_certs: OptionalText = None  # a CA bundle file, for clusters with their own CA

    @model_validator(mode="after")
    def _one_way_to_authenticate(self) -> Connection:
        if self.api_key is not None and self.username is not None:
            raise ValueError("give api_key or username/password, not both")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        return self

    @property
    def where(self) -> str:
        """host:port, for messages (the URL may carry credentials)."""
        return f"{self.url.host}:{self.url.port}"


class RepositoryParams(Connection):
    name: str = Field(min_length=1)
    type: str = Field(min_length=1)  # fs, s3, gcs, azure, url, source, ...
    settings: dict[str, Any] = Field(default_factory=dict)
    verify: bool = True  # Elasticsearch checks that every node can write to it


class RepositoryResult(BaseModel):
    name: str
    type: str
    changed: bool  # False when it was already registered exactly so


class SnapshotParams(Connection):
    repository: str = Field(min_length=1)
    snapshot: str = Field(min_length=1)
    indices: IndexList = None  # names or patterns, a list or comma-separated; None: all
    include_global_state: bool = True  # Elasticsearch's default
    poll_interval: float = Field(default=1.0, gt=0, le=60)  # first wait; doubles each poll
    max_poll_interval: float = Field(default=15.0, gt=0, le=300)


class ShardCounts(BaseModel):
    total: int = 0
    successful: int = 0
    failed: int = 0


class SnapshotResult(BaseModel):
    repository: str
    snapshot: str
    uuid: str
    state: str
    indices: list[str]
    shards: ShardCounts
    duration_seconds: float
    resumed: bool  # an earlier attempt had started it; this one waited for it


class RestoreParams(Connection):
    repository: str = Field(min_length=1)
    snapshot: str = Field(min_length=1)
    indices: IndexList = None
    rename_pattern: OptionalText = None  # a Java regex over index names, e.g. "(.+)"
    rename_replacement: OptionalText = None  # with $1-style groups, e.g. "restored-$1"
    include_global_state: bool = False  # True would overwrite cluster-wide settings
    wait_for_completion: bool = True

    @model_validator(mode="after")
    def _rename_needs_both(self) -> RestoreParams:
        if (self.rename_pattern is None) != (self.rename_replacement is None):
            raise ValueError("rename_pattern and rename_replacement go together")
        return self


class RestoreResult(BaseModel):
    snapshot: str
    accepted: bool
    indices: list[str]  # the restored names; known only when waiting for completion
    shards: ShardCounts


@asynccontextmanager
async def _connect(
    ctx: Context, p: Connection, *, timeout: float | None = None
) -> AsyncIterator[AsyncElasticsearch]:
    """A client for one function call. It opens its own aiohttp session (the transport's
    node class owns it), so ``ctx.http`` and its outbound policy are not involved."""
    password = p.password.get_secret_value() if p.password is not None else ""
    tls: dict[str, Any] = {"ca_certs": p.ca_certs} if p.ca_certs is not None else {}
    client = AsyncElasticsearch(
        str(p.url),
        api_key=p.api_key.get_secret_value() if p.api_key is not None else None,
        basic_auth=(p.username, password) if p.username is not None else None,
        **tls,
        request_timeout=max(1.0, timeout or min(_REQUEST_TIMEOUT, ctx.remaining())),
        # The runner owns retries (backoff, attempts, the step's time); retries inside the
        # client would multiply them.
        max_retries=0,
    )
    try:
        yield client
    finally:
        await client.close()


def _describe(body: Any) -> tuple[str, str]:
    """(type, reason) of an Elasticsearch error body, with the cause when there is one."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "error", str(error if error is not None else body)[:_SHOWN_REASON]
    reason = str(error.get("reason", ""))
    cause = error.get("caused_by")
    if isinstance(cause, dict) and cause.get("reason"):
        reason += f" (caused by {cause.get('type', 'error')}: {cause['reason']})"
    return str(error.get("type", "error")), reason[: _SHOWN_REASON * 2]


def _api_failure(
    action: str, p: Connection, exc: ApiError, permanent: frozenset[str]
) -> FunctionError:
    if isinstance(exc, UnsupportedProductError):
        return PermanentError(f"{action}: {p.where} does not answer as Elasticsearch")
    status = exc.meta.status
    kind, reason = _describe(exc.body)
    message = f"{action}: Elasticsearch at {p.where} answered {status} {kind}: {reason}"
    if kind == "repository_missing_exception":
        message += " (register it first, e.g. with elasticsearch.register_repository)"
    transient = (status >= 500 or status in (408, 429)) and kind not in permanent
    return RetryableError(message) if transient else PermanentError(message)


@contextmanager
def _errors(
    action: str, p: Connection, *, permanent: frozenset[str] = frozenset()
) -> Iterator[None]:
    """Turn the client's exceptions into the runner's: permanent, or worth a retry.
    ``permanent``: error types that are permanent even with a 5xx status."""
    try:
        yield
    except ApiError as exc:
        raise _api_failure(action, p, exc, permanent) from None
    except SSLError as exc:
        # A certificate that does not verify will not start verifying on the next attempt.
        raise PermanentError(f"{action}: TLS with {p.where} failed: {exc.message}") from None
    except TransportError as exc:
        raise RetryableError(
            f"{action}: cannot reach Elasticsearch at {p.where}: {type(exc).__name__}"
        ) from None


def _setting_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


async def _registered(es: AsyncElasticsearch, name: str) -> tuple[str, dict[str, str]] | None:
    try:
        answer = await es.snapshot.get_repository(name=name)
    except NotFoundError:
        return None
    current = answer.body.get(name, {})
    settings = current.get("settings", {})
    return str(current.get("type")), {k: _setting_text(v) for k, v in settings.items()}


@function("elasticsearch.register_repository")
async def register_repository(ctx: Context, p: RepositoryParams) -> RepositoryResult:
    """Register (or update) a snapshot repository; a repository already registered with the
    same type and settings is left alone, so no verification round runs on every backup."""
    wanted = (p.type, {k: _setting_text(v) for k, v in p.settings.items()})
    async with _connect(ctx, p) as es:
        with _errors(f"register repository {p.name}", p, permanent=_BAD_SETTINGS):
            if await _registered(es, p.name) == wanted:
                return RepositoryResult(name=p.name, type=p.type, changed=False)
            await es.snapshot.create_repository(
                name=p.name, repository={"type": p.type, "settings": p.settings}, verify=p.verify
            )
    ctx.logger.info("registered snapshot repository %s (%s)", p.name, p.type)
    return RepositoryResult(name=p.name, type=p.type, changed=True)


def _same_name_exists(exc: BadRequestError) -> bool:
    kind, reason = _describe(exc.body)
    # "... snapshot with the same name already exists" / "... is already in-progress"
    return kind == "invalid_snapshot_name_exception" and "with the same name" in reason


async def _start(ctx: Context, es: AsyncElasticsearch, p: SnapshotParams) -> bool:
    """Start the snapshot; True if an earlier attempt already had (a retry must not fail
    on "already exists", it waits for that snapshot instead)."""
    try:
        await es.snapshot.create(
            repository=p.repository,
            snapshot=p.snapshot,
            indices=p.indices,
            include_global_state=p.include_global_state,
            metadata={"taken_by": "snaphook", "run_id": ctx.run_id, "step": ctx.step},
            wait_for_completion=False,  # one long request would hide progress and time out
        )
    except BadRequestError as exc:
        if not _same_name_exists(exc):
            raise
        ctx.logger.info("snapshot %s/%s exists already: waiting for it", p.repository, p.snapshot)
        return True
    return False


async def _report_progress(ctx: Context, es: AsyncElasticsearch, p: SnapshotParams) -> None:
    # The status API has per-shard progress; for a running snapshot it is cheap (cluster
    # state), unlike for a finished one, which is why it is asked only while running.
    answer = await es.snapshot.status(repository=p.repository, snapshot=p.snapshot)
    entry = (answer.body.get("snapshots") or [{}])[0]
    stats, shards = entry.get("stats", {}), entry.get("shards_stats", {})
    ctx.progress(
        int(stats.get("processed", {}).get("size_in_bytes", 0)),
        int(stats.get("total", {}).get("size_in_bytes", 0)) or None,
    )
    ctx.logger.info(
        "snapshot %s/%s: %s of %s shards done",
        p.repository,
        p.snapshot,
        shards.get("done", "?"),
        shards.get("total", "?"),
    )


async def _wait(ctx: Context, es: AsyncElasticsearch, p: SnapshotParams) -> dict[str, Any]:
    """Poll until the snapshot leaves IN_PROGRESS, backing off up to ``max_poll_interval``.

    The state comes from the get-snapshot API: the status API reports a PARTIAL snapshot
    as SUCCESS.
    """
    pause = p.poll_interval
    while True:
        answer = await es.snapshot.get(repository=p.repository, snapshot=p.snapshot)
        info: dict[str, Any] = answer.body["snapshots"][0]
        state = info.get("state")
        if state != "IN_PROGRESS":
            return info
        await _report_progress(ctx, es, p)
        nap = min(pause, ctx.remaining() - _MARGIN)
        if nap <= 0:
            raise RetryableError(
                f"snapshot {p.repository}/{p.snapshot} is still {state} as the step's time "
                "runs out; the next attempt waits for the same snapshot"
            )
        await asyncio.sleep(nap)
        pause = min(pause * 2, p.max_poll_interval)


def _shard_failures(info: dict[str, Any]) -> str:
    failures = info.get("failures") or []
    shown = [
        f"{item.get('index')}[{item.get('shard_id', item.get('shard'))}]: "
        f"{str(item.get('reason'))[:_SHOWN_REASON]}"
        for item in failures[:_SHOWN_FAILURES]
    ]
    if len(failures) > _SHOWN_FAILURES:
        shown.append(f"and {len(failures) - _SHOWN_FAILURES} more")
    return "; ".join(shown) or "none reported"


def _check_outcome(p: SnapshotParams, info: dict[str, Any]) -> None:
    state = info.get("state")
    if state == "SUCCESS":
        return
    shards = ShardCounts.model_validate(info.get("shards", {}))
    reason = f" ({str(info['reason'])[:_SHOWN_REASON]})" if info.get("reason") else ""
    raise PermanentError(
        f"snapshot {p.repository}/{p.snapshot} ended {state}{reason}: "
        f"{shards.failed} of {shards.total} shards failed: {_shard_failures(info)}"
    )


@function("elasticsearch.snapshot")
async def snapshot(ctx: Context, p: SnapshotParams) -> SnapshotResult:
    """Take a snapshot and wait for it; PARTIAL and FAILED are permanent errors naming
    each failed shard (index, shard, reason)."""
    async with _connect(ctx, p) as es:
        with _errors(f"snapshot {p.repository}/{p.snapshot}", p):
            resumed = await _start(ctx, es, p)
            info = await _wait(ctx, es, p)
    _check_outcome(p, info)
    ctx.logger.info("snapshot %s/%s: %s", p.repository, p.snapshot, info.get("state"))
    return SnapshotResult(
        repository=p.repository,
        snapshot=p.snapshot,
        uuid=str(info.get("uuid", "")),
        state=str(info.get("state")),
        indices=sorted(info.get("indices", [])),
        shards=ShardCounts.model_validate(info.get("shards", {})),
        duration_seconds=int(info.get("duration_in_millis", 0)) / 1000,
        resumed=resumed,
    )


@function("elasticsearch.restore")
async def restore(ctx: Context, p: RestoreParams) -> RestoreResult:
    """Restore indices of a snapshot, under new names if a rename pattern is given.

    Restoring onto an open index of the same name is refused by Elasticsearch (permanent):
    rename, or close or delete that index first.
    """
    # Waiting for completion is one long request: give it the step's whole remaining time.
    timeout = ctx.remaining() if p.wait_for_completion else None
    async with _connect(ctx, p, timeout=timeout) as es:
        with _errors(
            f"restore snapshot {p.repository}/{p.snapshot}", p, permanent=_RESTORE_REFUSED
        ):
            answer = await es.snapshot.restore(
                repository=p.repository,
                snapshot=p.snapshot,
                indices=p.indices,
                rename_pattern=p.rename_pattern,
                rename_replacement=p.rename_replacement,
                include_global_state=p.include_global_state,
                wait_for_completion=p.wait_for_completion,
            )
    if not p.wait_for_completion:
        accepted = bool(answer.body.get("accepted"))
        return RestoreResult(
            snapshot=p.snapshot, accepted=accepted, indices=[], shards=ShardCounts()
        )
    info = answer.body.get("snapshot", {})
    shards = ShardCounts.model_validate(info.get("shards", {}))
    if shards.failed:
        raise PermanentError(
            f"restore of {p.repository}/{p.snapshot}: {shards.failed} of {shards.total} "
            "shards failed"
        )
    indices = sorted(info.get("indices", []))
    ctx.logger.info("restored %s from %s/%s", ", ".join(indices), p.repository, p.snapshot)
    return RestoreResult(snapshot=p.snapshot, accepted=True, indices=indices, shards=shards)
