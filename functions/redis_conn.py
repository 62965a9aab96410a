"""Connections for the ``redis.*`` functions: parsing a Redis URL, connecting without
client-level retries, and turning Redis errors into function errors.

A URL may carry a password, so nothing here lets one into a message: :class:`Server` knows
a name that is safe to show and scrubs the password (as written and URL-decoded) from any
text that might quote it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import SecretStr
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    NoPermissionError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from functions.sdk import FunctionError, PermanentError, RetryableError


@dataclass(frozen=True)
class Server:
    """Where to connect, plus a name that is safe to show (no credentials)."""

    options: dict[str, Any]
    name: str
    secrets: tuple[str, ...]  # the password as written in the URL and decoded

    @classmethod
    def parse(cls, url: SecretStr, db: int | None) -> Server:
        raw = url.get_secret_value()
        secrets: tuple[str, ...] = (raw,)
        try:
            written = urlsplit(raw).password or ""
            secrets = tuple(s for s in {raw, written, unquote(written)} if s)
            options: dict[str, Any] = dict(parse_url(raw))
        except ValueError as exc:
            raise PermanentError(f"bad redis url: {_scrub(str(exc), secrets)}") from None
        if db is not None:
            options["db"] = db  # an explicit param beats the URL's /N
        host = f"{options.get('host', 'localhost')}:{options.get('port', 6379)}"
        where = options.get("path") or host
        name = f"{urlsplit(raw).scheme}://{where}/{options.get('db', 0)}"
        return cls(options, name, secrets)

    @property
    def db(self) -> int:
        return int(self.options.get("db", 0))

    def scrub(self, text: str) -> str:
        return _scrub(text, self.secrets)


def _scrub(text: str, secrets: tuple[str, ...]) -> str:
    # Longest first: the whole URL goes before the password inside it.
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _failure(server: Server, exc: RedisError) -> FunctionError:
    """A Redis error as a function error, naming the server but never its password."""
    message = f"{server.name}: {server.scrub(str(exc) or type(exc).__name__)}"
    if isinstance(exc, AuthenticationError | AuthorizationError | NoPermissionError):
        return PermanentError(message)  # retrying a refused login or command cannot help
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        return RetryableError(message)  # restarting, loading its dataset, network blip
    if isinstance(exc, ResponseError):
        return PermanentError(message)  # unknown/renamed command, bad DB index, OOM
    return RetryableError(message)


@asynccontextmanager
async def connect(url: SecretStr, db: int | None = None) -> AsyncIterator[tuple[Redis, Server]]:
    """A client for one call; Redis errors inside the block become function errors."""
    server = Server.parse(url, db)
    # No client-level retries: the step's retry policy is the one place that decides.
    options = {"socket_connect_timeout": 10, **server.options, "retry": Retry(NoBackoff(), 0)}
    pool = ConnectionPool(**options)
    client = Redis.from_pool(pool)
    try:
        yield client, server
    except RedisError as exc:
        raise _failure(server, exc) from None  # `from None`: the chain may quote the URL
    finally:
        await client.aclose()


async def call(client: Redis, *args: Any) -> Any:
    """One command; redis-py leaves ``execute_command`` unannotated, so type it once here."""
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]
