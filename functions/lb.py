"""ELBv2 (ALB/NLB): take an application out of traffic around a backup, and put it back.

``lb.elbv2`` does one ``action``:

``deregister``      targets of a target group (by default all that are registered), then
                    waits until they finished draining (gone or ``unused``);
``register``        targets, optionally waiting until they are healthy;
``maintenance_on``  a listener's default action becomes a fixed-response page;
``maintenance_off`` a listener's default actions become ``default_actions`` again.

Listener rules are never touched: only the default action (the listener's last resort)
changes, so rules that keep e.g. a health endpoint or an admin path alive keep working.
Each output carries what undoing it needs, and ``lb.elbv2_revert`` does that from it
(``undo``): re-registers what was deregistered, deregisters what was newly registered,
restores the default actions that were there before.

As in :mod:`functions.dns`, a step that holds a lease keeps its undo plan in process
before it changes anything, so the revert also works for a step that failed after its
change (e.g. draining took longer than the step's retries allowed), and a retried attempt
keeps the targets and actions the first attempt found.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from functions.aws import aws_client, aws_failure
from functions.sdk import Context, PermanentError, RetryableError, function

Action = Literal["deregister", "register", "maintenance_on", "maintenance_off"]
ContentType = Literal[
    "text/plain", "text/css", "text/html", "application/javascript", "application/json"
]

_POLL_FIRST = 0.25  # seconds before the first poll; doubles up to _POLL_MAX
_POLL_MAX = 5.0
_MARGIN = 1.0  # stop waiting this long before the step's timeout
_MAINTENANCE_PAGE = (
    "<!doctype html><title>Maintenance</title>"
    "<h1>Down for maintenance</h1><p>We will be back in a few minutes.</p>"
)


# --- params and outputs ------------------------------------------------------------------


def _json_text(value: Any) -> Any:
    """Templates render to strings: structured params may come as ``{{ x | tojson }}``."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value) if value.strip() else None
    except json.JSONDecodeError:
        raise ValueError("not JSON (render structured values with `| tojson`)") from None


def _undo_record(value: Any) -> Any:
    """``{}`` (the outputs of a step that did not finish) means: no recorded undo."""
    return _json_text(value) or None


class TargetRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)  # instance id, IP address, or Lambda ARN
    port: int | None = Field(default=None, ge=1, le=65535)  # default: the group's port
    availability_zone: str | None = None

    def api(self) -> dict[str, Any]:
        target: dict[str, Any] = {"Id": self.id}
        if self.port is not None:
            target["Port"] = self.port
        if self.availability_zone is not None:
            target["AvailabilityZone"] = self.availability_zone
        return target


class LbParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: Action
    target_group: str | None = None  # ARN or name (deregister, register)
    targets: Annotated[list[TargetRef] | None, BeforeValidator(_json_text)] = None
    listener: str | None = None  # listener ARN (maintenance_*) ...
    load_balancer: str | None = None  # ... or load balancer name/ARN plus `port`
    port: int | None = Field(default=None, ge=1, le=65535)
    status_code: int = Field(default=503, ge=200, le=599)
    content_type: ContentType = "text/html"
    body: str = Field(default=_MAINTENANCE_PAGE, max_length=1024)
    default_actions: Annotated[list[dict[str, Any]] | None, BeforeValidator(_json_text)] = None
    wait: float = Field(default=300.0, ge=0, le=3600)  # for draining / health; 0: no waiting
    wait_healthy: bool = False  # register: wait until the targets pass health checks

    @model_validator(mode="after")
    def _consistent(self) -> LbParams:
        if self.action in ("deregister", "register"):
            if self.target_group is None:
                raise ValueError(f"{self.action} needs target_group")
            if self.action == "register" and not self.targets:
                raise ValueError("register needs targets")
            return self
        if (self.listener is None) == (self.load_balancer is None or self.port is None):
            raise ValueError("give listener, or load_balancer and port")
        if 300 <= self.status_code < 400:
            raise ValueError("status_code: a fixed response is 2XX, 4XX or 5XX")
        if self.action == "maintenance_off" and not self.default_actions:
            raise ValueError("maintenance_off needs default_actions (maintenance_on's outputs)")
        return self

    def page(self) -> list[dict[str, Any]]:
        config = {
            "StatusCode": str(self.status_code),
            "ContentType": self.content_type,
            "MessageBody": self.body,
        }
        return [{"Type": "fixed-response", "FixedResponseConfig": config}]


