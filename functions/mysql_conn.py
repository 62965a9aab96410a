"""Connections for the ``mysql.*`` functions: login parameters, a session on aiomysql, and
how server errors become function errors (never quoting a parameter value, so never a
password).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiomysql
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from functions.sdk import FunctionError, PermanentError, RetryableError

# Server errors retrying cannot fix: access denied (1044, 1045, 1142, 1698), missing
# privilege such as RELOAD for FTWRL (1227), unknown database (1049).
PERMANENT_CODES = frozenset({1044, 1045, 1049, 1142, 1227, 1698})
_UNKNOWN_THREAD = 1094  # KILL of a session that has already ended


class Login(BaseModel):
    model_config = ConfigDict(extra="forbid")

    port: int = Field(default=3306, ge=1, le=65535)
    user: str = Field(default="root", min_length=1)
    password: SecretStr = SecretStr("")
    connect_timeout: float = Field(default=10.0, gt=0, le=300)


class ServerParams(Login):
    host: str = Field(min_length=1)


def _failure(where: str, action: str, exc: BaseException) -> FunctionError:
    """A function error naming the server and what failed; never a parameter value."""
    mysql_error = isinstance(exc, aiomysql.MySQLError) and exc.args
    code = exc.args[0] if mysql_error and isinstance(exc.args[0], int) else None
    text = str(exc.args[1]) if code is not None and len(exc.args) > 1 else str(exc)
    message = f"mysql {where}: {action}: {text or type(exc).__name__}"
    if code:
        message += f" (error {code})"
    return (PermanentError if code in PERMANENT_CODES else RetryableError)(message)


@dataclass
class Session:
    conn: Any  # aiomysql.Connection
    host: str
    port: int

    @property
    def where(self) -> str:  # for messages
        return f"{self.host}:{self.port}"

    @property
    def connection_id(self) -> int:
        return int(self.conn.thread_id())

    async def rows(self, action: str, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        try:
            async with self.conn.cursor(aiomysql.DictCursor) as cursor:
                await cursor.execute(sql, args or None)
                return list(await cursor.fetchall())
        except (aiomysql.MySQLError, OSError) as exc:
            raise _failure(self.where, action, exc) from None

    async def close(self) -> None:
        """Say goodbye (servers log dropped clients as aborted); a dead link just closes."""
        try:
            await self.conn.ensure_closed()
        except (aiomysql.MySQLError, OSError):
            pass
        finally:
            self.conn.close()


async def open_session(host: str, p: Login, timeout: float) -> Session:
    try:
        conn = await aiomysql.connect(
            host=host,
            port=p.port,
            user=p.user,
            password=p.password.get_secret_value(),
            connect_timeout=max(1.0, min(p.connect_timeout, timeout)),
            autocommit=True,
            charset="utf8mb4",
            program_name="snaphook",
        )
    except (aiomysql.MySQLError, OSError) as exc:
        raise _failure(f"{host}:{p.port}", "connect", exc) from None
    return Session(conn, host, p.port)


async def kill_session(session: Session, connection_id: int) -> bool:
    """End another session; False if it had already ended."""
    try:
        async with session.conn.cursor() as cursor:
            await cursor.execute("KILL CONNECTION %s", (connection_id,))
    except (aiomysql.MySQLError, OSError) as exc:
        if exc.args and exc.args[0] == _UNKNOWN_THREAD:
            return False
        raise _failure(session.where, f"end session {connection_id}", exc) from None
    return True
