"""A test double of Elasticsearch's snapshot REST API, served over real HTTP.

No Elasticsearch server can be installed here, so the tests run the official async client
against this aiohttp app. It mirrors the documented REST API for what the client and the
``elasticsearch.*`` functions use, with Elasticsearch's answer shapes:

- ``GET /`` (version 9) and ``X-Elastic-Product: Elasticsearch`` on every answer, which the
  client's product check requires; ``compatible-with`` media types 8 or 9 only;
- ``PUT|GET /_snapshot/{repo}``: ``fs`` (``location`` under ``path.repo``) and ``s3``
  (``bucket``) repositories, settings kept as strings as Elasticsearch keeps them;
- ``PUT /_snapshot/{repo}/{snap}`` (``indices``, ``include_global_state``, ``metadata``,
  ``wait_for_completion``); every ``GET`` of it or of its ``/_status`` is one tick of time:
  it stays in progress for ``FakeCluster.polls`` ticks, then ends SUCCESS, or as
  :meth:`FakeCluster.fail_next` says (PARTIAL or FAILED, with per-shard ``failures``);
- ``POST /_snapshot/{repo}/{snap}/_restore`` (``indices``, ``rename_pattern`` and
  ``rename_replacement`` with Java's ``$1``), creating the indices; ``HEAD|GET /{index}``
  and ``GET /_cat/indices?format=json`` to look at them;
- errors shaped ``{"error": {"root_cause", "type", "reason"}, "status"}``, and API-key or
  basic authentication when configured (``security_exception``, 401).

Not modelled: documents and search, per-index detail of ``_status``, repository verification.
"""

from __future__ import annotations

import base64
import fnmatch
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

Json = dict[str, Any]
VERSION = "9.1.0"
_MEDIA = "application/vnd.elasticsearch+json;compatible-with=9"
_SHARD_BYTES = 1 << 20
_BAD_NAME_CHARS = set(' ,#\\/*?"<>|')


class EsError(Exception):
    """An error answer; raised in a handler, rendered by the middleware."""

    def __init__(self, status: int, kind: str, reason: str, **headers: str) -> None:
        super().__init__(reason)
        self.status, self.kind, self.reason, self.headers = status, kind, reason, headers

    def response(self) -> web.Response:
        cause = {"type": self.kind, "reason": self.reason}
        body = {"error": {"root_cause": [cause], **cause}, "status": self.status}
        return _json(body, self.status, self.headers)


@dataclass
class Snapshot:
    name: str
    indices: list[str]
    shards: int
    body: Json  # the create request: include_global_state, metadata
    polls: int
    outcome: str = "SUCCESS"
    failures: list[Json] = field(default_factory=list)
    uuid: str = field(default_factory=lambda: uuid.uuid4().hex[:22])
    started_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    ended_ms: int = 0
    state: str = "IN_PROGRESS"
    polled: int = 0

    def tick(self) -> None:
        self.polled += 1
        if self.state == "IN_PROGRESS" and self.polled >= self.polls:
            self.state, self.ended_ms = self.outcome, int(time.time() * 1000)

    @property
    def metadata(self) -> Json:
        return dict(self.body.get("metadata") or {})

    def info(self, repository: str) -> Json:
        done = self.state != "IN_PROGRESS"
        failed = len(self.failures) if done else 0
        info: Json = {
            "snapshot": self.name,
            "uuid": self.uuid,
            "repository": repository,
            "version": VERSION,
            "indices": self.indices,
            "include_global_state": self.body.get("include_global_state", True),
            "metadata": self.metadata,
            "state": self.state,
            "start_time_in_millis": self.started_ms,
            "failures": self.failures if done else [],
            "shards": {"total": self.shards, "failed": failed, "successful": 0},
        }
        if done:
            info["shards"]["successful"] = self.shards - failed
            info["end_time_in_millis"] = self.ended_ms
            info["duration_in_millis"] = self.ended_ms - self.started_ms
        if self.state == "FAILED":
            failed_indices = sorted({str(f["index"]) for f in self.failures})
            info["reason"] = f"Indices don't have primary shards {failed_indices}"
        return info

    def status(self, repository: str) -> Json:
        running = self.state == "IN_PROGRESS"
        done = self.shards * self.polled // self.polls if running else self.shards
        size = {"file_count": self.shards, "size_in_bytes": self.shards * _SHARD_BYTES}
        processed = {"file_count": done, "size_in_bytes": done * _SHARD_BYTES}
        # As in Elasticsearch: the status of a finished PARTIAL snapshot is SUCCESS.
        state = "STARTED" if running else ("FAILED" if self.state == "FAILED" else "SUCCESS")
        return {
            "snapshot": self.name,
            "repository": repository,
            "uuid": self.uuid,
            "state": state,
            "shards_stats": {"done": done, "total": self.shards, "started": self.shards - done},
            "stats": {"incremental": size, "processed": processed, "total": size},
        }


