"""lb.elbv2 / lb.elbv2_revert against moto's ELBv2 and EC2 over real HTTP.

Each test builds its own target group (holding two EC2 instances of a VPC shared per
worker), ALB, listener (forwarding to the group) and one extra listener rule. Moto drops
a deregistered target at once, so the draining wait is exercised through the rewriting
proxy of :mod:`tests.test_dns`.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import boto3  # type: ignore[import-untyped]
import pytest
from aiobotocore.session import get_session

from functions.sdk import PermanentError, RetryableError
from tests.conftest import FunctionCaller
from tests.test_dns import AwsProxy, proxied_caller


@dataclass
class Web:
    """An application behind an ALB, as moto holds it."""

    elb: Any
    instances: list[str]
    group_arn: str
    group_name: str
    lb_name: str
    listener_arn: str
    rule_arn: str

    async def registered(self) -> list[str]:
        answer = await self.elb.describe_target_health(TargetGroupArn=self.group_arn)
        return sorted(d["Target"]["Id"] for d in answer["TargetHealthDescriptions"])

    async def default_actions(self) -> list[dict[str, Any]]:
        answer = await self.elb.describe_listeners(ListenerArns=[self.listener_arn])
        return list(answer["Listeners"][0]["DefaultActions"])

    async def extra_rules(self) -> list[dict[str, Any]]:
        answer = await self.elb.describe_rules(ListenerArn=self.listener_arn)
        return [rule for rule in answer["Rules"] if not rule["IsDefault"]]


@dataclass(frozen=True)
class Network:
    vpc: str
    subnets: list[str]  # two, in two zones: an ALB needs both
    instances: list[str]  # two running instances


@functools.cache
def shared_network(moto_url: str) -> Network:
    """A VPC with two instances, made once per moto server (that is, per test worker).

    EC2 is the slow part to set up; tests stay isolated by their own target groups and
    load balancers, and an instance may sit in any number of target groups.
    """
    with closing(boto3.client("ec2", region_name="us-east-1", endpoint_url=moto_url)) as ec2:
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        subnets = [
            ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i}.0/24", AvailabilityZone=zone)[
                "Subnet"
            ]["SubnetId"]
            for i, zone in enumerate(["us-east-1a", "us-east-1b"], start=1)
        ]
        launched = ec2.run_instances(
            ImageId="ami-12c6146b", MinCount=2, MaxCount=2, SubnetId=subnets[0]
        )
    return Network(vpc, subnets, sorted(i["InstanceId"] for i in launched["Instances"]))


async def build_web(elb: Any, network: Network) -> Web:
    """A target group holding the network's instances, and an ALB whose port-80 listener
    forwards to it, with one more rule (/healthz)."""
    suffix = uuid.uuid4().hex[:10]
    group = (
        await elb.create_target_group(
            Name=f"tg-{suffix}", Protocol="HTTP", Port=8080, VpcId=network.vpc
        )
    )["TargetGroups"][0]
    await elb.register_targets(
        TargetGroupArn=group["TargetGroupArn"], Targets=[{"Id": i} for i in network.instances]
    )
    lb = (await elb.create_load_balancer(Name=f"lb-{suffix}", Subnets=network.subnets))[
        "LoadBalancers"
    ][0]
    listener = (
        await elb.create_listener(
            LoadBalancerArn=lb["LoadBalancerArn"],
            Protocol="HTTP",
            Port=80,
            DefaultActions=[{"Type": "forward", "TargetGroupArn": group["TargetGroupArn"]}],
        )
    )["Listeners"][0]
    rule = (
        await elb.create_rule(
            ListenerArn=listener["ListenerArn"],
            Priority=10,
            Conditions=[{"Field": "path-pattern", "Values": ["/healthz"]}],
            Actions=[{"Type": "forward", "TargetGroupArn": group["TargetGroupArn"]}],
        )
    )["Rules"][0]
    return Web(
        elb,
        network.instances,
        group["TargetGroupArn"],
        group["TargetGroupName"],
        lb["LoadBalancerName"],
        listener["ListenerArn"],
        rule["RuleArn"],
    )


@pytest.fixture
async def web(moto_url: str) -> AsyncIterator[Web]:
    network = shared_network(moto_url)
    async with get_session().create_client(
        "elbv2", region_name="us-east-1", endpoint_url=moto_url
    ) as elb:
        yield await build_web(elb, network)


@pytest.fixture
async def via_proxy(moto_url: str) -> AsyncIterator[tuple[AwsProxy, FunctionCaller]]:
    async for pair in proxied_caller(moto_url):
        yield pair


# --- targets -----------------------------------------------------------------------------


async def test_deregister_drains_every_target_and_revert_registers_them_again(
    web: Web, call_function: FunctionCaller
) -> None:
    out = await call_function(
        "lb.elbv2", {"action": "deregister", "target_group": web.group_name, "wait": 10}
    )
    assert out["settled"] is True and out["changed"] is True
    assert sorted(t["Id"] for t in out["targets"]) == web.instances
    assert {t["Port"] for t in out["targets"]} == {8080}
    assert await web.registered() == []

    reverted = await call_function("lb.elbv2_revert", {"undo": json.dumps(out), "wait": 5})
    assert reverted["action"] == "register" and reverted["settled"] is True
    assert await web.registered() == web.instances


async def test_deregister_one_target_then_register_it_back(
    web: Web, call_function: FunctionCaller
) -> None:
    first, second = web.instances
    out = await call_function(
        "lb.elbv2",
        {"action": "deregister", "target_group": web.group_arn, "targets": [{"id": first}]},
    )
    assert [t["Id"] for t in out["targets"]] == [first]
    assert await web.registered() == [second]

    back = await call_function(
        "lb.elbv2",
        {
            "action": "register",
            "target_group": web.group_arn,
            "targets": json.dumps([{"id": first}, {"id": second}]),  # as `| tojson` renders
            "wait_healthy": True,
            "wait": 5,
        },
    )
    assert back["settled"] is True
    assert back["targets"] == [{"Id": first}]  # only the new one: the revert removes only it
    assert await web.registered() == web.instances

    await call_function("lb.elbv2_revert", {"undo": back})
    assert await web.registered() == [second]
    await call_function("lb.elbv2_revert", {"undo": back})  # idempotent
    assert await web.registered() == [second]


async def test_deregister_waits_for_draining_to_finish(
    web: Web, via_proxy: tuple[AwsProxy, FunctionCaller]
) -> None:
    proxy, call = via_proxy
    health = "Action=DescribeTargetHealth"
    proxy.rewrite(health, "<State>unused</State>", "<State>draining</State>", times=1)
    out = await call(
        "lb.elbv2", {"action": "deregister", "target_group": web.group_arn, "wait": 10}
    )
    assert out["settled"] is True
    # One look at what is registered, one answer still draining, then gone.
    assert proxy.count(health) == 3


async def test_drain_wait_is_bounded_and_the_lease_still_undoes(
    web: Web, via_proxy: tuple[AwsProxy, FunctionCaller]
) -> None:
    proxy, call = via_proxy
    proxy.rewrite("Action=DescribeTargetHealth", "<State>unused</State>", "<State>draining</State>")
    lease = f"lease-{uuid.uuid4().hex[:8]}"
    params = {"action": "deregister", "target_group": web.group_arn, "wait": 0.6}
    with pytest.raises(RetryableError, match=r"still draining after 0\.6s"):
        await call("lb.elbv2", params, lease_id=lease)
    # The retry knows which targets the first attempt took out, though none is registered.
    with pytest.raises(RetryableError, match=web.instances[0]):
        await call("lb.elbv2", params, lease_id=lease)
    assert await web.registered() == []

    # The step failed: its lease's release gets no outputs, and re-registers from the plan.
    reverted = await call("lb.elbv2_revert", {"undo": "{}", "lease": lease})
    assert reverted["action"] == "register"
    assert await web.registered() == web.instances


# --- the maintenance page ----------------------------------------------------------------


async def test_maintenance_page_replaces_only_the_default_action(
    web: Web, call_function: FunctionCaller
) -> None:
    forward = await web.default_actions()
    rules = await web.extra_rules()
    out = await call_function(
        "lb.elbv2",
        {
            "action": "maintenance_on",
            "listener": web.listener_arn,
            "status_code": "503",
            "content_type": "text/plain",
            "body": "back soon",
        },
    )
    assert out["previous_default_actions"] == forward
    (page,) = await web.default_actions()
    assert page["Type"] == "fixed-response"
    assert page["FixedResponseConfig"] == {
        "StatusCode": "503",
        "ContentType": "text/plain",
        "MessageBody": "back soon",
    }
    assert await web.extra_rules() == rules

    off = await call_function(
        "lb.elbv2",
        {
            "action": "maintenance_off",
            "listener": web.listener_arn,
            "default_actions": json.dumps(out["previous_default_actions"]),
        },
    )
    assert off["previous_default_actions"] == [page]
    assert await web.default_actions() == forward
    assert await web.extra_rules() == rules


async def test_revert_restores_the_forward_action_exactly(
    web: Web, call_function: FunctionCaller
) -> None:
    forward = await web.default_actions()
    out = await call_function(
        "lb.elbv2", {"action": "maintenance_on", "load_balancer": web.lb_name, "port": "80"}
    )
    assert out["listener_arn"] == web.listener_arn
    assert (await web.default_actions())[0]["FixedResponseConfig"]["StatusCode"] == "503"

    reverted = await call_function("lb.elbv2_revert", {"undo": json.dumps(out)})
    assert reverted["action"] == "restore_default_actions"
    assert await web.default_actions() == forward
    await call_function("lb.elbv2_revert", {"undo": out})  # idempotent
    assert await web.default_actions() == forward
    assert [r["RuleArn"] for r in await web.extra_rules()] == [web.rule_arn]


async def test_a_retried_switch_keeps_the_actions_found_first(
    web: Web, call_function: FunctionCaller
) -> None:
    forward = await web.default_actions()
    lease = f"lease-{uuid.uuid4().hex[:8]}"
    params = {"action": "maintenance_on", "listener": web.listener_arn}
    await call_function("lb.elbv2", params, lease_id=lease)
    retried = await call_function("lb.elbv2", params, lease_id=lease)
    assert retried["previous_default_actions"] == forward
    await call_function("lb.elbv2_revert", {"undo": retried, "lease": lease})
    assert await web.default_actions() == forward


async def test_a_listener_already_in_maintenance_is_left_to_whoever_switched_it(
    web: Web, call_function: FunctionCaller
) -> None:
    params = {"action": "maintenance_on", "listener": web.listener_arn}
    first = await call_function("lb.elbv2", params)
    second = await call_function("lb.elbv2", params)
    assert second["changed"] is False
    # Undone in the "wrong" order (releases run concurrently), the listener still ends up
    # as it was before the first switch.
    await call_function("lb.elbv2_revert", {"undo": first})
    await call_function("lb.elbv2_revert", {"undo": second})
    assert await web.default_actions() == first["previous_default_actions"]


# --- refusals ----------------------------------------------------------------------------


async def test_unknown_resources_are_permanent_errors(
    web: Web, call_function: FunctionCaller
) -> None:
    with pytest.raises(PermanentError, match="TargetGroupNotFound"):
        await call_function("lb.elbv2", {"action": "deregister", "target_group": "no-such-tg"})
    with pytest.raises(PermanentError, match="has no listener on port 8443"):
        await call_function(
            "lb.elbv2", {"action": "maintenance_on", "load_balancer": web.lb_name, "port": 8443}
        )
    with pytest.raises(PermanentError, match="ListenerNotFound"):
        await call_function(
            "lb.elbv2", {"action": "maintenance_on", "listener": web.listener_arn + "0"}
        )


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"action": "deregister"}, "needs target_group"),
        ({"action": "register", "target_group": "tg"}, "register needs targets"),
        ({"action": "maintenance_on", "load_balancer": "lb"}, "load_balancer and port"),
        ({"action": "maintenance_on", "listener": "arn:x", "status_code": 302}, "2XX, 4XX"),
        ({"action": "maintenance_on", "listener": "arn:x", "body": "x" * 1025}, "body"),
        ({"action": "maintenance_off", "listener": "arn:x"}, "needs default_actions"),
        ({"action": "drain", "target_group": "tg"}, "action"),
        ({"action": "register", "target_group": "tg", "targets": "[{'id': 'i-1'}]"}, "tojson"),
    ],
)
async def test_bad_params_are_permanent_errors(
    call_function: FunctionCaller, params: dict[str, Any], problem: str
) -> None:
    with pytest.raises(PermanentError, match=problem):
        await call_function("lb.elbv2", params)


async def test_revert_with_nothing_recorded_does_nothing(call_function: FunctionCaller) -> None:
    assert (await call_function("lb.elbv2_revert", {"undo": "{}"}))["action"] == "none"