class LbResult(BaseModel):
    """What ``lb.elbv2`` did, and everything ``lb.elbv2_revert`` needs to undo it."""

    action: Action
    target_group_arn: str | None = None
    targets: list[dict[str, Any]] = Field(default_factory=list)  # those this step moved
    settled: bool | None = None  # drained (deregister) / healthy (register, if waited)
    listener_arn: str | None = None
    previous_default_actions: list[dict[str, Any]] | None = None
    default_actions: list[dict[str, Any]] | None = None  # what the listener has now
    changed: bool  # False: it already was as asked, so the revert leaves it alone


class RevertParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    undo: Annotated[LbResult | None, BeforeValidator(_undo_record)] = None
    lease: str = ""  # filled in on lease release; finds the plan a failed step kept
    wait: float = Field(default=0.0, ge=0, le=3600)  # for moved targets to be healthy / drained


class RevertResult(BaseModel):
    action: Literal["register", "deregister", "restore_default_actions", "none"]
    target_group_arn: str | None = None
    targets: list[dict[str, Any]] = Field(default_factory=list)
    settled: bool | None = None
    listener_arn: str | None = None
    default_actions: list[dict[str, Any]] | None = None


# --- ELBv2 calls -------------------------------------------------------------------------


async def _target_group_arn(elb: Any, name_or_arn: str) -> str:
    if name_or_arn.startswith("arn:"):
        return name_or_arn
    groups = (await elb.describe_target_groups(Names=[name_or_arn]))["TargetGroups"]
    return str(groups[0]["TargetGroupArn"])


async def _listener_arn(elb: Any, p: LbParams) -> str:
    if p.listener is not None:
        return p.listener
    assert p.load_balancer is not None  # the validator asks for listener or both
    which = "LoadBalancerArns" if p.load_balancer.startswith("arn:") else "Names"
    balancers = (await elb.describe_load_balancers(**{which: [p.load_balancer]}))["LoadBalancers"]
    paginator = elb.get_paginator("describe_listeners")
    async for page in paginator.paginate(LoadBalancerArn=balancers[0]["LoadBalancerArn"]):
        for listener in page["Listeners"]:
            if listener["Port"] == p.port:
                return str(listener["ListenerArn"])
    raise PermanentError(f"load balancer {p.load_balancer} has no listener on port {p.port}")


async def _default_actions(elb: Any, listener_arn: str) -> list[dict[str, Any]]:
    listeners = (await elb.describe_listeners(ListenerArns=[listener_arn]))["Listeners"]
    return list(listeners[0]["DefaultActions"])


