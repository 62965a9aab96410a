"""``rds.*``: an external RDS database captured alongside the cluster backup, and brought
back next to it on restore (aiobotocore).

    snapshot   create a DB snapshot (instance) or DB cluster snapshot (Aurora, Multi-AZ
               cluster), tagged with the backup and run; wait until it is available;
               optionally copy it to another region
    restore    restore such a snapshot into a new instance or cluster; wait until available

Both are idempotent, because a retried step (or a post step finishing what the pre step
started) must not fail on "already exists": identifiers derive deterministically from the
event, and an existing snapshot of the same database, or a database restored from the same
snapshot, is adopted and waited for instead of created.

Instance and cluster snapshots use twin APIs that differ only in spelling; the spellings,
the calls and the waits are in :mod:`functions.rds_api`, so every step here is written
once. Identifiers and tags derived from the event are in :mod:`functions.rds_naming`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from functions.aws import aws_client
from functions.rds_api import (
    KINDS,
    ApiKind,
    await_db,
    await_snapshot,
    call,
    call_unless,
    describe_snapshot,
    find_db,
    tag_value,
    wait_deadline,
)
from functions.rds_naming import TAG_PREFIX, event_names, rds_identifier, resource_tags
from functions.rendered import NameList, OptionalText, blank_is_none
from functions.sdk import Context, PermanentError, RetryableError, function

_REGION = r"^[a-z]{2}(-[a-z]+)+-\d+$"
_DB_ID = r"^[A-Za-z][A-Za-z0-9-]{0,62}$"

Kind = Literal["instance", "cluster"]


Region = Annotated[str, Field(pattern=_REGION)]
OptionalRegion = Annotated[Region | None, BeforeValidator(blank_is_none)]
OptionalBool = Annotated[bool | None, BeforeValidator(blank_is_none)]
OptionalPort = Annotated[
    Annotated[int, Field(ge=1, le=65535)] | None, BeforeValidator(blank_is_none)
]


# --- params and outputs ------------------------------------------------------------------


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The database the snapshot is (or was) taken of: a DB instance identifier, or with
    # kind: cluster a DB cluster identifier. Fills {db} in identifier templates.
    db: str = Field(pattern=_DB_ID)
    kind: Kind = "instance"
    region: OptionalRegion = None  # default: the dispatcher's AWS region
    tags: dict[str, str] = Field(default_factory=dict)  # beside the snaphook.io/* tags
    # How long to wait for `available` (bounded by the step's timeout as well). 0: do not
    # wait; a later call with the same identifier (a retry, a post step) waits instead.
    wait: float = Field(default=3600.0, ge=0, le=86400)
    poll_interval: float = Field(default=5.0, gt=0, le=300)  # first pause; doubles up to 30s


class SnapshotParams(_Common):
    # {db}, {backup_id}, {backup_name}, {run_id}, {namespace}, {target}; the result is made
    # a valid RDS identifier (lower case, hyphens). {backup_id} falls back to the run id.
    identifier: str = Field(default="{db}-{backup_id}", min_length=1, max_length=255)
    copy_to_region: OptionalRegion = None  # also copy the snapshot there (same identifier)
    copy_kms_key_id: OptionalText = None  # for encrypted snapshots: a key in that region

    @model_validator(mode="after")
    def _copy_needs_wait(self) -> SnapshotParams:
        # Only an available snapshot can be copied.
        if self.copy_to_region and self.wait == 0:
            raise ValueError("copy_to_region needs wait > 0")
        return self


class RestoreParams(_Common):
    # The snapshot, as rds.snapshot named it: the same template with the same default, so
    # a restore event for backup B finds the snapshot taken for B.
    snapshot: str = Field(default="{db}-{backup_id}", min_length=1, max_length=255)
    target: str = Field(min_length=1, max_length=63)  # the new instance/cluster (template)
    instance_class: OptionalText = None  # cluster: also create a writer instance of this class
    subnet_group: OptionalText = None
    security_group_ids: NameList = Field(default_factory=list)
    availability_zone: OptionalText = None
    publicly_accessible: OptionalBool = None
    multi_az: OptionalBool = None  # instances only
    port: OptionalPort = None
    engine: OptionalText = None  # clusters: default the snapshot's engine


class SnapshotCopy(BaseModel):
    region: str
    identifier: str
    arn: str
    status: str
    existed: bool


class SnapshotResult(BaseModel):
    kind: Kind
    db: str
    region: str
    identifier: str
    arn: str
    status: str
    created_at: datetime | None
    existed: bool  # an earlier attempt or step had created it; this one adopted it
    region_copy: SnapshotCopy | None = None


class RestoreResult(BaseModel):
    kind: Kind
    region: str
    snapshot: str
    identifier: str
    arn: str
    status: str
    endpoint: str | None
    reader_endpoint: str | None  # clusters
    port: int | None
    instance: str | None  # clusters: the writer instance created with instance_class
    existed: bool


# --- rds.snapshot ------------------------------------------------------------------------


async def _snapshot_in(
    client: Any,
    kind: ApiKind,
    *,
    method: str,
    identifier: str,
    db: str,
    **kwargs: Any,
) -> tuple[dict[str, Any], bool]:
    """Create (or copy) a snapshot; if ``identifier`` exists already, adopt it when it is
    of the same database, else refuse: it is somebody else's snapshot."""
    answer = await call_unless(client, kind.snapshot_exists, method, **kwargs)
    if answer is not None:
        created: dict[str, Any] = answer[kind.snapshot]
        return created, False
    existing = await describe_snapshot(client, kind, identifier)
    owner = str(existing.get(kind.db_id, ""))
    if owner.lower() != db.lower():
        raise PermanentError(f"snapshot {identifier} exists already, of {owner or 'another db'}")
    return existing, True


