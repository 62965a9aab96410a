"""AWS API clients for hook functions (aiobotocore), pointed where the dispatcher says."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from functions.sdk import Context, PermanentError, RetryableError


@asynccontextmanager
async def aws_client(
    ctx: Context, service: str, *, region: str | None = None
) -> AsyncIterator[Any]:
    """An aiobotocore client for ``service`` (credentials from the usual AWS sources)."""
    session = get_session()
    async with session.create_client(
        service,  # type: ignore[call-overload]
        region_name=region or ctx.aws.region,
        endpoint_url=ctx.aws.endpoint_url,
    ) as client:
        yield client


def aws_failure(action: str, exc: Exception) -> Exception:
    """A botocore error as a function error: throttling and 5xx retry, the rest does not."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "error"))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        message = f"{action}: {code}: {str(error.get('Message', ''))[:300]}"
        throttled = code in ("Throttling", "ThrottlingException", "RequestLimitExceeded")
        if status >= 500 or status == 429 or throttled:
            return RetryableError(message)
        return PermanentError(message)
    if isinstance(exc, BotoCoreError):
        return RetryableError(f"{action}: {type(exc).__name__}: {exc}")
    return exc
