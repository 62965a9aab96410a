"""End to end through the dispatcher: a backup's pre event sends users to maintenance
(DNS in Route53, the ALB listener's default action), and every way the backup can end
brings them back — the post event, a failed pre phase, or no post event at all (the
lease TTL). AWS is moto over real HTTP; the record and the listener are checked there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import get_session

from functions import dns, lb  # noqa: F401  (registers dns.* and lb.* for the harness)
from tests.conftest import Harness, HarnessFactory
from tests.test_dns import Zone, a_record, new_zone
from tests.test_lb import Web, build_web, shared_network

HOOKS = Path(__file__).resolve().parent.parent / "hooks"
MAINTENANCE_IP = "192.0.2.99"

CUTOVER = """
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: cutover}
spec:
  params:
    zone: {type: string, required: true}
    record: {type: string, required: true}
    listener: {type: string, required: true}
    fail: {type: boolean, default: false}
  actions:
    backup.pre:
      - name: dns
        function: dns.route53
        with: {zone: "{{ params.zone }}", name: "{{ params.record }}", type: A, values: [%(ip)s]}
        lease:
          ttl: %(ttl)s
          release: {function: dns.route53_revert, with: {undo: "{{ lease.outputs | tojson }}"}}
      - name: lb
        function: lb.elbv2
        with: {action: maintenance_on, listener: "{{ params.listener }}", body: backup running}
        lease:
          ttl: %(ttl)s
          release: {function: lb.elbv2_revert, with: {undo: "{{ lease.outputs | tojson }}"}}
      - name: quiesce
        function: sleep
        needs: [dns, lb]
        with: {fail: "{{ params.fail }}", message: the app refused to quiesce}
      - name: report
        function: notify.log
        when: always
        with:
          message: >-
            pre {{ backup.name }}: failed={{ run.failed }}
            steps={{ run.failed_steps | join(',') }}
    backup.post:
      - name: dns_back
        function: dns.route53_revert
        with: {undo: "{{ leases.dns.outputs | tojson }}", lease: "{{ leases.dns }}"}
      - name: lb_back
        function: lb.elbv2_revert
        with: {undo: "{{ leases.lb.outputs | tojson }}", lease: "{{ leases.lb }}"}
      - name: report
        function: notify.log
        when: always
        with: {message: "post {{ backup.name }}: {{ outcome }}"}
"""


@dataclass
class App:
    """An application's DNS record and load balancer, as moto holds them."""

    zone: Zone
    web: Web
    record: dict[str, Any]  # the app's record set before any backup
    forward: list[dict[str, Any]]  # the listener's default actions before any backup

    async def in_maintenance(self) -> bool:
        """Both switched (and asserted to be switched exactly so)."""
        [record] = await self.zone.records("shop", "A")
        [action] = await self.web.default_actions()
        switched: bool = record["ResourceRecords"] == [{"Value": MAINTENANCE_IP}]
        assert switched == (action["Type"] == "fixed-response"), (record, action)
        return switched

    async def restored(self) -> bool:
        records = await self.zone.records("shop", "A")
        return records == [self.record] and await self.web.default_actions() == self.forward

    async def rules_intact(self) -> bool:
        return [r["RuleArn"] for r in await self.web.extra_rules()] == [self.web.rule_arn]


@pytest.fixture
async def app(moto_url: str) -> AsyncIterator[App]:
    network = shared_network(moto_url)
    session = get_session()
    async with (
        session.create_client("route53", region_name="us-east-1", endpoint_url=moto_url) as r53,
        session.create_client("elbv2", region_name="us-east-1", endpoint_url=moto_url) as elb,
    ):
        zone = await new_zone(r53)
        record = a_record(zone.fqdn("shop"), "203.0.113.10", ttl=60)
        await zone.put(record)
        web = await build_web(elb, network)
        yield App(zone, web, record, await web.default_actions())


async def cutover_harness(
    harness: HarnessFactory, app: App, moto_url: str, *, ttl: str = "1h"
) -> Harness:
    params = {
        "zone": app.zone.name,
        "record": app.zone.fqdn("shop"),
        "listener": app.web.listener_arn,
    }
    return await harness(
        {"cutover": CUTOVER % {"ip": MAINTENANCE_IP, "ttl": ttl}},
        bindings=[{"blueprint": "cutover", "match": {"namespace": "ns"}, "params": params}],
        aws_endpoint_url=moto_url,
    )


def steps_of(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in run["steps"]}