@dataclass
class FakeCluster:
    """The cluster's state: tests configure it, then inspect what the client did."""

    indices: dict[str, int] = field(default_factory=dict)  # open index → primary shards
    path_repo: tuple[str, ...] = ("/mnt/backups",)
    api_key: str | None = None  # when set (or basic_auth), requests must authenticate
    basic_auth: tuple[str, str] | None = None
    polls: int = 3  # ticks a snapshot stays in progress
    restore_failed_shards: int = 0
    repositories: dict[str, Json] = field(default_factory=dict)
    snapshots: dict[str, dict[str, Snapshot]] = field(default_factory=dict)
    repository_puts: int = 0
    authorizations: list[str] = field(default_factory=list)  # as received
    observed: list[tuple[str, str]] = field(default_factory=list)  # (endpoint, state answered)
    _next_outcome: tuple[str, list[Json]] | None = None

    def fail_next(self, state: str, failures: list[tuple[str, int, str]]) -> None:
        """End the next snapshot ``PARTIAL`` or ``FAILED`` with (index, shard, reason)s."""
        shaped = [
            {"index": index, "index_uuid": index, "shard_id": shard, "reason": reason}
            for index, shard, reason in failures
        ]
        self._next_outcome = state, shaped

    def add_repository(self, name: str, location: str = "/mnt/backups/repo") -> None:
        self.repositories[name] = {"type": "fs", "settings": {"location": location}}
        self.snapshots.setdefault(name, {})

    def authorization(self) -> str | None:
        """The Authorization header every request must carry; None: security is off."""
        if self.api_key is not None:
            return f"ApiKey {self.api_key}"
        if self.basic_auth is not None:
            return "Basic " + base64.b64encode(":".join(self.basic_auth).encode()).decode()
        return None

    def repository(self, name: str) -> dict[str, Snapshot]:
        if name not in self.repositories:
            raise EsError(404, "repository_missing_exception", f"[{name}] missing")
        return self.snapshots[name]

    def snapshot(self, repository: str, name: str) -> Snapshot:
        found = self.repository(repository).get(name)
        if found is None:
            raise EsError(404, "snapshot_missing_exception", f"[{repository}:{name}] is missing")
        return found

    def repository_problem(self, kind: str, settings: Json) -> str | None:
        if kind == "s3":
            return None if settings.get("bucket") else "No bucket defined for s3 repository"
        if kind != "fs":
            return f"repository type [{kind}] does not exist"
        location = str(settings.get("location", ""))
        if not location:
            return "missing location"
        if not any(location.startswith(root) for root in self.path_repo):
            return (
                f"location [{location}] doesn't match any of the locations specified by path.repo"
            )
        return None

    def take(self, name: str, indices: list[str], body: Json) -> Snapshot:
        outcome, failures = self._next_outcome or ("SUCCESS", [])
        self._next_outcome = None
        shards = sum(self.indices[i] for i in indices)
        return Snapshot(name, indices, shards, body, max(1, self.polls), outcome, failures)


CLUSTER = web.AppKey("cluster", FakeCluster)


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    headers = {"Content-Type": _MEDIA, **(headers or {})}
    return web.Response(text=json.dumps(body), status=status, headers=headers)


def _waits(request: web.Request) -> bool:
    return request.query.get("wait_for_completion", "false").lower() == "true"


async def _body(request: web.Request) -> Json:
    body = await request.json() if request.can_read_body else {}
    return body if isinstance(body, dict) else {}


def _path(request: web.Request) -> tuple[FakeCluster, str, str]:
    return request.app[CLUSTER], request.match_info["repo"], request.match_info.get("snap", "")


