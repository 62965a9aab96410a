"""Streaming to S3 (moto over real HTTP): bounded parts, checksums, real multipart."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator

import pytest

from functions.procstream import ProcessFailed, gunzip_stream, gzip_stream, read_process
from functions.sdk import ObjectStore, PermanentError
from functions.storage import MIN_PART, S3Url, download_stream, s3_client, upload_stream
from tests.conftest import FunctionCaller


class _Ctx:
    """The two Context members storage uses."""

    def __init__(self, store: ObjectStore) -> None:
        self.object_store = store
        self.progressed: list[int] = []

    def progress(self, done: int, total: int | None = None) -> None:
        self.progressed.append(done)


async def chunks_of(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def collect(stream: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in stream])


async def test_small_object_is_one_put(object_store: ObjectStore, bucket: str) -> None:
    ctx = _Ctx(object_store)
    data = b"hello snaphook\n" * 10
    url = f"s3://{bucket}/small.bin"
    stored = await upload_stream(ctx, url, chunks_of(data))  # type: ignore[arg-type]
    assert (stored.bytes, stored.parts) == (len(data), 1)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert await collect(download_stream(ctx, url)) == data  # type: ignore[arg-type]


async def test_large_object_uses_multipart_and_round_trips(
    object_store: ObjectStore, bucket: str
) -> None:
    ctx = _Ctx(object_store)
    data = os.urandom(MIN_PART * 2 + 12345)
    url = f"s3://{bucket}/big.bin"
    stored = await upload_stream(ctx, url, chunks_of(data), part_size=MIN_PART)  # type: ignore[arg-type]
    assert stored.parts == 3 and stored.bytes == len(data)
    async with s3_client(object_store) as s3:
        head = await s3.head_object(Bucket=bucket, Key="big.bin")
        # A multipart ETag ends in "-<number of parts>".
        assert head["ETag"].strip('"').endswith("-3")
        assert head["ContentLength"] == len(data)
    back = await collect(download_stream(ctx, url))  # type: ignore[arg-type]
    assert hashlib.sha256(back).hexdigest() == stored.sha256
    assert ctx.progressed[-1] == len(data)


async def test_failed_stream_aborts_the_multipart_upload(
    object_store: ObjectStore, bucket: str
) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield os.urandom(MIN_PART)
        yield os.urandom(MIN_PART)
        raise ProcessFailed("pg_dump", 1, "connection lost")

    with pytest.raises(ProcessFailed):
        await upload_stream(_Ctx(object_store), f"s3://{bucket}/x", broken(), part_size=MIN_PART)  # type: ignore[arg-type]
    async with s3_client(object_store) as s3:
        uploads = await s3.list_multipart_uploads(Bucket=bucket)
        assert uploads.get("Uploads", []) == []
        assert (await s3.list_objects_v2(Bucket=bucket)).get("KeyCount", 0) == 0


async def test_missing_bucket_is_a_permanent_error(object_store: ObjectStore) -> None:
    with pytest.raises(PermanentError, match="NoSuchBucket"):
        await upload_stream(_Ctx(object_store), "s3://no-such-bucket-xyz/k", chunks_of(b"x"))  # type: ignore[arg-type]


@pytest.mark.parametrize("url", ["http://b/k", "s3://bucket", "s3:///key", "bucket/key"])
def test_bad_urls(url: str) -> None:
    with pytest.raises(PermanentError, match="s3://bucket/key"):
        S3Url.parse(url)


async def test_process_stream_and_gzip_round_trip() -> None:
    data = await collect(read_process(["seq", "1", "200000"]))
    assert data.splitlines()[-1] == b"200000"
    packed = await collect(gzip_stream(chunks_of(data)))
    assert len(packed) < len(data) / 3
    assert await collect(gunzip_stream(chunks_of(packed, 1000))) == data


async def test_failing_process_reports_exit_code_and_stderr() -> None:
    with pytest.raises(ProcessFailed, match="exited with 3: boom"):
        await collect(read_process(["sh", "-c", "echo boom >&2; exit 3"]))
    with pytest.raises(PermanentError, match="not installed"):
        await collect(read_process(["definitely-not-a-program-snaphook"]))


async def test_call_function_fixture_reaches_moto(call_function: FunctionCaller) -> None:
    outputs = await call_function("sleep", {"seconds": 0})
    assert outputs == {"slept": 0.0}


async def test_truncated_gzip_is_an_error_not_a_partial_restore() -> None:
    packed = await collect(gzip_stream(chunks_of(os.urandom(100_000))))
    with pytest.raises(PermanentError, match="truncated"):
        await collect(gunzip_stream(chunks_of(packed[: len(packed) // 2])))
