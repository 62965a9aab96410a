"""The RDS API as the ``rds.*`` functions use it: the spellings that tell instance and
cluster calls apart, calls whose errors become function errors, and waiting until a
snapshot or database is ``available``.

Instance and cluster snapshots use twin APIs that differ only in spelling; :class:`ApiKind`
holds the spellings, so every step in :mod:`functions.rds` is written once for both.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from functions.aws import aws_failure
from functions.sdk import Context, PermanentError, RetryableError

_MARGIN = 2.0  # seconds kept back so we, not the runner's timeout, say why we stopped
_MAX_POLL = 30.0  # longest pause between two Describe calls
_BUSY_DELAY = 30.0  # retry hint when RDS is busy with the database (backup window, modify)
# RDS refuses these while the database is busy; it will not be for long.
_BUSY = frozenset(
    {
        "InvalidDBInstanceState",
        "InvalidDBInstanceStateFault",
        "InvalidDBClusterStateFault",
        "InvalidDBSnapshotState",
        "InvalidDBClusterSnapshotStateFault",
    }
)
_FAILED = frozenset({"failed", "error", "deleting", "deleted"})


@dataclass(frozen=True)
class ApiKind:
    """How one kind of database and its snapshots are spelled in the RDS API."""

    snapshot: str  # "DBSnapshot": keys are <snapshot>Identifier, <snapshot>Arn, ...
    snapshot_method: str  # "db_snapshot": methods are create_<...>, copy_<...>
    snapshot_exists: str  # error code of a duplicate snapshot identifier
    snapshot_max_len: int
    db: str  # "DBInstance": keys <db>Identifier, <db>Arn; answers {"<db>": {...}}
    db_method: str  # "db_instance": describe_<...>s
    db_status: str  # key of the database's status
    db_not_found: str
    db_exists: str
    restore_method: str
    restore_snapshot_key: str  # how the restore call names the snapshot

    @property
    def snapshot_id(self) -> str:
        return f"{self.snapshot}Identifier"

    @property
    def db_id(self) -> str:
        return f"{self.db}Identifier"


KINDS: dict[str, ApiKind] = {
    "instance": ApiKind(
        snapshot="DBSnapshot",
        snapshot_method="db_snapshot",
        snapshot_exists="DBSnapshotAlreadyExists",
        snapshot_max_len=255,
        db="DBInstance",
        db_method="db_instance",
        db_status="DBInstanceStatus",
        db_not_found="DBInstanceNotFound",
        db_exists="DBInstanceAlreadyExists",
        restore_method="restore_db_instance_from_db_snapshot",
        restore_snapshot_key="DBSnapshotIdentifier",
    ),
    "cluster": ApiKind(
        snapshot="DBClusterSnapshot",
        snapshot_method="db_cluster_snapshot",
        snapshot_exists="DBClusterSnapshotAlreadyExistsFault",
        snapshot_max_len=63,
        db="DBCluster",
        db_method="db_cluster",
        db_status="Status",
        db_not_found="DBClusterNotFoundFault",
        db_exists="DBClusterAlreadyExistsFault",
        restore_method="restore_db_cluster_from_snapshot",
        restore_snapshot_key="SnapshotIdentifier",
    ),
}


# --- calls -------------------------------------------------------------------------------


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _failure(method: str, exc: ClientError | BotoCoreError) -> Exception:
    """A failed RDS call as a function error: busy → retry soon, refused → give up."""
    if isinstance(exc, ClientError) and _code(exc) in _BUSY:
        return RetryableError(f"{method}: {_code(exc)}", delay=_BUSY_DELAY)
    return aws_failure(method, exc)


async def call(client: Any, method: str, **kwargs: Any) -> dict[str, Any]:
    """``method``'s answer; an error becomes a function error."""
    try:
        answer: dict[str, Any] = await getattr(client, method)(**kwargs)
    except (ClientError, BotoCoreError) as exc:
        raise _failure(method, exc) from None
    return answer


