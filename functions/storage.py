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
            with memoryview(buffer) as view:
                part = bytes(view[:size])  # one copy of the part, not two
            del buffer[:size]
            yield part
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
    """Upload ``chunks`` to ``url``, holding about one part in memory (plus what is being
    cut into the next).

    A stream that fits one part is a single PUT; anything larger is a multipart upload,
    aborted on failure so no orphaned parts keep costing money.
    """
    target = S3Url.parse(url)
    upload = _Upload(ctx, target, content_type)
    try:
        async with s3_client(ctx.object_store) as s3:
            parts = _parts(chunks, max(part_size, MIN_PART))
            first = await anext(parts, b"")
            second = await anext(parts, None)
            if second is None:
                await upload.single(s3, first)
            else:
                # Hand both over and drop our references: only the part in flight stays.
                await upload.multipart(s3, [first, second], parts)
                del first, second
    except (ClientError, BotoCoreError, OSError) as exc:
        raise _failure("upload", target, exc) from None
    finally:
        # On failure, stop the producer (a dump program) instead of leaving it to the GC.
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    return upload.result()


class _Upload:
    """One object being uploaded: counts, hashes and part numbers as parts go out."""

    def __init__(self, ctx: Context, target: S3Url, content_type: str) -> None:
        self._ctx = ctx
        self._target = target
        self._content_type = content_type
        self._digest = hashlib.sha256()
        self._bytes = 0
        self._done: list[dict[str, Any]] = []

    def _count(self, body: bytes) -> None:
        self._digest.update(body)
        self._bytes += len(body)
        self._ctx.progress(self._bytes, None)

    async def single(self, s3: S3Client, body: bytes) -> None:
        self._count(body)
        await s3.put_object(
            Bucket=self._target.bucket,
            Key=self._target.key,
            Body=body,
            ContentType=self._content_type,
        )
        self._done.append({"PartNumber": 1})

    async def multipart(self, s3: S3Client, ready: list[bytes], rest: AsyncIterator[bytes]) -> None:
        bucket, key = self._target.bucket, self._target.key
        created = await s3.create_multipart_upload(
            Bucket=bucket, Key=key, ContentType=self._content_type
        )
        upload_id = created["UploadId"]
        try:
            while True:
                body = ready.pop(0) if ready else await anext(rest, None)
                if body is None:
                    break
                self._count(body)
                number = len(self._done) + 1
                answer = await s3.upload_part(
                    Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
                )
                del body  # before cutting the next part: one part in memory, not two
                self._done.append({"PartNumber": number, "ETag": answer["ETag"]})
            await s3.complete_multipart_upload(
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": self._done},  # type: ignore[typeddict-item]
            )
        except BaseException:
            await s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            raise

    def result(self) -> StoredObject:
        return StoredObject(
            url=str(self._target),
            bytes=self._bytes,
            sha256=self._digest.hexdigest(),
            parts=len(self._done),
        )


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