def _select(available: list[str], wanted: Any, missing: Callable[[str], EsError]) -> list[str]:
    """Resolve ``indices`` (a list or comma-separated, wildcards allowed)."""
    names = [n.strip() for n in (wanted.split(",") if isinstance(wanted, str) else wanted or [])]
    if not names or names in (["_all"], ["*"]):
        return sorted(available)
    chosen: set[str] = set()
    for name in names:
        if "*" not in name and name not in available:
            raise missing(name)
        chosen.update(fnmatch.filter(available, name))
    return sorted(chosen)


def _no_such_index(name: str) -> EsError:
    return EsError(404, "index_not_found_exception", f"no such index [{name}]")


def _name_rule(name: str) -> str | None:
    """Which of Elasticsearch's snapshot name rules ``name`` breaks, if any."""
    if name.lower() != name:
        return "must be lowercase"
    if name.startswith("_"):
        return "must not start with '_'"
    bad = _BAD_NAME_CHARS & set(name)
    return f"must not contain {sorted(bad)}" if bad else None


def _check_request(request: web.Request) -> None:
    cluster, header = request.app[CLUSTER], request.headers.get("Authorization")
    cluster.authorizations.append(header or "")
    for name in ("Accept", "Content-Type"):
        version = re.search(r"compatible-with=(\d+)", request.headers.get(name, ""))
        if version and version.group(1) not in ("8", "9"):
            raise EsError(400, "media_type_header_exception", f"Invalid media-type on [{name}]")
    if cluster.authorization() in (None, header):
        return
    reason = (
        f"missing authentication credentials for REST request [{request.path}]"
        if header is None
        else "unable to authenticate with provided credentials and anonymous access is not "
        "allowed for this request"
    )
    challenge = 'Basic realm="security", charset="UTF-8", ApiKey'
    raise EsError(401, "security_exception", reason, **{"WWW-Authenticate": challenge})


@web.middleware
async def _protocol(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        _check_request(request)
        response = await handler(request)
    except EsError as exc:
        response = exc.response()
    response.headers["X-Elastic-Product"] = "Elasticsearch"
    return response


async def info(request: web.Request) -> web.Response:
    version = {"number": VERSION, "build_flavor": "default", "lucene_version": "10.2.2"}
    return _json({"name": "fake-node", "cluster_name": "snaphook-test", "version": version})


async def get_repository(request: web.Request) -> web.Response:
    cluster, repo, _ = _path(request)
    cluster.repository(repo)
    return _json({repo: cluster.repositories[repo]})


async def put_repository(request: web.Request) -> web.Response:
    (cluster, repo, _), body = _path(request), await _body(request)
    kind, settings = str(body.get("type", "")), body.get("settings") or {}
    if not kind:
        raise EsError(400, "action_request_validation_exception", "Validation Failed: 1: type")
    problem = cluster.repository_problem(kind, settings)
    if problem:
        raise EsError(500, "repository_exception", f"[{repo}] {problem}")
    as_text = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in settings.items()}
    cluster.repositories[repo] = {"type": kind, "settings": as_text}
    cluster.snapshots.setdefault(repo, {})
    cluster.repository_puts += 1
    return _json({"acknowledged": True})


async def create_snapshot(request: web.Request) -> web.Response:
    cluster, repo, name = _path(request)
    existing = cluster.repository(repo)
    rule = _name_rule(name)
    if rule is not None:
        reason = f"[{repo}:{name}] Invalid snapshot name [{name}], {rule}"
        raise EsError(400, "invalid_snapshot_name_exception", reason)
    if name in existing:
        how = (
            "is already in-progress" if existing[name].state == "IN_PROGRESS" else "already exists"
        )
        reason = (
            f"[{repo}:{name}] Invalid snapshot name [{name}], snapshot with the same name {how}"
        )
        raise EsError(400, "invalid_snapshot_name_exception", reason)
    body = await _body(request)
    indices = _select(list(cluster.indices), body.get("indices"), _no_such_index)
    snap = existing[name] = cluster.take(name, indices, body)
    if not _waits(request):
        return _json({"accepted": True})
    while snap.state == "IN_PROGRESS":
        snap.tick()
    return _json({"snapshot": snap.info(repo)})