async def _copy_snapshot(
    ctx: Context,
    p: SnapshotParams,
    kind: ApiKind,
    source: dict[str, Any],
    tags: list[dict[str, str]],
    deadline: float,
) -> SnapshotCopy:
    """Copy the available snapshot into ``copy_to_region`` under the same identifier."""
    assert p.copy_to_region is not None
    identifier = source[kind.snapshot_id]
    options: dict[str, Any] = {"KmsKeyId": p.copy_kms_key_id} if p.copy_kms_key_id else {}
    async with aws_client(ctx, "rds", region=p.copy_to_region) as client:
        snap, existed = await _snapshot_in(
            client,
            kind,
            method=f"copy_{kind.snapshot_method}",
            identifier=identifier,
            db=p.db,
            Tags=tags,
            # botocore turns SourceRegion into the presigned URL cross-region copies need.
            SourceRegion=p.region or ctx.aws.region,
            **{
                f"Source{kind.snapshot_id}": source[f"{kind.snapshot}Arn"],
                f"Target{kind.snapshot_id}": identifier,
            },
            **options,
        )
        snap = await await_snapshot(client, kind, snap, deadline, p)
    return SnapshotCopy(
        region=p.copy_to_region,
        identifier=identifier,
        arn=snap[f"{kind.snapshot}Arn"],
        status=snap.get("Status", ""),
        existed=existed,
    )


@function("rds.snapshot")
async def snapshot(ctx: Context, p: SnapshotParams) -> SnapshotResult:
    """Snapshot an RDS instance or cluster, tagged with the backup; wait; copy if asked."""
    kind = KINDS[p.kind]
    region = p.region or ctx.aws.region
    if p.copy_to_region == region:
        raise PermanentError(f"copy_to_region is the snapshot's own region {region}")
    identifier = rds_identifier(p.identifier, event_names(ctx, p.db), kind.snapshot_max_len)
    tags = resource_tags(ctx, p.tags)
    deadline = wait_deadline(ctx, p.wait)
    async with aws_client(ctx, "rds", region=region) as client:
        snap, existed = await _snapshot_in(
            client,
            kind,
            method=f"create_{kind.snapshot_method}",
            identifier=identifier,
            db=p.db,
            Tags=tags,
            **{kind.db_id: p.db, kind.snapshot_id: identifier},
        )
        snap = await await_snapshot(client, kind, snap, deadline, p)
    ctx.logger.info("snapshot %s of %s is %s", identifier, p.db, snap.get("Status"))
    region_copy = None
    if p.copy_to_region:
        region_copy = await _copy_snapshot(ctx, p, kind, snap, tags, deadline)
    return SnapshotResult(
        kind=p.kind,
        db=p.db,
        region=region,
        identifier=identifier,
        arn=snap[f"{kind.snapshot}Arn"],
        status=snap.get("Status", ""),
        created_at=snap.get("SnapshotCreateTime"),
        existed=existed,
        region_copy=region_copy,
    )


# --- rds.restore -------------------------------------------------------------------------


def _restore_options(p: RestoreParams) -> dict[str, Any]:
    """The restore call's optional settings, as the API names them for this kind."""
    common = {
        "DBSubnetGroupName": p.subnet_group,
        "VpcSecurityGroupIds": p.security_group_ids or None,
        "Port": p.port,
    }
    if p.kind == "cluster":
        # A cluster restore takes no instance settings; they go to its writer instance.
        specific: dict[str, Any] = {"Engine": p.engine}
    else:
        specific = {
            "DBInstanceClass": p.instance_class,
            "AvailabilityZone": p.availability_zone,
            "PubliclyAccessible": p.publicly_accessible,
            "MultiAZ": p.multi_az,
        }
    return {k: v for k, v in {**common, **specific}.items() if v is not None}


