"""``couchbase.export``: a logical export of a bucket through the Query service's REST API.

An ephemeral bucket lives only in memory: there are no data files for a volume snapshot to
capture, so the backup is a logical export. Documents are read in pages ordered by their
key, each page starting after the last key of the one before (keyset pagination: every
page is an index range scan, where ``OFFSET`` would re-read everything skipped). Requests
are ``readonly`` so the export can never modify the bucket. The pages flow as JSON lines,
``{"id": ..., "doc": ...}``, through gzip into an S3 multipart upload: memory holds a page
of documents and an upload part, whatever the size of the bucket.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, SecretStr, field_validator

from functions.httpguard import ResponseTooLarge, http_failure, policy_of, read_limited
from functions.procstream import gzip_stream
from functions.sdk import Context, PermanentError, RetryableError, function
from functions.storage import upload_stream

# Couchbase's naming rules; also what keeps a name from leaving its backquotes.
_BUCKET = r"^[A-Za-z0-9._%-]{1,100}$"
_COLLECTION = r"^[A-Za-z0-9_%-]{1,251}$"
_DEFAULT = "_default"
_REQUEST_TIMEOUT = 60.0  # one page
_SHOWN_ERRORS = 3


class ExportParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: AnyHttpUrl  # the Query service, e.g. http://cb.db:8093 (18093 for https)
    username: str = Field(pattern=r"^[^:]+$")  # basic auth cannot carry a ':' in it
    password: SecretStr
    bucket: str = Field(pattern=_BUCKET)
    scope: str = Field(default=_DEFAULT, pattern=_COLLECTION)
    collection: str = Field(default=_DEFAULT, pattern=_COLLECTION)
    to: str = Field(pattern=r"^s3://")  # s3://bucket/key, e.g. ending in .jsonl.gz
    page_size: int = Field(default=1000, ge=1, le=10_000)
    # request_plus: each page sees every mutation acknowledged before it was asked for.
    scan_consistency: Literal["not_bounded", "request_plus"] = "request_plus"

    @field_validator("url")
    @classmethod
    def _no_credentials_in_url(cls, url: AnyHttpUrl) -> AnyHttpUrl:
        if url.username or url.password:
            raise ValueError("give credentials as username and password, not in the URL")
        return url


class ExportResult(BaseModel):
    url: str
    documents: int
    bytes: int
    sha256: str


@dataclass
class _Progress:
    documents: int = 0
    pages: int = 0


def _statement(p: ExportParams) -> str:
    keyspace = f"`{p.bucket}`"
    if (p.scope, p.collection) != (_DEFAULT, _DEFAULT):
        keyspace += f".`{p.scope}`.`{p.collection}`"
    return (
        f"SELECT META(b).id AS id, b AS doc FROM {keyspace} b "
        "WHERE META(b).id > $last ORDER BY META(b).id LIMIT $n"
    )


def _endpoint(p: ExportParams) -> str:
    base = str(p.url).rstrip("/")
    return base if base.endswith("/query/service") else f"{base}/query/service"


def _basic_auth(p: ExportParams) -> str:
    # By hand: aiohttp.BasicAuth is deprecated, and its successor is only in aiohttp 3.14+.
    pair = f"{p.username}:{p.password.get_secret_value()}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


def _where(p: ExportParams) -> str:
    """host:port, for messages (the URL may carry credentials)."""
    return f"{p.url.host}:{p.url.port}"


def _failure(p: ExportParams, status: int, answer: Any) -> PermanentError | RetryableError:
    errors = answer.get("errors") if isinstance(answer, dict) else None
    shown = [f"{e.get('code')}: {e.get('msg')}" for e in (errors or [])[:_SHOWN_ERRORS]]
    detail = "; ".join(shown) or f"HTTP {status}"
    if status == 401:
        return PermanentError(
            f"couchbase query at {_where(p)}: user {p.username!r} was refused ({detail})"
        )
    message = f"couchbase query at {_where(p)} failed (HTTP {status}): {detail}"
    timed_out = isinstance(answer, dict) and answer.get("status") == "timeout"
    transient = status >= 500 or status == 429 or timed_out
    return RetryableError(message) if transient else PermanentError(message)


async def _page(ctx: Context, p: ExportParams, after: str) -> list[dict[str, Any]]:
    """The next ``page_size`` documents whose key sorts after ``after``."""
    seconds = max(1.0, min(_REQUEST_TIMEOUT, ctx.remaining()))
    request = {
        "statement": _statement(p),
        "$last": after,
        "$n": p.page_size,
        "readonly": True,
        "scan_consistency": p.scan_consistency,
        "client_context_id": f"snaphook-{ctx.run_id}-{ctx.step}",
        # The service stops the query itself instead of working on for a client that left.
        "timeout": f"{seconds:.0f}s",
    }
    headers = {"Authorization": _basic_auth(p)}
    timeout = aiohttp.ClientTimeout(total=seconds + 5)
    limit = policy_of(ctx.http).max_response_bytes
    try:
        async with ctx.http.post(
            _endpoint(p), json=request, headers=headers, timeout=timeout
        ) as resp:
            status, body = resp.status, await read_limited(resp, limit)
    except ResponseTooLarge as exc:
        raise PermanentError(
            f"couchbase query at {_where(p)}: a page of {p.page_size} documents is a {exc}; "
            "lower page_size"
        ) from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        # The dispatcher's outbound policy may refuse the address: permanent, in its words.
        raise http_failure(f"couchbase query at {_where(p)}", exc) from None
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None  # a proxy's error page, say; the status decides
    if status != 200 or not isinstance(answer, dict) or answer.get("status") != "success":
        raise _failure(p, status, answer)
    results: list[dict[str, Any]] = answer.get("results") or []
    return results


async def _lines(ctx: Context, p: ExportParams, progress: _Progress) -> AsyncIterator[bytes]:
    """The bucket as JSON lines, one page per chunk."""
    after = ""  # every key sorts after the empty string
    while True:
        rows = await _page(ctx, p, after)
        progress.pages += 1
        if not rows:
            return
        progress.documents += len(rows)
        yield "".join(
            json.dumps({"id": row["id"], "doc": row.get("doc")}, ensure_ascii=False) + "\n"
            for row in rows
        ).encode()
        if len(rows) < p.page_size:
            return
        after = rows[-1]["id"]


@function("couchbase.export")
async def export(ctx: Context, p: ExportParams) -> ExportResult:
    """Export every document of a bucket (or collection) to S3 as gzipped JSON lines."""
    progress = _Progress()
    stored = await upload_stream(
        ctx, p.to, gzip_stream(_lines(ctx, p, progress)), content_type="application/gzip"
    )
    ctx.logger.info(
        "exported %d documents of %s in %d pages to %s (%d bytes)",
        progress.documents,
        p.bucket,
        progress.pages,
        stored.url,
        stored.bytes,
    )
    return ExportResult(
        url=stored.url, documents=progress.documents, bytes=stored.bytes, sha256=stored.sha256
    )