async def get_snapshot(request: web.Request) -> web.Response:
    cluster, repo, name = _path(request)
    snap = cluster.snapshot(repo, name)
    snap.tick()
    cluster.observed.append(("get", snap.state))
    return _json({"snapshots": [snap.info(repo)], "total": 1, "remaining": 0})


async def snapshot_status(request: web.Request) -> web.Response:
    cluster, repo, name = _path(request)
    snap = cluster.snapshot(repo, name)
    snap.tick()
    status = snap.status(repo)
    cluster.observed.append(("status", status["state"]))
    return _json({"snapshots": [status]})


def _restored_names(request_body: Json, chosen: list[str]) -> dict[str, str]:
    pattern, replacement = (
        request_body.get("rename_pattern"),
        request_body.get("rename_replacement"),
    )
    if not pattern:
        return {index: index for index in chosen}
    # Java's "$1" group references, as Python's re.sub spells them.
    python = re.sub(r"\$(\d+)", r"\\g<\1>", str(replacement).replace("\\", "\\\\"))
    return {index: re.sub(pattern, python, index) for index in chosen}


async def restore(request: web.Request) -> web.Response:
    (cluster, repo, name), body = _path(request), await _body(request)
    snap = cluster.snapshot(repo, name)
    where = f"[{repo}:{name}/{snap.uuid}]"
    if snap.state not in ("SUCCESS", "PARTIAL"):
        raise EsError(500, "snapshot_restore_exception", f"{where} unsupported state {snap.state}")

    def missing(index: str) -> EsError:
        return EsError(500, "snapshot_restore_exception", f"{where} indices [{index}] missing")

    renamed = _restored_names(body, _select(snap.indices, body.get("indices"), missing))
    for target in renamed.values():
        if target in cluster.indices:
            reason = (
                f"{where} cannot restore index [{target}] because an open index with same name "
                "already exists in the cluster. Either close or delete the existing index or "
                "restore the index under a different name by providing a rename pattern and "
                "replacement name"
            )
            raise EsError(500, "snapshot_restore_exception", reason)
    for source, target in renamed.items():
        cluster.indices[target] = cluster.indices.get(source, 1)
    if not _waits(request):
        return _json({"accepted": True})
    total = sum(cluster.indices[target] for target in renamed.values())
    failed = min(cluster.restore_failed_shards, total)
    shards = {"total": total, "failed": failed, "successful": total - failed}
    restored = {"snapshot": name, "indices": sorted(renamed.values()), "shards": shards}
    return _json({"snapshot": restored})


async def cat_indices(request: web.Request) -> web.Response:
    rows = [
        {"health": "green", "status": "open", "index": name, "pri": str(shards), "rep": "0"}
        for name, shards in sorted(request.app[CLUSTER].indices.items())
    ]
    if request.query.get("format") == "json":
        return _json(rows)
    return web.Response(text="".join(" ".join(row.values()) + "\n" for row in rows))


async def get_index(request: web.Request) -> web.Response:
    name, indices = request.match_info["index"], request.app[CLUSTER].indices
    if name not in indices:
        raise _no_such_index(name)
    settings = {"index": {"number_of_shards": str(indices[name])}}
    return _json({name: {"aliases": {}, "mappings": {}, "settings": settings}})


def create_app(cluster: FakeCluster) -> web.Application:
    app = web.Application(middlewares=[_protocol])
    app[CLUSTER] = cluster
    add = app.router.add_route
    add("GET", "/", info)
    add("GET", "/_snapshot/{repo}", get_repository)
    for method in ("PUT", "POST"):
        add(method, "/_snapshot/{repo}", put_repository)
        add(method, "/_snapshot/{repo}/{snap}", create_snapshot)
    add("GET", "/_snapshot/{repo}/{snap}", get_snapshot)
    add("GET", "/_snapshot/{repo}/{snap}/_status", snapshot_status)
    add("POST", "/_snapshot/{repo}/{snap}/_restore", restore)
    add("GET", "/_cat/indices", cat_indices)
    app.router.add_get("/{index:[^_/][^/]*}", get_index)  # HEAD too: the exists API
    return app


@asynccontextmanager
async def serve(cluster: FakeCluster) -> AsyncIterator[str]:
    """Serve ``cluster`` on 127.0.0.1, on a free port; yields the base URL."""
    server = TestServer(create_app(cluster), host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()
