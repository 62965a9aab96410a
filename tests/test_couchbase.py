"""``couchbase.export`` against the Query service test double, to S3 in moto."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import socket
from base64 import b64encode
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from dispatcher.app import load_functions
from dispatcher.invokers.inprocess import InProcessInvoker
from dispatcher.secrets import EnvSecretResolver
from functions.httpguard import HttpPolicy, guarded_session
from functions.sdk import ObjectStore, PermanentError, RetryableError
from functions.storage import s3_client
from tests.conftest import FunctionCaller
from tests.couchbase_server import FakeQueryService, serve

PASSWORD = "cb-s3cret-Pa55"
UNUSED = "s3://never-written/x.gz"  # for exports that fail before anything is uploaded


def documents(count: int) -> dict[str, Any]:
    """Keys and values of every JSON kind, including keys that sort oddly."""
    docs: dict[str, Any] = {
        f"user::{i:05d}": {"n": i, "name": f"user {i}", "tags": ["a", "b"][: i % 3]}
        for i in range(count - 4)
    }
    docs["Z-upper"] = "a bare string"
    docs["émile"] = {"city": "Zürich", "nested": {"x": [1, 2.5, None, True]}}
    docs["0"] = 42
    docs["user::00001::x"] = None
    return docs


@dataclass
class Couchbase:
    service: FakeQueryService
    url: str

    def params(self, to: str, **more: Any) -> dict[str, Any]:
        return {"url": self.url, "username": "backup", "password": PASSWORD, "to": to, **more}


@pytest.fixture
async def cb() -> AsyncIterator[Couchbase]:
    service = FakeQueryService("backup", PASSWORD, keyspaces={"sessions": documents(3000)})
    async with serve(service) as url:
        yield Couchbase(service, url)


async def fetch(store: ObjectStore, bucket: str, key: str) -> bytes:
    async with s3_client(store) as s3:
        answer = await s3.get_object(Bucket=bucket, Key=key)
        async with answer["Body"] as body:
            data: bytes = await body.read()
            return data


async def keys_in(store: ObjectStore, bucket: str) -> list[str]:
    async with s3_client(store) as s3:
        listed = await s3.list_objects_v2(Bucket=bucket)
    return [item["Key"] for item in listed.get("Contents", [])]


async def test_export_round_trips_across_pages(
    cb: Couchbase, call_function: FunctionCaller, object_store: ObjectStore, bucket: str
) -> None:
    params = cb.params(f"s3://{bucket}/cb/sessions.jsonl.gz", bucket="sessions", page_size=250)
    out = await call_function("couchbase.export", params)

    stored = await fetch(object_store, bucket, "cb/sessions.jsonl.gz")
    assert out["documents"] == 3000 and out["bytes"] == len(stored)
    assert out["sha256"] == hashlib.sha256(stored).hexdigest()
    assert out["url"] == f"s3://{bucket}/cb/sessions.jsonl.gz"
    lines = [json.loads(line) for line in gzip.decompress(stored).decode().splitlines()]
    source = cb.service.keyspaces["sessions"]
    assert [line["id"] for line in lines] == sorted(source)
    assert {line["id"]: line["doc"] for line in lines} == source

    # Twelve full pages and an empty one; each starts after the previous page's last key.
    requests = cb.service.requests
    assert len(requests) == 13
    assert [r["$last"] for r in requests] == ["", *sorted(source)[249::250]]
    assert all(r["$n"] == 250 and r["readonly"] is True for r in requests)
    assert {r["scan_consistency"] for r in requests} == {"request_plus"}


async def test_export_of_a_collection_and_a_short_last_page(
    call_function: FunctionCaller, object_store: ObjectStore, bucket: str
) -> None:
    service = FakeQueryService("backup", PASSWORD)
    service.keyspaces["cache.app.carts"] = documents(25)
    async with serve(service) as url:
        out = await call_function(
            "couchbase.export",
            {
                **Couchbase(service, url).params(f"s3://{bucket}/carts.jsonl.gz"),
                "bucket": "cache",
                "scope": "app",
                "collection": "carts",
                "page_size": 10,
            },
        )
    assert out["documents"] == 25
    assert len(service.requests) == 3  # 10 + 10 + 5: a short page is the last
    assert "FROM `cache`.`app`.`carts` b" in service.requests[0]["statement"]
    stored = gzip.decompress(await fetch(object_store, bucket, "carts.jsonl.gz"))
    assert len(stored.splitlines()) == 25


async def test_empty_bucket_exports_an_empty_file(
    call_function: FunctionCaller, object_store: ObjectStore, bucket: str
) -> None:
    service = FakeQueryService("backup", PASSWORD, keyspaces={"empty": {}})
    async with serve(service) as url:
        out = await call_function(
            "couchbase.export",
            {**Couchbase(service, url).params(f"s3://{bucket}/e.gz"), "bucket": "empty"},
        )
    assert out["documents"] == 0
    assert gzip.decompress(await fetch(object_store, bucket, "e.gz")) == b""


async def test_bad_credentials_are_permanent_and_not_shown(
    cb: Couchbase, call_function: FunctionCaller, object_store: ObjectStore, bucket: str
) -> None:
    params = cb.params(f"s3://{bucket}/x.gz", bucket="sessions", password="wrong-Pa55word")
    with pytest.raises(PermanentError, match="user 'backup' was refused") as failure:
        await call_function("couchbase.export", params)
    assert "10000: Authentication Failure" in str(failure.value)
    assert "wrong-Pa55word" not in str(failure.value) and PASSWORD not in str(failure.value)
    assert await keys_in(object_store, bucket) == []


@pytest.mark.parametrize(
    ("bucket_name", "expected"),
    [
        ("nosuch", r"HTTP 404\): 12003: Keyspace not found in CB datastore: default:nosuch"),
        ("unindexed", r"HTTP 404\): 4000: No index available on keyspace"),
    ],
)
async def test_query_errors_are_surfaced(
    cb: Couchbase, call_function: FunctionCaller, bucket_name: str, expected: str
) -> None:
    cb.service.keyspaces["unindexed"] = {"k": 1}
    cb.service.without_primary_index.add("unindexed")
    with pytest.raises(PermanentError, match=expected):
        await call_function("couchbase.export", cb.params(UNUSED, bucket=bucket_name))


async def test_failure_mid_export_is_retryable_and_stores_nothing(
    cb: Couchbase, call_function: FunctionCaller, object_store: ObjectStore, bucket: str
) -> None:
    cb.service.fail_after = 3
    params = cb.params(f"s3://{bucket}/x.gz", bucket="sessions", page_size=100)
    with pytest.raises(RetryableError, match=r"HTTP 500\): 5000: Internal Error"):
        await call_function("couchbase.export", params)
    assert len(cb.service.requests) == 4
    assert await keys_in(object_store, bucket) == []


async def test_unreachable_service_is_retryable(call_function: FunctionCaller) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    params = {"url": f"http://127.0.0.1:{port}", "username": "backup", "password": PASSWORD}
    params |= {"bucket": "sessions", "to": UNUSED}
    with pytest.raises(RetryableError, match=f"couchbase query at 127.0.0.1:{port}") as failure:
        await call_function("couchbase.export", params)
    assert PASSWORD not in str(failure.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("bucket", "a`b"),
        ("collection", "x` WHERE 1=1 --"),
        ("to", "/tmp/x"),
        ("page_size", 0),
        ("url", "http://backup:pw@127.0.0.1:8093"),
    ],
)
async def test_params_are_checked_before_any_query(
    cb: Couchbase, call_function: FunctionCaller, field: str, value: Any
) -> None:
    params = cb.params(UNUSED, bucket="sessions") | {field: value}
    with pytest.raises(PermanentError, match=f"invalid params for couchbase.export: {field}") as e:
        await call_function("couchbase.export", params)
    assert str(value) not in str(e.value)  # named, never quoted: it may hold a password
    assert cb.service.requests == []


async def test_large_export_streams_in_multipart(
    call_function: FunctionCaller, object_store: ObjectStore, bucket: str
) -> None:
    # Incompressible values, so the gzipped stream outgrows one 8 MiB upload part.
    blobs = {f"blob::{i:04d}": {"data": b64encode(os.urandom(3072)).decode()} for i in range(3000)}
    service = FakeQueryService("backup", PASSWORD, keyspaces={"blobs": blobs})
    async with serve(service) as url:
        params = Couchbase(service, url).params(f"s3://{bucket}/blobs.gz", bucket="blobs")
        out = await call_function("couchbase.export", params)
    async with s3_client(object_store) as s3:
        head = await s3.head_object(Bucket=bucket, Key="blobs.gz")
    assert head["ETag"].strip('"').endswith("-2")  # a multipart upload of two parts
    assert out["documents"] == 3000 and out["bytes"] == head["ContentLength"]
    assert len(service.requests) == 4  # pages of 1000: no request held the whole bucket


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (HttpPolicy(allow_loopback=False), "refusing to connect to 127.0.0.1"),
        (
            HttpPolicy(max_response_bytes=10_000),
            "response larger than 10000 bytes.*lower page_size",
        ),
    ],
)
async def test_the_dispatchers_http_policy_applies(
    cb: Couchbase, object_store: ObjectStore, policy: HttpPolicy, expected: str
) -> None:
    """Through ctx.http as the dispatcher builds it: a refused address or an oversized page
    is permanent, in words that say what to change."""
    async with guarded_session(policy) as http:
        caller = FunctionCaller(
            InProcessInvoker(load_functions([]), http, EnvSecretResolver(), object_store)
        )
        with pytest.raises(PermanentError, match=expected):
            await caller("couchbase.export", cb.params(UNUSED, bucket="sessions", page_size=500))
