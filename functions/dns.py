"""Route53: point a record somewhere else around a backup, and put it back exactly.

``dns.route53``
    UPSERTs or DELETEs one record set (A, AAAA, CNAME, TXT; simple, weighted, or alias),
    after reading the record set it replaces, then waits (bounded) for the change to be
    ``INSYNC``. Its outputs hold that previous record set as Route53 returned it.
``dns.route53_revert``
    takes those outputs as ``undo`` and restores the previous state: UPSERTs the previous
    record set, or DELETEs the record if there was none. Running it twice changes nothing.

The blueprint pattern is a lease on the change step whose release is the revert (see
``hooks/dns-cutover.yaml``): the post event, a failed run or the TTL then puts DNS back.

Undo plans. The dispatcher records outputs only for a step that succeeded, but a step can
fail *after* Route53 accepted its change (the INSYNC wait hits the step timeout, a retry
gives up). So a step that holds a lease also keeps its undo plan in process
(``ctx.hold``) before it changes anything, and the revert falls back to that plan when its
``undo`` is empty. A retried attempt reuses the plan of the attempt before, so it never
mistakes its own earlier change for the state to restore. Held plans live in memory:
after a dispatcher restart only recorded outputs can be undone.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from functions.aws import aws_client, aws_failure
from functions.sdk import Context, PermanentError, function

RecordType = Literal["A", "AAAA", "CNAME", "TXT"]
Status = Literal["PENDING", "INSYNC"]

_POLL_FIRST = 0.25  # seconds before the first GetChange poll; doubles up to _POLL_MAX
_POLL_MAX = 5.0
_MARGIN = 1.0  # stop waiting this long before the step's timeout, so outputs get recorded
_PAGE = "100"
_ESCAPE = re.compile(r"\\(\d{3})")


# --- params and outputs ------------------------------------------------------------------


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise ValueError("not JSON (render structured values with `| tojson`)") from None


def _value_list(value: Any) -> Any:
    """Templates render to strings: ``"[...]"`` is a JSON list, any other string one value."""
    if isinstance(value, str):
        return _json(value) if value.lstrip().startswith("[") else [value]
    return value


def _undo_record(value: Any) -> Any:
    """``{{ lease.outputs | tojson }}`` arrives as text; ``{}`` means the step recorded none."""
    if isinstance(value, str):
        value = _json(value) if value.strip() else None
    return value or None


class AliasParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dns_name: str = Field(min_length=1, max_length=1024)
    hosted_zone_id: str | None = None  # the target's zone (an ALB's canonical zone); default: ours
    evaluate_target_health: bool = False


class RecordParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    zone_id: str | None = None  # "Z123..." or "/hostedzone/Z123..."
    zone: str | None = None  # the zone's name, looked up when no zone_id is given
    private: bool | None = None  # picks one of a public and a private zone of the same name
    action: Literal["UPSERT", "DELETE"] = "UPSERT"
    name: str = Field(min_length=1, max_length=255)
    type: RecordType
    ttl: int = Field(default=60, ge=0, le=2_147_483_647)
    values: Annotated[list[str], BeforeValidator(_value_list)] = Field(default_factory=list)
    alias: AliasParams | None = None
    set_identifier: str | None = Field(default=None, min_length=1, max_length=128)
    weight: int | None = Field(default=None, ge=0, le=255)
    wait: float = Field(default=120.0, ge=0, le=3600)  # seconds to wait for INSYNC

    @model_validator(mode="after")
    def _consistent(self) -> RecordParams:
        if (self.zone_id is None) == (self.zone is None):
            raise ValueError("give exactly one of zone_id and zone")
        if self.action == "DELETE":
            if self.values or self.alias is not None or self.weight is not None:
                raise ValueError("DELETE removes the record set as it is: no values/alias/weight")
            return self
        if bool(self.values) == (self.alias is not None):
            raise ValueError("UPSERT needs exactly one of values and alias")
        if (self.set_identifier is None) != (self.weight is None):
            raise ValueError("a weighted record needs both set_identifier and weight")
        _check_values(self.type, self.values)
        return self

    def key(self) -> _RecordKey:
        return _RecordKey(_dns_name(self.name), self.type, self.set_identifier)

    def record_set(self, zone_id: str) -> dict[str, Any]:
        """The record set to UPSERT, in Route53's own shape."""
        record: dict[str, Any] = {"Name": _dns_name(self.name), "Type": self.type}
        if self.set_identifier is not None:
            record |= {"SetIdentifier": self.set_identifier, "Weight": self.weight}
        if self.alias is not None:
            record["AliasTarget"] = {
                "HostedZoneId": _bare_id(self.alias.hosted_zone_id or zone_id),
                "DNSName": self.alias.dns_name,
                "EvaluateTargetHealth": self.alias.evaluate_target_health,
            }
        else:
            values = [_txt(v) for v in self.values] if self.type == "TXT" else self.values
            record |= {"TTL": self.ttl, "ResourceRecords": [{"Value": v} for v in values]}
        return record