async def call_unless(client: Any, code: str, method: str, **kwargs: Any) -> Any:
    """``method``'s answer, or ``None`` if RDS answers with error ``code`` (a duplicate,
    a missing resource): the caller has a plan for that one."""
    try:
        return await getattr(client, method)(**kwargs)
    except ClientError as exc:
        if _code(exc) == code:
            return None
        raise _failure(method, exc) from None
    except BotoCoreError as exc:
        raise _failure(method, exc) from None


async def find_db(client: Any, kind: ApiKind, identifier: str) -> dict[str, Any] | None:
    method = f"describe_{kind.db_method}s"
    answer = await call_unless(client, kind.db_not_found, method, **{kind.db_id: identifier})
    return None if answer is None else dict(answer[f"{kind.db}s"][0])


async def describe_snapshot(client: Any, kind: ApiKind, identifier: str) -> dict[str, Any]:
    answer = await call(
        client, f"describe_{kind.snapshot_method}s", **{kind.snapshot_id: identifier}
    )
    found: dict[str, Any] = answer[f"{kind.snapshot}s"][0]
    return found


async def tag_value(client: Any, arn: str, key: str) -> str | None:
    answer = await call(client, "list_tags_for_resource", ResourceName=arn)
    return next((t["Value"] for t in answer.get("TagList", []) if t["Key"] == key), None)


# --- waiting -----------------------------------------------------------------------------


def wait_deadline(ctx: Context, wait: float) -> float:
    """When to stop waiting: after ``wait`` seconds, or before the step's timeout."""
    return time.monotonic() + min(wait, max(0.0, ctx.remaining() - _MARGIN))


async def until_available(
    describe: Callable[[], Awaitable[dict[str, Any]]],
    current: dict[str, Any],
    status_key: str,
    what: str,
    deadline: float,
    interval: float,
) -> dict[str, Any]:
    """Describe until ``available``, pausing ``interval`` doubling up to 30 s. Past the
    deadline it is retryable: the retry adopts the same resource and waits on."""
    while True:
        status = str(current.get(status_key, "")).lower()
        if status == "available":
            return current
        if status in _FAILED or status.startswith(("incompatible-", "inaccessible-")):
            raise PermanentError(f"{what} is {status}")
        left = deadline - time.monotonic()
        if left <= 0:
            raise RetryableError(f"{what} is still {status or 'unknown'}")
        await asyncio.sleep(min(interval, left))
        interval = min(interval * 2, _MAX_POLL)
        current = await describe()


class Waiting(Protocol):
    """What the waits read of a step's params."""

    @property
    def wait(self) -> float: ...  # 0: do not wait

    @property
    def poll_interval(self) -> float: ...


async def await_snapshot(
    client: Any, kind: ApiKind, snap: dict[str, Any], deadline: float, p: Waiting
) -> dict[str, Any]:
    """``snap`` once it is available (or as it is, if ``p`` says not to wait)."""
    if p.wait == 0:
        return snap
    identifier = snap[kind.snapshot_id]
    return await until_available(
        lambda: describe_snapshot(client, kind, identifier),
        snap,
        "Status",
        f"snapshot {identifier}",
        deadline,
        p.poll_interval,
    )


async def await_db(
    client: Any, kind: ApiKind, db: dict[str, Any], deadline: float, p: Waiting
) -> dict[str, Any]:
    """``db`` once it is available (or as it is, if ``p`` says not to wait)."""
    if p.wait == 0:
        return db
    identifier = db[kind.db_id]

    async def describe() -> dict[str, Any]:
        found = await find_db(client, kind, identifier)
        if found is None:
            raise PermanentError(f"{kind.db} {identifier} disappeared while restoring")
        return found

    what = f"{kind.db} {identifier}"
    return await until_available(describe, db, kind.db_status, what, deadline, p.poll_interval)