def backup(backup_id: str, **params: Any) -> dict[str, Any]:
    return {"backup": {"name": "nightly", "id": backup_id}, "params": params}


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Until ``check()`` holds: moto has no event to wait on."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"{check} never held"
        await asyncio.sleep(0.05)


async def test_pre_switches_to_maintenance_and_post_switches_back(
    harness: HarnessFactory, app: App, moto_url: str
) -> None:
    h = await cutover_harness(harness, app, moto_url)
    pre = await h.emit("backup.pre", wait=20, data=backup("b1"))
    assert pre["allowed"] is True, pre
    assert await app.in_maintenance()
    assert await app.rules_intact()

    post = await h.emit("backup.post", wait=20, backup_id="b1")
    run = await h.final(post["run_id"])
    assert run["status"] == "succeeded", run
    steps = steps_of(run)
    assert steps["dns_back"]["outputs"]["action"] == "UPSERT"
    assert steps["lb_back"]["outputs"]["action"] == "restore_default_actions"
    assert await app.restored()
    assert await app.rules_intact()
    # The post steps did the releasing: each lease ended once, by its step.
    leases = {lease["step"]: lease for lease in (await h.final(pre["run_id"]))["leases"]}
    assert leases["dns"]["released_by"] == f"step:{post['run_id']}/dns_back"
    assert leases["lb"]["released_by"] == f"step:{post['run_id']}/lb_back"


async def test_a_failed_pre_phase_switches_back_and_reports(
    harness: HarnessFactory, app: App, moto_url: str
) -> None:
    h = await cutover_harness(harness, app, moto_url)
    pre = await h.emit("backup.pre", wait=20, data=backup("b2", fail=True))
    assert pre["allowed"] is False
    assert "quiesce" in pre["reason"]

    run = await h.final(pre["run_id"])
    assert run["status"] == "failed"
    assert await app.restored()
    assert await app.rules_intact()
    assert {lease["released_by"] for lease in run["leases"]} == {"run-failed"}
    report = steps_of(run)["report"]
    assert report["status"] == "succeeded"
    assert report["outputs"]["message"] == "pre nightly: failed=True steps=quiesce"


async def test_without_a_post_event_the_lease_ttl_switches_back(
    harness: HarnessFactory, app: App, moto_url: str
) -> None:
    h = await cutover_harness(harness, app, moto_url, ttl="2s")
    pre = await h.emit("backup.pre", wait=20, data=backup("b3"))
    assert pre["allowed"] is True
    # Not checked in moto: on a loaded machine the TTL may have run out already.
    steps = steps_of(await h.final(pre["run_id"]))
    assert steps["dns"]["outputs"]["changed"] and steps["lb"]["outputs"]["changed"]

    await eventually(app.restored)
    await eventually(lambda: _all_released_by(h, pre["run_id"], "reaper"))
    assert await app.rules_intact()


async def _all_released_by(h: Harness, run_id: str, by: str) -> bool:
    leases = (await h.final(run_id))["leases"]
    return len(leases) == 2 and all(lease["released_by"] == by for lease in leases)


async def test_the_shipped_blueprints_cut_over_and_back(
    harness: HarnessFactory, app: App, moto_url: str
) -> None:
    dns_params = {
        "zone": app.zone.name,
        "record": f"shop.{app.zone.name}",
        "type": "A",
        "maintenance": MAINTENANCE_IP,
    }
    lb_params = {"load_balancer": app.web.lb_name, "port": 80}
    h = await harness(
        {
            "dns-cutover": (HOOKS / "dns-cutover.yaml").read_text(),
            "lb-maintenance": (HOOKS / "lb-maintenance.yaml").read_text(),
        },
        bindings=[
            {"blueprint": "dns-cutover", "match": {"name": "shop-dns"}, "params": dns_params},
            {"blueprint": "lb-maintenance", "match": {"name": "shop-lb"}, "params": lb_params},
        ],
        aws_endpoint_url=moto_url,
    )
    subjects = ["ns/Deployment/shop-dns", "ns/Deployment/shop-lb"]
    for subject in subjects:
        pre = await h.emit("backup.pre", wait=20, subject=subject, backup_id="b4")
        assert pre["allowed"] is True, pre
    assert await app.in_maintenance()

    for subject in subjects:
        post = await h.emit("backup.post", wait=20, subject=subject, backup_id="b4")
        run = await h.final(post["run_id"])
        assert run["status"] == "succeeded", run
        assert steps_of(run)["report"]["outputs"]["message"].endswith("succeeded")
    assert await app.restored()
    assert await app.rules_intact()