class Route53Result(BaseModel):
    """What ``dns.route53`` did, and everything ``dns.route53_revert`` needs to undo it."""

    zone_id: str
    action: Literal["UPSERT", "DELETE"]
    name: str
    type: RecordType
    set_identifier: str | None = None
    previous: dict[str, Any] | None = None  # the record set before, as Route53 returned it
    applied: dict[str, Any] | None = None  # the record set UPSERTed (None for DELETE)
    changed: bool  # False: it already was as asked, so the revert leaves it alone
    change_id: str | None = None
    status: Status | None = None  # PENDING if the change was not INSYNC within `wait`


class RevertParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    undo: Annotated[Route53Result | None, BeforeValidator(_undo_record)] = None
    lease: str = ""  # filled in on lease release; finds the plan a failed step kept
    wait: float = Field(default=120.0, ge=0, le=3600)


class RevertResult(BaseModel):
    zone_id: str | None = None
    action: Literal["UPSERT", "DELETE", "NONE"]
    restored: dict[str, Any] | None = None  # the record set in place now (None: no record)
    change_id: str | None = None
    status: Status | None = None


def _check_values(record_type: str, values: list[str]) -> None:
    if record_type == "CNAME" and len(values) > 1:
        raise ValueError("a CNAME has exactly one value")
    versions = {"A": 4, "AAAA": 6}
    if record_type in versions:
        for value in values:
            try:
                address = ipaddress.ip_address(value)
            except ValueError:
                raise ValueError(f"values: not an IP address for an {record_type} record") from None
            if address.version != versions[record_type]:
                raise ValueError(
                    f"values: an {record_type} record needs IPv{versions[record_type]}"
                )


def _txt(value: str) -> str:
    """Route53 wants TXT strings quoted; quote a bare value for the author."""
    if value.startswith('"'):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dns_name(name: str) -> str:
    """A name as Route53 compares it: lower case, absolute, ``\\052`` escapes decoded."""
    decoded = _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), name)
    return decoded.lower().rstrip(".") + "."


def _bare_id(resource_id: str) -> str:
    return resource_id.rsplit("/", 1)[-1]


def _canonical(record: dict[str, Any]) -> dict[str, Any]:
    """A record set in the form two equal record sets share: Route53 answers with
    absolute lower-case names, and in any order of values."""
    canonical = {**record, "Name": _dns_name(record["Name"])}
    if "ResourceRecords" in record:
        canonical["ResourceRecords"] = sorted(r["Value"] for r in record["ResourceRecords"])
    alias = record.get("AliasTarget")
    if alias is not None:
        canonical["AliasTarget"] = {
            **alias,
            "DNSName": _dns_name(alias["DNSName"]),
            "HostedZoneId": _bare_id(alias["HostedZoneId"]),
        }
    return canonical


@dataclass(frozen=True)
class _RecordKey:
    """What identifies one record set in a zone."""

    name: str
    type: str
    set_identifier: str | None

    def same_name_and_type(self, record: dict[str, Any]) -> bool:
        return _dns_name(record["Name"]) == self.name and record["Type"] == self.type

    def matches(self, record: dict[str, Any]) -> bool:
        return self.same_name_and_type(record) and (
            record.get("SetIdentifier") == self.set_identifier
        )


