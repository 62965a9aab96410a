"""AWS API clients for hook functions (aiobotocore), pointed where the dispatcher says."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiobotocore.session import AioSession, get_session
from botocore.exceptions import BotoCoreError, ClientError

from functions.sdk import Context, PermanentError, RetryableError

_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AioSession] = (
    weakref.WeakKeyDictionary()
)


def aws_session() -> AioSession:
    """One botocore session per event loop: it caches the (large) service models, which
    would otherwise be loaded again for every client; per loop because refreshable
    credentials hold asyncio locks bound to the loop that made them."""
    loop = asyncio.get_running_loop()
    session = _sessions.get(loop)
    if session is None:
        session = _sessions[loop] = get_session()
    return session


@asynccontextmanager
async def aws_client(
    ctx: Context, service: str, *, region: str | None = None
) -> AsyncIterator[Any]:
    """An aiobotocore client for ``service`` (credentials from the usual AWS sources)."""
    async with aws_session().create_client(
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
