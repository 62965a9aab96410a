"""Stream bytes to and from S3 without holding them whole: multipart upload in bounded
parts, sha256 and size computed on the way, streamed reads back.

Shared by every dump/export function; it imports only the SDK and aiobotocore.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel

from functions.aws import aws_session
from functions.sdk import Context, ObjectStore, PermanentError, RetryableError

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

MIN_PART = 5 * 1024 * 1024  # S3's smallest allowed part (except the last)
DEFAULT_PART = 8 * 1024 * 1024
READ_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class S3Url:
    bucket: str
    key: str

    @classmethod
    def parse(cls, url: str) -> S3Url:
        parts = urlsplit(url)
        key = parts.path.lstrip("/")
        if parts.scheme != "s3" or not parts.netloc or not key:
            raise PermanentError(f"not an s3://bucket/key URL: {url[:200]!r}")
        return cls(parts.netloc, key)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


class StreamTally:
    """Size and sha256 of the bytes flowing past, so a restore can check what it read
    against what the dump recorded without a second pass."""

    def __init__(self) -> None:
        self.bytes = 0
        self._sha256 = hashlib.sha256()

    @property
    def sha256(self) -> str:
        return self._sha256.hexdigest()

    async def through(self, chunks: AsyncIterable[bytes]) -> AsyncGenerator[bytes, None]:
        async for chunk in chunks:
            self.bytes += len(chunk)
            self._sha256.update(chunk)
            yield chunk


class StoredObject(BaseModel):
    """What a dump step reports: enough to find, verify and restore the object."""

    url: str
    bytes: int
    sha256: str
    parts: int


@asynccontextmanager
async def s3_client(store: ObjectStore) -> AsyncIterator[S3Client]:
    async with aws_session().create_client(
        "s3", region_name=store.region, endpoint_url=store.endpoint_url
    ) as client:
        yield client


def _failure(action: str, url: S3Url, exc: Exception) -> Exception:
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", "error"))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        message = f"{action} {url}: {code}"
        # Throttling and server errors heal; a missing bucket or a denied key does not.
        return (
            RetryableError(message) if status >= 500 or status == 429 else PermanentError(message)
        )
    return RetryableError(f"{action} {url}: {type(exc).__name__}: {exc}")


async def _parts(chunks: AsyncIterable[bytes], size: int) -> AsyncGenerator[bytes, None]:
    """Re-cut a stream into parts of exactly ``size`` bytes (the last may be shorter)."""
    buffer = bytearray()
    async for chunk in chunks:
        buffer += chunk
        while len(buffer) >= size:
            yield bytes(buffer[:size])
            del buffer[:size]
    if buffer:
        yield bytes(buffer)


async def upload_stream(
    ctx: Context,
    url: str,
    chunks: AsyncIterable[bytes],
    *,
    part_size: int = DEFAULT_PART,
    content_type: str = "application/octet-stream",
) -> StoredObject:
    """Upload ``chunks`` to ``url``; at most about two parts are in memory at any time.

    A stream that fits one part is a single PUT; anything larger is a multipart upload,
    aborted on failure so no orphaned parts keep costing money.
    """
    target = S3Url.parse(url)
    part_size = max(part_size, MIN_PART)
    digest, total, numbers = hashlib.sha256(), 0, 0
    try:
        async with s3_client(ctx.object_store) as s3:
            parts = _parts(chunks, part_size)
            first = await anext(parts, b"")
            second = await anext(parts, None)
            digest.update(first)
            total = len(first)
            if second is None:
                await s3.put_object(
                    Bucket=target.bucket, Key=target.key, Body=first, ContentType=content_type
                )
                numbers = 1
            else:
                numbers, more = await _multipart(
                    s3, target, first, second, parts, content_type, digest, ctx
                )
                total += more
    except (ClientError, BotoCoreError, OSError) as exc:
        raise _failure("upload", target, exc) from None
    finally:
        # On failure, stop the producer (a dump program) instead of leaving it to the GC.
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    return StoredObject(url=str(target), bytes=total, sha256=digest.hexdigest(), parts=numbers)


async def _multipart(
    s3: S3Client,
    target: S3Url,
    first: bytes,
    second: bytes,
    rest: AsyncIterator[bytes],
    content_type: str,
    digest: Any,
    ctx: Context,
) -> tuple[int, int]:
    created = await s3.create_multipart_upload(
        Bucket=target.bucket, Key=target.key, ContentType=content_type
    )
    upload_id = created["UploadId"]
    done: list[dict[str, Any]] = []
    total = 0
    try:

        async def put(number: int, body: bytes) -> None:
            answer = await s3.upload_part(
                Bucket=target.bucket,
                Key=target.key,
                UploadId=upload_id,
                PartNumber=number,
                Body=body,
            )
            done.append({"PartNumber": number, "ETag": answer["ETag"]})

        await put(1, first)
        ctx.progress(len(first), None)
        body: bytes | None = second
        number = 2
        while body is not None:
            digest.update(body)
            total += len(body)
            await put(number, body)
            ctx.progress(len(first) + total, None)
            number += 1
            body = await anext(rest, None)
        await s3.complete_multipart_upload(
            Bucket=target.bucket,
            Key=target.key,
            UploadId=upload_id,
            MultipartUpload={"Parts": done},  # type: ignore[typeddict-item]
        )
    except BaseException:
        await s3.abort_multipart_upload(Bucket=target.bucket, Key=target.key, UploadId=upload_id)
        raise
    return len(done), total


async def download_stream(
    ctx: Context, url: str, *, chunk_size: int = READ_CHUNK
) -> AsyncGenerator[bytes, None]:
    """The object at ``url`` as chunks, read as it is consumed."""
    target = S3Url.parse(url)
    try:
        async with s3_client(ctx.object_store) as s3:
            answer = await s3.get_object(Bucket=target.bucket, Key=target.key)
            async with answer["Body"] as body:
                while chunk := await body.read(chunk_size):
                    yield chunk
    except (ClientError, BotoCoreError, OSError) as exc:
        raise _failure("download", target, exc) from None