# --- Route53 calls -----------------------------------------------------------------------


async def _zone_id(r53: Any, p: RecordParams) -> str:
    if p.zone_id is not None:
        return _bare_id(p.zone_id)
    assert p.zone is not None  # the validator asks for one of them
    wanted = _dns_name(p.zone)
    answer = await r53.list_hosted_zones_by_name(DNSName=wanted, MaxItems=_PAGE)
    zones = [
        zone
        for zone in answer["HostedZones"]
        if _dns_name(zone["Name"]) == wanted
        and (p.private is None or zone.get("Config", {}).get("PrivateZone") == p.private)
    ]
    if len(zones) != 1:
        found = "no hosted zone" if not zones else f"{len(zones)} hosted zones"
        raise PermanentError(f"{found} named {wanted} (give zone_id, or private: true/false)")
    return _bare_id(zones[0]["Id"])


async def _current(r53: Any, zone_id: str, key: _RecordKey) -> dict[str, Any] | None:
    """The record set for ``key`` as it is now, or ``None``.

    Route53 lists record sets sorted by name and type, so reading starts at ours and stops
    at the first record set of another name or type; weighted sets of one name may span
    pages.
    """
    start = {"StartRecordName": key.name, "StartRecordType": key.type}
    while True:
        page = await r53.list_resource_record_sets(HostedZoneId=zone_id, MaxItems=_PAGE, **start)
        for record in page["ResourceRecordSets"]:
            if key.matches(record):
                return dict(record)
            if not key.same_name_and_type(record):
                return None
        if not page.get("IsTruncated"):
            return None
        start = {
            "StartRecordName": page["NextRecordName"],
            "StartRecordType": page["NextRecordType"],
        }
        if page.get("NextRecordIdentifier"):
            start["StartRecordIdentifier"] = page["NextRecordIdentifier"]


async def _change(
    ctx: Context, r53: Any, zone_id: str, action: str, record: dict[str, Any], wait: float
) -> tuple[str, Status]:
    """Submit one change and wait for it; (change id, status)."""
    batch = {
        "Comment": f"snaphook run {ctx.run_id} step {ctx.step}"[:256],
        "Changes": [{"Action": action, "ResourceRecordSet": record}],
    }
    info = (await r53.change_resource_record_sets(HostedZoneId=zone_id, ChangeBatch=batch))[
        "ChangeInfo"
    ]
    change_id = _bare_id(info["Id"])
    status: Status = info["Status"]
    if status != "INSYNC":
        status = await _wait_insync(ctx, r53, change_id, wait)
    return change_id, status


async def _wait_insync(ctx: Context, r53: Any, change_id: str, wait: float) -> Status:
    """Poll GetChange with backoff until INSYNC, for at most ``wait`` seconds and never past
    the step's timeout. The change is made by now: if it is still PENDING, or GetChange
    fails, that is reported as the status rather than raised, so the outputs that undo the
    change are recorded."""
    deadline = time.monotonic() + max(0.0, min(wait, ctx.remaining() - _MARGIN))
    delay = _POLL_FIRST
    while time.monotonic() + delay <= deadline:
        await asyncio.sleep(delay)
        delay = min(delay * 2, _POLL_MAX)
        try:
            answer = await r53.get_change(Id=change_id)
        except (ClientError, BotoCoreError) as exc:
            ctx.logger.warning("GetChange %s failed: %s", change_id, aws_failure("get_change", exc))
            continue
        if answer["ChangeInfo"]["Status"] == "INSYNC":
            return "INSYNC"
    ctx.logger.warning("change %s not INSYNC within %.0fs", change_id, wait)
    return "PENDING"


# --- undo plans kept in process ----------------------------------------------------------


def _prior_plan(ctx: Context, zone_id: str, p: RecordParams) -> Route53Result | None:
    """The plan of an earlier attempt of this step, if it was for the same record."""
    plan = ctx.release_held_as(ctx.lease_id, Route53Result)
    if plan is None:
        return None
    key = p.key()
    planned = (plan.zone_id, plan.action, plan.name, plan.type, plan.set_identifier)
    wanted = (zone_id, p.action, key.name, key.type, key.set_identifier)
    return plan if planned == wanted else None


