"""dns.route53 / dns.route53_revert against moto's Route53 over real HTTP.

Each test makes its own hosted zone. Moto answers every change INSYNC at once, so the
PENDING path goes through :class:`AwsProxy`, a real HTTP proxy in front of moto that
rewrites chosen answers (it serves the ELBv2 tests too).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiobotocore.session import get_session
from aiohttp import web

from dispatcher.app import load_functions
from dispatcher.invokers.inprocess import InProcessInvoker
from dispatcher.secrets import EnvSecretResolver
from functions.sdk import AwsConfig, ObjectStore, PermanentError
from tests.conftest import FunctionCaller

# --- a rewriting proxy in front of moto ----------------------------------------------------


@dataclass
class _Rewrite:
    marker: str  # a substring of "METHOD /path?query body" that selects requests
    old: str
    new: str
    times: int  # answers still to rewrite; -1: all


@dataclass
class AwsProxy:
    """Forwards every request to moto; answers to matching requests are rewritten, to play
    states moto never reports (a PENDING change, a draining target)."""

    upstream: str
    rewrites: list[_Rewrite] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    _http: aiohttp.ClientSession | None = None

    def rewrite(self, marker: str, old: str, new: str, times: int = -1) -> None:
        self.rewrites.append(_Rewrite(marker, old, new, times))

    def count(self, marker: str) -> int:
        return sum(marker in request for request in self.seen)

    async def start(self) -> str:
        self._http = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._http is not None
        body = await request.read()
        described = f"{request.method} {request.path_qs} {body.decode(errors='replace')}"
        self.seen.append(described)
        skip = {"host", "content-length", "transfer-encoding"}
        headers = {k: v for k, v in request.headers.items() if k.lower() not in skip}
        async with self._http.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=body
        ) as answer:
            text = (await answer.read()).decode()
            for rule in self.rewrites:
                if rule.times != 0 and rule.marker in described and rule.old in text:
                    text = text.replace(rule.old, rule.new)
                    rule.times -= 1
            return web.Response(text=text, status=answer.status, content_type=answer.content_type)


async def proxied_caller(moto_url: str) -> AsyncIterator[tuple[AwsProxy, FunctionCaller]]:
    """A proxy in front of moto, and a function caller whose AWS calls go through it."""
    proxy = AwsProxy(moto_url)
    url = await proxy.start()
    try:
        async with aiohttp.ClientSession() as http:
            invoker = InProcessInvoker(
                load_functions([]),
                http,
                EnvSecretResolver(),
                ObjectStore(endpoint_url=moto_url),
                AwsConfig(endpoint_url=url),
            )
            yield proxy, FunctionCaller(invoker)
    finally:
        await proxy.close()


@pytest.fixture
async def via_proxy(moto_url: str) -> AsyncIterator[tuple[AwsProxy, FunctionCaller]]:
    async for pair in proxied_caller(moto_url):
        yield pair


# --- zones -------------------------------------------------------------------------------


@dataclass
class Zone:
    id: str
    name: str  # "t1234abcd.example.com" (no trailing dot)
    r53: Any

    def fqdn(self, label: str) -> str:
        return f"{label}.{self.name}."

    async def put(self, record: dict[str, Any], action: str = "UPSERT") -> None:
        batch = {"Changes": [{"Action": action, "ResourceRecordSet": record}]}
        await self.r53.change_resource_record_sets(HostedZoneId=self.id, ChangeBatch=batch)

    async def records(self, label: str, rtype: str) -> list[dict[str, Any]]:
        """Every record set of that name and type, as Route53 lists them."""
        page = await self.r53.list_resource_record_sets(HostedZoneId=self.id)
        name = self.fqdn(label)
        return [r for r in page["ResourceRecordSets"] if r["Name"] == name and r["Type"] == rtype]


async def new_zone(r53: Any) -> Zone:
    name = f"t{uuid.uuid4().hex[:10]}.example.com"
    created = await r53.create_hosted_zone(Name=name, CallerReference=uuid.uuid4().hex)
    return Zone(created["HostedZone"]["Id"].rsplit("/", 1)[-1], name, r53)


@pytest.fixture
async def route53(moto_url: str) -> AsyncIterator[Any]:
    session = get_session()
    async with session.create_client(
        "route53", region_name="us-east-1", endpoint_url=moto_url
    ) as client:
        yield client


@pytest.fixture
async def zone(route53: Any) -> Zone:
    return await new_zone(route53)


def a_record(name: str, *values: str, ttl: int = 300, **extra: Any) -> dict[str, Any]:
    return {
        "Name": name,
        "Type": "A",
        "TTL": ttl,
        "ResourceRecords": [{"Value": v} for v in values],
        **extra,
    }


# --- UPSERT and revert -------------------------------------------------------------------


async def test_upsert_records_previous_and_revert_restores_it_exactly(
    zone: Zone, call_function: FunctionCaller
) -> None:
    before = a_record(zone.fqdn("shop"), "203.0.113.10", "203.0.113.11")
    await zone.put(before)
    out = await call_function(
        "dns.route53",
        {"zone": zone.name, "name": f"shop.{zone.name}", "type": "A", "values": ["192.0.2.1"]},
    )
    assert out["previous"] == before
    assert out["zone_id"] == zone.id and out["changed"] is True
    assert out["status"] == "INSYNC" and out["change_id"]
    assert await zone.records("shop", "A") == [a_record(zone.fqdn("shop"), "192.0.2.1", ttl=60)]

    # As a blueprint passes it: the outputs rendered with `| tojson`.
    reverted = await call_function("dns.route53_revert", {"undo": json.dumps(out)})
    assert reverted["action"] == "UPSERT" and reverted["restored"] == before
    assert await zone.records("shop", "A") == [before]
    again = await call_function("dns.route53_revert", {"undo": out})
    assert await zone.records("shop", "A") == [before]
    assert again["status"] == "INSYNC"


async def test_revert_deletes_a_record_that_did_not_exist_before(
    zone: Zone, call_function: FunctionCaller
) -> None:
    out = await call_function(
        "dns.route53",
        {
            "zone_id": f"/hostedzone/{zone.id}",
            "name": zone.fqdn("new"),
            "type": "CNAME",
            "values": "maintenance.example.net",  # one value needs no list
            "ttl": "30",  # as a template renders it
        },
    )
    assert out["previous"] is None
    assert out["applied"]["ResourceRecords"] == [{"Value": "maintenance.example.net"}]
    assert len(await zone.records("new", "CNAME")) == 1

    reverted = await call_function("dns.route53_revert", {"undo": out})
    assert reverted["action"] == "DELETE"
    assert await zone.records("new", "CNAME") == []
    second = await call_function("dns.route53_revert", {"undo": out})
    assert second["action"] == "NONE"  # idempotent: nothing left to delete


async def test_weighted_record_changes_only_its_own_set(
    zone: Zone, call_function: FunctionCaller
) -> None:
    blue = a_record(zone.fqdn("api"), "198.51.100.1", SetIdentifier="blue", Weight=100)
    green = a_record(zone.fqdn("api"), "198.51.100.2", SetIdentifier="green", Weight=0)
    await zone.put(blue)
    await zone.put(green)
    out = await call_function(
        "dns.route53",
        {
            "zone": zone.name + ".",
            "name": f"API.{zone.name}",  # names compare case-insensitively
            "type": "A",
            "values": '["198.51.100.1"]',  # a JSON list, as `| tojson` renders one
            "set_identifier": "blue",
            "weight": 0,
        },
    )
    assert out["previous"] == blue
    by_id = {r["SetIdentifier"]: r for r in await zone.records("api", "A")}
    assert by_id["blue"]["Weight"] == 0 and by_id["green"] == green

    await call_function("dns.route53_revert", {"undo": out})
    by_id = {r["SetIdentifier"]: r for r in await zone.records("api", "A")}
    assert by_id == {"blue": blue, "green": green}


async def test_alias_replaces_a_record_and_revert_brings_it_back(
    zone: Zone, call_function: FunctionCaller
) -> None:
    before = a_record(zone.fqdn("www"), "203.0.113.20")
    await zone.put(before)
    await zone.put(a_record(zone.fqdn("maint"), "192.0.2.99"))
    out = await call_function(
        "dns.route53",
        {
            "zone": zone.name,
            "name": zone.fqdn("www"),
            "type": "A",
            "alias": {"dns_name": zone.fqdn("maint")},
        },
    )
    (now,) = await zone.records("www", "A")
    assert now["AliasTarget"]["DNSName"].rstrip(".") == f"maint.{zone.name}"
    assert now["AliasTarget"]["HostedZoneId"] == zone.id  # default: an alias in the same zone
    await call_function("dns.route53_revert", {"undo": out})
    assert await zone.records("www", "A") == [before]


async def test_delete_of_a_txt_record_is_reverted(
    zone: Zone, call_function: FunctionCaller
) -> None:
    await call_function(
        "dns.route53",
        {"zone": zone.name, "name": zone.fqdn("note"), "type": "TXT", "values": ['say "hi"']},
    )
    (txt,) = await zone.records("note", "TXT")
    assert txt["ResourceRecords"] == [{"Value": '"say \\"hi\\""'}]  # quoted for the author

    out = await call_function(
        "dns.route53",
        {"zone": zone.name, "name": zone.fqdn("note"), "type": "TXT", "action": "DELETE"},
    )
    assert out["previous"] == txt and out["applied"] is None
    assert await zone.records("note", "TXT") == []
    await call_function("dns.route53_revert", {"undo": out})
    assert await zone.records("note", "TXT") == [txt]


async def test_nothing_to_change_means_nothing_to_revert(
    zone: Zone, call_function: FunctionCaller
) -> None:
    await zone.put(a_record(zone.fqdn("same"), "192.0.2.5", ttl=60))
    out = await call_function(
        "dns.route53",
        {"zone": zone.name, "name": zone.fqdn("same"), "type": "A", "values": ["192.0.2.5"]},
    )
    assert out["changed"] is False and out["change_id"] is None
    deleted = await call_function(
        "dns.route53",
        {"zone": zone.name, "name": zone.fqdn("none"), "type": "A", "action": "DELETE"},
    )
    assert deleted["changed"] is False

    # Someone else changes the record later: reverting a no-op must not touch it.
    later = a_record(zone.fqdn("same"), "192.0.2.6", ttl=60)
    await zone.put(later)
    assert (await call_function("dns.route53_revert", {"undo": out}))["action"] == "NONE"
    assert await zone.records("same", "A") == [later]


# --- a failed or retried step, through its lease -------------------------------------------


async def test_lease_keeps_the_plan_for_a_step_that_left_no_outputs(
    zone: Zone, call_function: FunctionCaller
) -> None:
    before = a_record(zone.fqdn("app"), "203.0.113.30")
    await zone.put(before)
    params = {"zone": zone.name, "name": zone.fqdn("app"), "type": "A", "values": ["192.0.2.1"]}
    lease = f"lease-{uuid.uuid4().hex[:8]}"
    await call_function("dns.route53", params, lease_id=lease)
    # A retried attempt (same lease) finds its own change in place, yet keeps the original.
    retried = await call_function("dns.route53", params, lease_id=lease)
    assert retried["previous"] == before

    # The step failed after all: no outputs, the release renders `lease.outputs` as "{}".
    reverted = await call_function("dns.route53_revert", {"undo": "{}", "lease": lease})
    assert reverted["restored"] == before
    assert await zone.records("app", "A") == [before]
    # The plan was handed back once; a second release has nothing recorded to undo.
    nothing = await call_function("dns.route53_revert", {"undo": "{}", "lease": lease})
    assert nothing["action"] == "NONE"


# --- waiting for INSYNC ------------------------------------------------------------------


async def test_waits_for_a_pending_change_to_be_insync(
    zone: Zone, via_proxy: tuple[AwsProxy, FunctionCaller]
) -> None:
    proxy, call = via_proxy
    pending = ("<Status>INSYNC</Status>", "<Status>PENDING</Status>")
    proxy.rewrite("/rrset", *pending)  # the change is accepted PENDING ...
    proxy.rewrite("/change/", *pending, times=1)  # ... and stays so for one poll
    out = await call(
        "dns.route53",
        {"zone_id": zone.id, "name": zone.fqdn("slow"), "type": "A", "values": ["192.0.2.7"]},
    )
    assert out["status"] == "INSYNC"
    assert proxy.count("GET /2013-04-01/change/") == 2


async def test_insync_wait_is_bounded_and_the_outputs_still_undo(
    zone: Zone, via_proxy: tuple[AwsProxy, FunctionCaller]
) -> None:
    proxy, call = via_proxy
    proxy.rewrite("/rrset", "<Status>INSYNC</Status>", "<Status>PENDING</Status>")
    proxy.rewrite("/change/", "<Status>INSYNC</Status>", "<Status>PENDING</Status>")
    started = time.monotonic()
    out = await call(
        "dns.route53",
        {"zone_id": zone.id, "name": zone.fqdn("stuck"), "type": "A", "values": ["192.0.2.8"]}
        | {"wait": 0.6},
    )
    assert time.monotonic() - started < 3
    assert out["status"] == "PENDING" and out["change_id"]
    # ... and the step's timeout bounds it too, before the step would be cancelled.
    started = time.monotonic()
    out = await call(
        "dns.route53",
        {"zone_id": zone.id, "name": zone.fqdn("stuck"), "type": "A", "values": ["192.0.2.9"]},
        timeout=1.5,
    )
    assert time.monotonic() - started < 1.5
    assert out["status"] == "PENDING"
    await call("dns.route53_revert", {"undo": out, "wait": 0})
    assert await zone.records("stuck", "A") == [a_record(zone.fqdn("stuck"), "192.0.2.8", ttl=60)]


# --- refusals ----------------------------------------------------------------------------


async def test_unknown_zone_is_a_permanent_error(call_function: FunctionCaller) -> None:
    record = {"name": "x.nowhere.example", "type": "A", "values": ["192.0.2.1"]}
    with pytest.raises(PermanentError, match="NoSuchHostedZone"):
        await call_function("dns.route53", {"zone_id": "ZNOSUCHZONE", **record})
    with pytest.raises(PermanentError, match=r"no hosted zone named nowhere\.example\."):
        await call_function("dns.route53", {"zone": "nowhere.example", **record})


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"type": "A", "values": ["not-an-ip"]}, "not an IP address"),
        ({"type": "AAAA", "values": ["192.0.2.1"]}, "needs IPv6"),
        ({"type": "CNAME", "values": ["a.example", "b.example"]}, "exactly one value"),
        ({"type": "A"}, "exactly one of values and alias"),
        ({"type": "A", "values": ["192.0.2.1"], "weight": 5}, "set_identifier and weight"),
        ({"type": "A", "action": "DELETE", "values": ["192.0.2.1"]}, "no values"),
        ({"type": "MX", "values": ["10 mail.example"]}, "type"),
        ({"type": "A", "values": ["192.0.2.1"], "zone_id": "Z1"}, "exactly one of zone_id"),
        ({"type": "A", "values": ["192.0.2.1"], "ttl_seconds": 5}, "ttl_seconds"),
        ({"type": "A", "values": "['192.0.2.1']"}, "tojson"),  # a list rendered without it
    ],
)
async def test_bad_params_are_permanent_errors(
    call_function: FunctionCaller, params: dict[str, Any], problem: str
) -> None:
    with pytest.raises(PermanentError, match=problem):
        await call_function(
            "dns.route53", {"zone": "example.com", "name": "x.example.com", **params}
        )


async def test_revert_with_nothing_recorded_does_nothing(call_function: FunctionCaller) -> None:
    assert (await call_function("dns.route53_revert", {}))["action"] == "NONE"
    assert (await call_function("dns.route53_revert", {"undo": ""}))["action"] == "NONE"