async def _adopt_restored(client: Any, kind: ApiKind, db: dict[str, Any], snapshot: str) -> None:
    """An existing target is ours only if an earlier attempt restored it from this very
    snapshot (our tag says so); anything else is a database we must not touch."""
    restored_from = await tag_value(client, db[f"{kind.db}Arn"], TAG_PREFIX + "restored-from")
    if restored_from != snapshot:
        raise PermanentError(
            f"{kind.db} {db[kind.db_id]} exists already and was not restored from {snapshot}"
        )


async def _restore_db(
    client: Any, kind: ApiKind, target: str, snapshot: str, options: dict[str, Any]
) -> tuple[dict[str, Any], bool]:
    # Look first: not every RDS endpoint refuses a duplicate cluster identifier.
    existing = await find_db(client, kind, target)
    if existing is None:
        answer = await call_unless(
            client,
            kind.db_exists,
            kind.restore_method,
            **{kind.db_id: target, kind.restore_snapshot_key: snapshot},
            **options,
        )
        if answer is not None:
            created: dict[str, Any] = answer[kind.db]
            return created, False
        existing = await find_db(client, kind, target)  # lost a race with a retry
        if existing is None:
            raise RetryableError(f"{kind.db} {target} exists but cannot be described yet")
    await _adopt_restored(client, kind, existing, snapshot)
    return existing, True


async def _writer_instance(
    client: Any, cluster: dict[str, Any], p: RestoreParams, tags: list[dict[str, str]]
) -> dict[str, Any]:
    """A restored Aurora cluster has no instance to serve from; create its writer."""
    assert p.instance_class is not None
    kind = KINDS["instance"]
    cluster_id = cluster["DBClusterIdentifier"]
    identifier = rds_identifier(f"{cluster_id}-1", {}, 63)
    existing = await find_db(client, kind, identifier)
    if existing is not None:
        if existing.get("DBClusterIdentifier") != cluster_id:
            raise PermanentError(f"DB instance {identifier} exists already, outside {cluster_id}")
        return existing
    options = {"PubliclyAccessible": p.publicly_accessible, "AvailabilityZone": p.availability_zone}
    answer = await call(
        client,
        "create_db_instance",
        DBInstanceIdentifier=identifier,
        DBClusterIdentifier=cluster_id,
        Engine=cluster["Engine"],
        DBInstanceClass=p.instance_class,
        Tags=tags,
        **{k: v for k, v in options.items() if v is not None},
    )
    created: dict[str, Any] = answer["DBInstance"]
    return created


def _restore_result(
    p: RestoreParams, region: str, snapshot: str, db: dict[str, Any], existed: bool
) -> RestoreResult:
    kind = KINDS[p.kind]
    endpoint: Any = db.get("Endpoint")  # instances: {"Address", "Port"}; clusters: a host
    port = db.get("Port")
    if isinstance(endpoint, Mapping):
        port = endpoint.get("Port", port)
        endpoint = endpoint.get("Address")
    return RestoreResult(
        kind=p.kind,
        region=region,
        snapshot=snapshot,
        identifier=db[kind.db_id],
        arn=db[f"{kind.db}Arn"],
        status=str(db.get(kind.db_status, "")),
        endpoint=endpoint,
        reader_endpoint=db.get("ReaderEndpoint"),
        port=port,
        instance=None,
        existed=existed,
    )


@function("rds.restore")
async def restore(ctx: Context, p: RestoreParams) -> RestoreResult:
    """Restore a snapshot into a new instance or cluster and wait until it is available."""
    kind = KINDS[p.kind]
    region = p.region or ctx.aws.region
    names = event_names(ctx, p.db)
    snapshot = rds_identifier(p.snapshot, names, kind.snapshot_max_len)
    target = rds_identifier(p.target, names, 63)
    tags = resource_tags(ctx, p.tags, **{"restored-from": snapshot})
    deadline = wait_deadline(ctx, p.wait)
    options = _restore_options(p)
    async with aws_client(ctx, "rds", region=region) as client:
        if p.kind == "cluster" and "Engine" not in options:
            # Required by the cluster restore call; the snapshot knows it.
            options["Engine"] = (await describe_snapshot(client, kind, snapshot))["Engine"]
        db, existed = await _restore_db(client, kind, target, snapshot, {**options, "Tags": tags})
        db = await await_db(client, kind, db, deadline, p)
        result = _restore_result(p, region, snapshot, db, existed)
        if p.kind == "cluster" and p.instance_class:
            writer = await _writer_instance(client, db, p, tags)
            writer = await await_db(client, KINDS["instance"], writer, deadline, p)
            result.instance = writer["DBInstanceIdentifier"]
    ctx.logger.info("restored %s from %s: %s", target, snapshot, result.status)
    return result
