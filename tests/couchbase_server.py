"""A test double of Couchbase's Query service REST API (``POST /query/service``).

It answers exactly one statement shape, the keyset-paged export of ``couchbase.export``::

    SELECT META(b).id AS id, b AS doc FROM `bucket`[.`scope`.`collection`] b
    WHERE META(b).id > $last ORDER BY META(b).id LIMIT $n

over in-memory keyspaces, with the request parameters as JSON (named parameters as
``$name`` members, as the service takes them), basic authentication, and answers
shaped as the service's: ``{"requestID", "signature", "results", "status": "success",
"metrics"}``, or ``{"requestID", "errors": [{"code", "msg"}], "status": "fatal"}`` with the
documented HTTP status (400 syntax, 401 credentials, 404 keyspace or index, 500 internal).
Anything else is a syntax error.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

Json = dict[str, Any]
_EXPORT = re.compile(
    r"SELECT META\(b\)\.id AS id, b AS doc FROM (?P<keyspace>`[^`]+`(?:\.`[^`]+`\.`[^`]+`)?) b "
    r"WHERE META\(b\)\.id > \$last ORDER BY META\(b\)\.id LIMIT \$n",
    re.IGNORECASE,
)


class QueryError(Exception):
    def __init__(self, status: int, code: int, msg: str) -> None:
        super().__init__(msg)
        self.status, self.code, self.msg = status, code, msg


@dataclass
class FakeQueryService:
    """Keyspaces (``bucket`` or ``bucket.scope.collection``) of documents by key."""

    username: str
    password: str
    keyspaces: dict[str, dict[str, Any]] = field(default_factory=dict)
    without_primary_index: set[str] = field(default_factory=set)
    fail_after: int | None = None  # answer this many pages, then an internal error
    requests: list[Json] = field(default_factory=list)  # parameters received

    def page(self, keyspace: str, after: str, limit: int) -> list[Json]:
        if keyspace not in self.keyspaces:
            bucket = keyspace.split(".")[0]
            raise QueryError(
                404,
                12003,
                f"Keyspace not found in CB datastore: default:{keyspace} - cause: "
                f"No bucket named {bucket}",
            )
        if keyspace in self.without_primary_index:
            raise QueryError(
                404,
                4000,
                f"No index available on keyspace `default`:`{keyspace}` that matches your "
                f"query. Use CREATE PRIMARY INDEX ON `default`:`{keyspace}` to create a "
                "primary index, or check that your expected index is online.",
            )
        if self.fail_after is not None and len(self.requests) > self.fail_after:
            raise QueryError(500, 5000, "Internal Error: index scan aborted")
        docs = self.keyspaces[keyspace]
        keys = sorted(k for k in docs if k > after)[:limit]
        return [{"id": key, "doc": docs[key]} for key in keys]


def _answer(status: int, body: Json) -> web.Response:
    return web.json_response({"requestID": str(uuid.uuid4()), **body}, status=status)


def _metrics(results: list[Json]) -> Json:
    return {
        "elapsedTime": "1.2ms",
        "executionTime": "1.1ms",
        "resultCount": len(results),
        "resultSize": len(json.dumps(results)),
    }


async def _parameters(request: web.Request) -> Json:
    # The service also takes form-encoded parameters; the export sends JSON only.
    body = await request.json() if request.content_type == "application/json" else None
    if not isinstance(body, dict):
        raise QueryError(400, 1050, "Unable to decode the request body as JSON")
    return body


def create_app(service: FakeQueryService) -> web.Application:
    expected = (
        "Basic " + base64.b64encode(f"{service.username}:{service.password}".encode()).decode()
    )

    async def query(request: web.Request) -> web.Response:
        try:
            if request.headers.get("Authorization") != expected:
                raise QueryError(401, 10000, "Authentication Failure")
            params = await _parameters(request)
            service.requests.append(params)
            results = run(params)
        except QueryError as exc:
            errors = [{"code": exc.code, "msg": exc.msg}]
            return _answer(exc.status, {"errors": errors, "status": "fatal"})
        return _answer(
            200,
            {
                "signature": {"id": "json", "doc": "json"},
                "results": results,
                "status": "success",
                "metrics": _metrics(results),
            },
        )

    def run(params: Json) -> list[Json]:
        statement = str(params.get("statement", ""))
        match = _EXPORT.fullmatch(statement.strip())
        if match is None:
            raise QueryError(400, 3000, f"syntax error - at {statement[:40]!r}")
        after, limit = params.get("$last"), params.get("$n")
        if not isinstance(after, str) or not isinstance(limit, int) or limit < 0:
            raise QueryError(400, 5010, "Error evaluating filter - cause: bad $last or $n")
        keyspace = ".".join(re.findall(r"`([^`]+)`", match["keyspace"]))
        return service.page(keyspace, after, limit)

    app = web.Application()
    app.router.add_post("/query/service", query)
    return app


@asynccontextmanager
async def serve(service: FakeQueryService) -> AsyncIterator[str]:
    """Serve ``service`` on 127.0.0.1 (a free port); yields the base URL."""
    server = TestServer(create_app(service), host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()