def _restorable(actions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Actions as described, made fit to be set again: DescribeListeners never returns an
    OIDC client secret, so a restored OIDC action must ask to keep the existing one."""
    restored = []
    for action in actions:
        oidc = action.get("AuthenticateOidcConfig")
        if oidc is not None and "ClientSecret" not in oidc:
            action = {**action, "AuthenticateOidcConfig": {**oidc, "UseExistingClientSecret": True}}
        restored.append(action)
    return restored


def _same_actions(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """Equal as the listener would act on them (AWS adds ``Order`` when describing)."""

    def strip(actions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in action.items() if k != "Order"} for action in actions]

    return strip(a) == strip(b)


def _same_target(target: dict[str, Any], ref: dict[str, Any]) -> bool:
    """``ref`` (maybe without a port: any port) names ``target``."""
    return target["Id"] == ref["Id"] and ref.get("Port", target.get("Port")) == target.get("Port")


async def _health(
    elb: Any, group_arn: str, targets: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """(target, state) descriptions: of ``targets``, or of every registered target."""
    query: dict[str, Any] = {"TargetGroupArn": group_arn}
    if targets:
        query["Targets"] = targets
    return list((await elb.describe_target_health(**query))["TargetHealthDescriptions"])


async def _registered(elb: Any, group_arn: str) -> list[dict[str, Any]]:
    """Targets in service or on the way there; a draining target is on its way out."""
    return [
        d["Target"]
        for d in await _health(elb, group_arn)
        if d["TargetHealth"]["State"] != "draining"
    ]


async def _poll(ctx: Context, wait: float, done: Callable[[], Awaitable[bool]]) -> bool:
    """Whether ``done()`` became true within ``wait`` seconds (and before the step's
    timeout), polling with backoff."""
    deadline = time.monotonic() + max(0.0, min(wait, ctx.remaining() - _MARGIN))
    delay = _POLL_FIRST
    while True:
        if await done():
            return True
        if time.monotonic() + delay > deadline:
            return False
        await asyncio.sleep(delay)
        delay = min(delay * 2, _POLL_MAX)


async def _drained(elb: Any, group_arn: str, targets: list[dict[str, Any]]) -> bool:
    if not targets:
        return True
    # "unused": deregistered (Target.NotRegistered) or in no use; "draining": not yet.
    states = [d["TargetHealth"]["State"] for d in await _health(elb, group_arn, targets)]
    return all(state == "unused" for state in states)


async def _healthy(elb: Any, group_arn: str, targets: list[dict[str, Any]]) -> bool:
    states = [d["TargetHealth"]["State"] for d in await _health(elb, group_arn, targets)]
    return all(state == "healthy" for state in states)


def _names(targets: list[dict[str, Any]]) -> str:
    return ", ".join(f"{t['Id']}:{t['Port']}" if "Port" in t else t["Id"] for t in targets)


# --- undo plans kept in process ----------------------------------------------------------


def _prior_plan(ctx: Context, action: Action, resource: str) -> LbResult | None:
    """The plan of an earlier attempt of this step, if it was for the same resource."""
    plan = ctx.release_held_as(ctx.lease_id, LbResult)
    if plan is None or plan.action != action:
        return None
    return plan if resource in (plan.target_group_arn, plan.listener_arn) else None


def _keep(ctx: Context, plan: LbResult) -> None:
    if ctx.lease_id is not None:
        ctx.hold(plan)  # before the change: a failure from here on is still undone


# --- lb.elbv2 ----------------------------------------------------------------------------


@function("lb.elbv2")
async def elbv2(ctx: Context, p: LbParams) -> LbResult:
    """Deregister/register targets, or switch a listener to a maintenance page and back."""
    handlers = {
        "deregister": _deregister,
        "register": _register,
        "maintenance_on": _switch_listener,
        "maintenance_off": _switch_listener,
    }
    async with aws_client(ctx, "elbv2") as elb:
        try:
            return await handlers[p.action](ctx, elb, p)
        except (ClientError, BotoCoreError) as exc:
            raise aws_failure(f"elbv2 {p.action}", exc) from None


async def _deregister(ctx: Context, elb: Any, p: LbParams) -> LbResult:
    assert p.target_group is not None
    group_arn = await _target_group_arn(elb, p.target_group)
    registered = await _registered(elb, group_arn)
    plan = _prior_plan(ctx, "deregister", group_arn)
    if plan is None:
        wanted = [t.api() for t in p.targets] if p.targets else None
        # Only targets registered now: the revert must not add targets that were not there.
        moving = [
            t for t in registered if wanted is None or any(_same_target(t, w) for w in wanted)
        ]
        plan = LbResult(
            action="deregister", target_group_arn=group_arn, targets=moving, changed=bool(moving)
        )
    _keep(ctx, plan)
    still = [t for t in plan.targets if any(_same_target(r, t) for r in registered)]
    if still:
        await elb.deregister_targets(TargetGroupArn=group_arn, Targets=still)
    drained = await _poll(ctx, p.wait, lambda: _drained(elb, group_arn, plan.targets))
    if not drained and p.wait > 0:
        # Not drained is not done: connections may still be writing. A retry waits on.
        raise RetryableError(f"targets still draining after {p.wait:g}s: {_names(plan.targets)}")
    ctx.logger.info("deregistered %s (drained: %s)", _names(plan.targets) or "nothing", drained)
    return plan.model_copy(update={"settled": drained})


async def _register(ctx: Context, elb: Any, p: LbParams) -> LbResult:
    assert p.target_group is not None and p.targets
    group_arn = await _target_group_arn(elb, p.target_group)
    wanted = [t.api() for t in p.targets]
    plan = _prior_plan(ctx, "register", group_arn)
    if plan is None:
        registered = await _registered(elb, group_arn)
        # Only the new ones: the revert must not deregister what was there before.
        new = [t for t in wanted if not any(_same_target(r, t) for r in registered)]
        plan = LbResult(
            action="register", target_group_arn=group_arn, targets=new, changed=bool(new)
        )
    _keep(ctx, plan)
    await elb.register_targets(TargetGroupArn=group_arn, Targets=wanted)
    if not p.wait_healthy:
        return plan
    if not await _poll(ctx, p.wait, lambda: _healthy(elb, group_arn, wanted)):
        raise RetryableError(f"targets not healthy after {p.wait:g}s: {_names(wanted)}")
    return plan.model_copy(update={"settled": True})


async def _switch_listener(ctx: Context, elb: Any, p: LbParams) -> LbResult:
    listener_arn = await _listener_arn(elb, p)
    plan = _prior_plan(ctx, p.action, listener_arn)
    if plan is None:
        target = p.page() if p.action == "maintenance_on" else _restorable(p.default_actions or [])
        previous = await _default_actions(elb, listener_arn)
        plan = LbResult(
            action=p.action,
            listener_arn=listener_arn,
            previous_default_actions=previous,
            default_actions=target,
            changed=not _same_actions(previous, target),
        )
    _keep(ctx, plan)
    if plan.changed:
        # ModifyListener with only DefaultActions leaves the listener's rules as they are.
        await elb.modify_listener(ListenerArn=listener_arn, DefaultActions=plan.default_actions)
    ctx.logger.info("listener %s: %s (changed: %s)", listener_arn, p.action, plan.changed)
    return plan


# --- lb.elbv2_revert ---------------------------------------------------------------------


@function("lb.elbv2_revert")
async def elbv2_revert(ctx: Context, p: RevertParams) -> RevertResult:
    """Undo what ``lb.elbv2`` did (``undo``: its outputs); idempotent."""
    # Taken back either way, which frees it.
    held = ctx.release_held_as(p.lease or ctx.lease_id, LbResult)
    undo = p.undo or held
    if undo is None:
        # The step failed before it planned anything, so it changed nothing.
        ctx.logger.info("nothing to revert: the load balancer step recorded no undo plan")
        return RevertResult(action="none")
    if not undo.changed:
        return RevertResult(action="none")  # the step found it as asked
    async with aws_client(ctx, "elbv2") as elb:
        try:
            if undo.listener_arn is not None:
                return await _restore_listener(elb, undo)
            return await _restore_targets(ctx, elb, undo, p.wait)
        except (ClientError, BotoCoreError) as exc:
            raise aws_failure(f"elbv2 revert {undo.action}", exc) from None


async def _restore_listener(elb: Any, undo: LbResult) -> RevertResult:
    assert undo.listener_arn is not None and undo.previous_default_actions is not None
    actions = _restorable(undo.previous_default_actions)
    await elb.modify_listener(ListenerArn=undo.listener_arn, DefaultActions=actions)
    return RevertResult(
        action="restore_default_actions", listener_arn=undo.listener_arn, default_actions=actions
    )


async def _restore_targets(ctx: Context, elb: Any, undo: LbResult, wait: float) -> RevertResult:
    assert undo.target_group_arn is not None
    group_arn, targets = undo.target_group_arn, undo.targets
    result = RevertResult(action="none", target_group_arn=group_arn, targets=targets)
    if not targets:
        return result
    if undo.action == "deregister":
        await elb.register_targets(TargetGroupArn=group_arn, Targets=targets)
        healthy = await _poll(ctx, wait, lambda: _healthy(elb, group_arn, targets))
        return result.model_copy(update={"action": "register", "settled": healthy})
    registered = await _registered(elb, group_arn)
    still = [t for t in targets if any(_same_target(r, t) for r in registered)]
    if still:  # deregistering a target that is not registered is an error
        await elb.deregister_targets(TargetGroupArn=group_arn, Targets=still)
    drained = await _poll(ctx, wait, lambda: _drained(elb, group_arn, targets))
    return result.model_copy(update={"action": "deregister", "settled": drained})
