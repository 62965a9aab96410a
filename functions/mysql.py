"""MySQL and MariaDB: a freeze for volume snapshots, and logical dumps streamed to S3.

    mysql.freeze    FLUSH TABLES WITH READ LOCK on a connection the lease keeps open
    mysql.thaw      UNLOCK TABLES and close it; "not frozen" is success
    mysql.dump      mariadb-dump (or mysqldump) | gzip -> S3 multipart, sha256 and size out
    mysql.restore   S3 -> gunzip -> mariadb (or mysql) into a database, created on request

FTWRL lives as long as its session, so a dispatcher that dies takes the lock with it (the
kernel closes the socket). Three more guards keep a server from staying frozen:

- A freeze that fails or is cancelled (step timeout) KILLs its own session from a second
  connection. A *pending* FTWRL already blocks every write, and when a server notices
  that the client of a waiting statement has gone depends on the server (MariaDB 10.11
  polls, within about a second); the KILL makes it immediate everywhere.
- The freezing session also takes a user-level lock named after the lease. A thaw running
  where the connection is not held (another replica, a restarted process) finds the
  session with ``IS_USED_LOCK`` and ends it, instead of assuming it is gone.
- ``session_timeout`` becomes the session's ``wait_timeout``: the server itself ends an
  idle frozen session if snaphook disappears without closing it (node lost, partition).

This module holds the freeze and thaw. The dump and restore, and how the client programs
get their credentials, are in :mod:`functions.mysql_dump` (imported here, so importing
this module registers all four); connecting is in :mod:`functions.mysql_conn`.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass

from pydantic import BaseModel, Field

from functions.mysql_conn import Login, ServerParams, Session, kill_session, open_session
from functions.mysql_dump import (
    DumpParams,
    DumpResult,
    RestoreParams,
    RestoreResult,
    dump,
    restore,
)
from functions.sdk import Context, FunctionError, PermanentError, RetryableError, function

__all__ = [
    "SESSION_ENDED",
    "BinlogPosition",
    "DumpParams",
    "DumpResult",
    "FreezeParams",
    "FreezeResult",
    "RestoreParams",
    "RestoreResult",
    "ServerParams",
    "ThawParams",
    "ThawResult",
    "dump",
    "freeze",
    "restore",
    "thaw",
]

SESSION_ENDED = "session ended; the server released the lock with it"
_CLEANUP_TIMEOUT = 5.0  # connecting to kill a session, when the step's own time may be up


class FreezeParams(ServerParams):
    # FTWRL waits for running writes while already blocking new ones: give up early and
    # let the step retry rather than stall the application behind a long UPDATE.
    lock_wait_timeout: int = Field(default=10, ge=1, le=86_400)
    # Seconds of silence after which the server ends the frozen session on its own; set it
    # a little above the lease's ttl. Unset: the server's wait_timeout (often 8 hours).
    session_timeout: int | None = Field(default=None, ge=1, le=31_536_000)


class BinlogPosition(BaseModel):
    file: str
    position: int
    gtid: str | None = None


class FreezeResult(BaseModel):
    server_version: str
    connection_id: int
    binlog: BinlogPosition | None  # None: binary logging is off
    waited_seconds: float  # how long FTWRL waited for running writes


class ThawParams(Login):
    # Given, a thaw that does not hold the connection (another replica, a restart) looks
    # the freezing session up on the server and ends it; without, it trusts that the
    # session ended with the process that held it.
    host: str | None = None
    lease: str = ""  # filled in when the lease is released


class ThawResult(BaseModel):
    unlocked: bool
    reason: str | None = None
    connection_id: int | None = None
    held_seconds: float | None = None


def _lock_name(lease_id: str) -> str:
    return f"snaphook:{lease_id}"[:64]  # the servers' limit for user-level lock names


# --- freeze / thaw ----------------------------------------------------------------------


@dataclass
class _Frozen:
    """What the lease holds: the session with the lock, and since when."""

    session: Session
    since: float  # time.monotonic()


@function("mysql.freeze")
async def freeze(ctx: Context, p: FreezeParams) -> FreezeResult:
    """Flush and lock all tables for writes; the lock holds until mysql.thaw or the lease ends.

    A long-running write makes FTWRL wait; after ``lock_wait_timeout`` seconds the step
    fails (retryable) and nothing stays locked.
    """
    if ctx.lease_id is None:
        raise PermanentError("mysql.freeze needs a lease: {ttl: ..., release: mysql.thaw}")
    session = await open_session(p.host, p, ctx.remaining())
    try:
        result = await _lock(session, p, ctx.lease_id)
    except BaseException:
        await _abandon(session, p)
        raise
    ctx.hold(_Frozen(session, since=time.monotonic()))
    ctx.logger.info(
        "froze %s (session %d, waited %.3fs)",
        session.where,
        result.connection_id,
        result.waited_seconds,
    )
    return result


async def _lock(session: Session, p: FreezeParams, lease_id: str) -> FreezeResult:
    timeouts = {"lock_wait_timeout": p.lock_wait_timeout}
    if p.session_timeout is not None:
        timeouts["wait_timeout"] = p.session_timeout
    assignments = ", ".join(f"SESSION {name} = %s" for name in timeouts)
    await session.rows("set session timeouts", f"SET {assignments}", list(timeouts.values()))
    [mark] = await session.rows(
        "mark the session",
        # Waits a little: the session of a failed earlier attempt may still be ending.
        "SELECT GET_LOCK(%s, 2) AS got, VERSION() AS version",
        (_lock_name(lease_id),),
    )
    if mark["got"] != 1:  # an earlier attempt's session for this lease still exists
        raise RetryableError(f"mysql {session.where}: lease {lease_id} is frozen by a session")
    started = time.monotonic()
    await session.rows(
        f"FLUSH TABLES WITH READ LOCK (lock_wait_timeout {p.lock_wait_timeout}s)",
        "FLUSH TABLES WITH READ LOCK",
    )
    waited = time.monotonic() - started
    return FreezeResult(
        server_version=mark["version"],
        connection_id=session.connection_id,
        binlog=await _binlog_position(session, mark["version"]),
        waited_seconds=round(waited, 3),
    )


def _is_mysql_at_least(version: str, minimum: tuple[int, int]) -> bool:
    if "mariadb" in version.lower():
        return False
    found = re.match(r"(\d+)\.(\d+)", version)
    return found is not None and (int(found[1]), int(found[2])) >= minimum


async def _binlog_position(session: Session, version: str) -> BinlogPosition | None:
    # MySQL 8.2 renamed the statement and 8.4 dropped the old name; MariaDB keeps it.
    statement = (
        "SHOW BINARY LOG STATUS" if _is_mysql_at_least(version, (8, 2)) else "SHOW MASTER STATUS"
    )
    rows = await session.rows("read the binlog position", statement)
    if not rows:
        return None  # binary logging is off
    gtid = rows[0].get("Executed_Gtid_Set")  # MySQL reports it here, MariaDB separately
    if gtid is None and "mariadb" in version.lower():
        [row] = await session.rows("read the GTID position", "SELECT @@gtid_binlog_pos AS gtid")
        gtid = row["gtid"]
    return BinlogPosition(
        file=rows[0]["File"], position=int(rows[0]["Position"]), gtid=gtid or None
    )


async def _abandon(session: Session, p: Login) -> None:
    """End a session whose freeze failed or was cancelled, also from a second connection:
    a pending FTWRL blocks writes until the server notices our socket is gone, at a moment
    of its choosing. Best effort: if the KILL fails, that moment still comes."""
    connection_id = session.connection_id
    await session.close()
    with contextlib.suppress(FunctionError):
        killer = await open_session(session.host, p, _CLEANUP_TIMEOUT)
        try:
            await kill_session(killer, connection_id)
        finally:
            await killer.close()


@function("mysql.thaw")
async def thaw(ctx: Context, p: ThawParams) -> ThawResult:
    """UNLOCK TABLES and close the lease's connection.

    Nothing to unlock (never frozen, thawed already, the session ended with a restart) is
    success: ``unlocked: false`` and the reason.
    """
    lease = p.lease or ctx.lease_id or ""
    held = ctx.release_held(lease) if lease else None
    if isinstance(held, _Frozen):
        return await _unlock(ctx, held)
    if p.host is not None and lease:
        return await _end_elsewhere(p, p.host, lease, ctx.remaining())
    return ThawResult(unlocked=False, reason=SESSION_ENDED)


async def _unlock(ctx: Context, frozen: _Frozen) -> ThawResult:
    session = frozen.session
    held = round(time.monotonic() - frozen.since, 3)
    try:
        await session.rows("UNLOCK TABLES", "UNLOCK TABLES")
    except FunctionError as exc:
        # The server ended the session early (restart, wait_timeout, KILL): no lock left,
        # but it may have gone before the snapshot finished, so say so.
        ctx.logger.warning("%s: frozen session ended before the thaw: %s", session.where, exc)
        reason = f"the session ended before the thaw ({exc}); the lock went with it"
        return ThawResult(
            unlocked=False, reason=reason, connection_id=session.connection_id, held_seconds=held
        )
    finally:
        await session.close()
    ctx.logger.info(
        "thawed %s (session %d) after %.3fs", session.where, session.connection_id, held
    )
    return ThawResult(unlocked=True, connection_id=session.connection_id, held_seconds=held)


async def _end_elsewhere(p: ThawParams, host: str, lease: str, timeout: float) -> ThawResult:
    """Not held in this process: if the freezing session still exists, it holds the
    lease's named lock, which tells us its id; killing it releases FTWRL."""
    session = await open_session(host, p, timeout)
    try:
        [row] = await session.rows(
            "find the frozen session", "SELECT IS_USED_LOCK(%s) AS holder", (_lock_name(lease),)
        )
        holder = row["holder"]
        if holder is None or not await kill_session(session, int(holder)):
            return ThawResult(unlocked=False, reason=SESSION_ENDED)
    finally:
        await session.close()
    return ThawResult(
        unlocked=True,
        reason=f"ended session {holder}, which held the lock from another process",
        connection_id=int(holder),
    )