# --- the functions -----------------------------------------------------------------------


@function("dns.route53")
async def route53(ctx: Context, p: RecordParams) -> Route53Result:
    """UPSERT or DELETE one record set; outputs the record set it replaced, for the revert."""
    async with aws_client(ctx, "route53") as r53:
        try:
            return await _apply(ctx, r53, p)
        except (ClientError, BotoCoreError) as exc:
            raise aws_failure("route53", exc) from None


async def _apply(ctx: Context, r53: Any, p: RecordParams) -> Route53Result:
    zone_id = await _zone_id(r53, p)
    plan = _prior_plan(ctx, zone_id, p) or await _plan(r53, zone_id, p)
    if ctx.lease_id is not None:
        ctx.hold(plan)  # before the change: a failure from here on is still undone
    if not plan.changed:
        return plan
    record = plan.applied
    if record is None:
        # DELETE must name the record set exactly as it is; an earlier attempt may have
        # deleted it already.
        record = await _current(r53, zone_id, p.key())
        if record is None:
            return plan
    change_id, status = await _change(ctx, r53, zone_id, p.action, record, p.wait)
    ctx.logger.info("%s %s %s: %s", p.action, plan.name, p.type, status)
    return plan.model_copy(update={"change_id": change_id, "status": status})


async def _plan(r53: Any, zone_id: str, p: RecordParams) -> Route53Result:
    """What the change will replace, read before changing anything."""
    key = p.key()
    previous = await _current(r53, zone_id, key)
    applied = p.record_set(zone_id) if p.action == "UPSERT" else None
    if applied is None:
        changed = previous is not None
    else:
        changed = previous is None or _canonical(previous) != _canonical(applied)
    return Route53Result(
        zone_id=zone_id,
        action=p.action,
        name=key.name,
        type=p.type,
        set_identifier=p.set_identifier,
        previous=previous,
        applied=applied,
        changed=changed,
    )


@function("dns.route53_revert")
async def route53_revert(ctx: Context, p: RevertParams) -> RevertResult:
    """Restore what ``dns.route53`` replaced (``undo``: its outputs); idempotent."""
    held = ctx.release_held_as(
        p.lease or ctx.lease_id, Route53Result
    )  # taken back either way: frees it
    undo = p.undo or held
    if undo is None:
        # The change step failed before it planned anything, so it changed nothing.
        ctx.logger.info("nothing to revert: the change step recorded no undo plan")
        return RevertResult(action="NONE")
    async with aws_client(ctx, "route53") as r53:
        try:
            return await _restore(ctx, r53, undo, p.wait)
        except (ClientError, BotoCoreError) as exc:
            raise aws_failure("route53 revert", exc) from None


async def _restore(ctx: Context, r53: Any, undo: Route53Result, wait: float) -> RevertResult:
    zone_id = undo.zone_id
    if not undo.changed:
        return RevertResult(zone_id=zone_id, action="NONE")  # the step found it as asked
    if undo.previous is not None:
        # UPSERT is idempotent, and replaces whatever is there now with what was there.
        change_id, status = await _change(ctx, r53, zone_id, "UPSERT", undo.previous, wait)
        return RevertResult(
            zone_id=zone_id,
            action="UPSERT",
            restored=undo.previous,
            change_id=change_id,
            status=status,
        )
    key = _RecordKey(_dns_name(undo.name), undo.type, undo.set_identifier)
    live = await _current(r53, zone_id, key)
    if live is None:
        return RevertResult(zone_id=zone_id, action="NONE")  # reverted before
    if undo.applied is None or _canonical(live) != _canonical(undo.applied):
        ctx.logger.warning("%s %s changed since the step set it; deleting it", key.name, key.type)
    change_id, status = await _change(ctx, r53, zone_id, "DELETE", live, wait)
    return RevertResult(zone_id=zone_id, action="DELETE", change_id=change_id, status=status)
