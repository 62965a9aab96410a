"""Limits on events: data depth and size, one freeze per target (409), a rate per source (429)."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from dispatcher.errors import ConfigError, EventError
from dispatcher.limits import Limits, RateLimiter, check_data, server_limits
from dispatcher.settings import Settings
from tests.conftest import Harness, HarnessFactory, event_json

PROBLEM = "application/problem+json"
TARGET = "db/StatefulSet/pg"

BLUEPRINTS = {
    "freeze": """
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: freeze}
spec:
  params:
    options: {type: object, default: {}}
  actions:
    backup.pre:
      - name: freeze
        function: test.freeze
        with: {db: orders}
        lease: {ttl: 1h, release: {function: test.thaw, with: {db: orders}}}
    backup.post:
      - name: thaw
        function: test.thaw
        with: {db: orders, lease: "{{ leases.freeze }}"}
    restore.pre:
      - {name: prepare, function: test.effect}
""",
}
BINDINGS = [{"blueprint": "freeze", "match": {"namespace": "db"}}]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def nested(depth: int) -> Any:
    """``depth`` levels of objects and arrays below the returned value's parent."""
    value: Any = 1
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


# --- the token bucket ------------------------------------------------------------------------


def test_bucket_admits_a_burst_then_says_how_long_to_wait() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [limiter.acquire("k10") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("k10") == pytest.approx(0.5)  # one token per 0.5 s
    clock.now += 0.5
    assert limiter.acquire("k10") == 0.0
    assert limiter.acquire("k10") == pytest.approx(0.5)


def test_buckets_are_per_source_and_refill_up_to_the_burst() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=2, clock=clock)
    assert limiter.acquire("a") == limiter.acquire("a") == 0.0
    assert limiter.acquire("a") > 0
    assert limiter.acquire("b") == 0.0  # another source has its own bucket
    clock.now += 3600  # a long pause refills to the burst, not beyond
    assert [limiter.acquire("a") for _ in range(3)][-1] > 0


def test_bucket_table_stays_bounded_without_losing_busy_sources() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=0.001, burst=1, clock=clock, max_sources=10)
    assert limiter.acquire("busy") == 0.0
    for i in range(100):
        limiter.acquire(f"source-{i}")
    assert len(limiter._buckets) <= 10
    clock.now += 10_000  # every bucket refilled: the full ones are forgotten first
    for i in range(5):
        limiter.acquire(f"other-{i}")
    assert len(limiter._buckets) <= 10


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0)])
def test_bucket_rejects_nonsense(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate, burst)


# --- the shape of the data -------------------------------------------------------------------


def test_data_depth_is_counted_below_data() -> None:
    # params' object is level 1: as deep as data.params itself may be (MAX_PARAMS_DEPTH).
    check_data({"params": nested(32)}, max_depth=32, max_bytes=10**6)
    with pytest.raises(EventError) as raised:
        check_data({"backup": {}, "params": nested(33)}, max_depth=32, max_bytes=10**6)
    error = raised.value
    assert (error.status, error.field) == (400, "data.params")
    assert "max_data_depth (32)" in error.detail
    assert error.extra == {"limit": "max_data_depth"}


def test_depth_check_does_not_recurse() -> None:
    # Far deeper than Python's recursion limit: found level by level.
    with pytest.raises(EventError, match="max_data_depth"):
        check_data({"params": nested(50_000)}, max_depth=32, max_bytes=10**9)
    with pytest.raises(EventError) as raised:
        check_data({"target": {}, "odd": nested(40)}, max_depth=5, max_bytes=10**9)
    assert raised.value.field == "data.odd"  # where it is too deep
    with pytest.raises(EventError) as raised:
        check_data([nested(40)], max_depth=5, max_bytes=10**9)
    assert raised.value.field == "data"


def test_data_size_is_its_compact_json() -> None:
    data = {"params": {"pad": "é" * 100}}  # 2 bytes each in UTF-8
    size = len(json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode())
    check_data(data, max_depth=32, max_bytes=size)
    with pytest.raises(EventError) as raised:
        check_data(data, max_depth=32, max_bytes=size - 1)
    assert (raised.value.status, raised.value.field) == (413, "data")
    assert f"data is {size} bytes, over max_data_bytes ({size - 1})" in raised.value.detail
    check_data(b"\x00" * 10, max_depth=1, max_bytes=10)  # binary data: its length


@pytest.mark.parametrize("data", [None, "text", 7, [], {}, {"a": [1, 2, {"b": None}]}])
def test_small_data_of_any_kind_passes(data: Any) -> None:
    check_data(data, max_depth=2, max_bytes=1024)  # the contract checks come after


# --- over HTTP ---------------------------------------------------------------------------------


@pytest.fixture
async def h(harness: HarnessFactory) -> Harness:
    return await harness(BLUEPRINTS, bindings=BINDINGS)


async def post(h: Harness, body: Any, **kw: Any) -> tuple[int, dict[str, str], Any]:
    batch = isinstance(body, list)
    ctype = "application/cloudevents-batch+json" if batch else "application/cloudevents+json"
    async with h.client.post(
        "/v1/events", data=json.dumps(body), headers={"Content-Type": ctype}, **kw
    ) as resp:
        return resp.status, dict(resp.headers), await resp.json(content_type=None)


def pre(backup_id: str, **kw: Any) -> dict[str, Any]:
    return event_json("backup.pre", TARGET, backup_id=backup_id, **kw)


async def rejected(h: Harness, status: int) -> float:
    metric = h.state.metrics.events_rejected.labels(status=str(status))
    return float(metric._value.get())


async def test_too_deep_data_is_400_naming_the_limit(h: Harness) -> None:
    event = pre("b1", data={"backup": {"name": "n", "id": "b1"}, "params": nested(40)})
    status, headers, problem = await post(h, event)
    assert (status, headers["Content-Type"].split(";")[0]) == (400, PROBLEM)
    assert problem["field"] == "data.params" and problem["limit"] == "max_data_depth"
    assert await h.state.journal.list_runs() == []


async def test_too_large_data_is_413_naming_the_limit(harness: HarnessFactory) -> None:
    h = await harness(BLUEPRINTS, bindings=BINDINGS, max_data_bytes=2048)
    big = {"backup": {"name": "n", "id": "b1"}, "params": {"options": {"pad": "x" * 4096}}}
    status, _, problem = await post(h, pre("b1", data=big))
    assert (status, problem["limit"], problem["field"]) == (413, "max_data_bytes", "data")
    # In a batch, the one event is refused; the others go ahead.
    status, _, answers = await post(h, [pre("b1", data=big), pre("b1")])
    assert status == 202
    assert answers[0]["status"] == 413 and "run_id" in answers[1]


# --- one freeze per target -------------------------------------------------------------------


async def frozen_by(h: Harness, backup_id: str) -> dict[str, Any]:
    """A pre event whose freeze has happened (the sync answer waits for it)."""
    event = pre(backup_id)
    status, _, decision = await post(h, event, params={"wait": "10"})
    assert status == 200 and decision["allowed"], decision
    return {"event": event, "run_id": decision["run_id"]}


async def test_second_backup_of_a_frozen_target_is_409_naming_the_holder(h: Harness) -> None:
    holder = await frozen_by(h, "b1")
    [lease] = await h.state.journal.find_leases(run_id=holder["run_id"])
    for wait in (None, "1"):  # async and sync callers alike
        params = {"wait": wait} if wait else {}
        status, headers, problem = await post(h, pre("b2"), params=params)
        assert (status, headers["Content-Type"].split(";")[0]) == (409, PROBLEM)
        assert problem["holding_run_id"] == holder["run_id"]
        assert problem["lease_id"] == lease.lease_id
        assert problem["field"] == "subject" and TARGET in problem["detail"]
    assert await rejected(h, 409) == 2
    assert len(await h.state.journal.list_runs()) == 1  # nothing journaled for b2


async def test_the_holders_own_events_are_not_in_the_way(h: Harness) -> None:
    holder = await frozen_by(h, "b1")
    # Redelivered: the existing run, no second execution.
    status, _, answer = await post(h, holder["event"])
    assert (status, answer["run_id"]) == (202, holder["run_id"])
    # The same backup asking again under a new id (e.g. after a denied decision); waiting
    # for its decision makes sure its freeze has happened before the post event comes.
    status, _, again = await post(h, pre("b1"), params={"wait": "10"})
    assert status == 200 and again["run_id"] != holder["run_id"]
    # Its post event thaws; then another backup may freeze.
    post_event = event_json("backup.post", TARGET, backup_id="b1")
    status, _, done = await post(h, post_event, params={"wait": "10"})
    assert status == 200
    assert (await h.final(done["run_id"]))["status"] == "succeeded"
    status, _, other = await post(h, pre("b2"))
    assert status == 202, other


async def test_idempotency_comes_before_the_conflict(h: Harness) -> None:
    first = await frozen_by(h, "b1")
    post_event = event_json("backup.post", TARGET, backup_id="b1")
    status, _, done = await post(h, post_event, params={"wait": "10"})
    await h.final(done["run_id"])
    second = await frozen_by(h, "b2")  # b2 holds the target now
    status, _, answer = await post(h, first["event"])  # b1's pre, redelivered late
    assert (status, answer["run_id"]) == (202, first["run_id"])
    status, _, problem = await post(h, pre("b1"))  # but b1 under a new id is refused
    assert (status, problem["holding_run_id"]) == (409, second["run_id"])


async def test_other_phases_and_targets_are_not_blocked(h: Harness) -> None:
    await frozen_by(h, "b1")
    restore = event_json("restore.pre", TARGET, backup_id="b9")
    status, _, problem = await post(h, restore)
    assert status == 409 and problem["title"] == "Target frozen"  # a restore would thaw it
    elsewhere = event_json("backup.pre", "db/StatefulSet/other", backup_id="b2")
    assert (await post(h, elsewhere))[0] == 202
    foreign_post = event_json("backup.post", TARGET, backup_id="b2")  # nothing of b2's to thaw
    assert (await post(h, foreign_post))[0] == 202


async def test_batch_of_only_conflicts_is_409(h: Harness) -> None:
    await frozen_by(h, "b1")
    status, _, answers = await post(h, [pre("b2"), pre("b3")])
    assert status == 409
    assert [a["status"] for a in answers] == [409, 409]


# --- a rate per source -----------------------------------------------------------------------


@pytest.fixture
async def limited(harness: HarnessFactory) -> Harness:
    # Two events, then one more every 100 s: the third within the test is refused.
    return await harness(
        BLUEPRINTS, bindings=BINDINGS, rate_limit_per_source=0.01, rate_limit_burst=2
    )


def spare(source: str = "k10", **kw: Any) -> dict[str, Any]:
    """An event that runs without freezing anything (no 409 in the way)."""
    return event_json("restore.pre", TARGET, source=source, **kw)


async def test_over_the_rate_is_429_with_retry_after(limited: Harness) -> None:
    h = limited
    assert [(await post(h, spare()))[0] for _ in range(2)] == [202, 202]
    status, headers, problem = await post(h, spare())
    assert (status, headers["Content-Type"].split(";")[0]) == (429, PROBLEM)
    retry_after = int(headers["Retry-After"])
    assert 1 <= retry_after <= 100 and problem["retry_after"] == retry_after
    assert problem["limit"] == "rate_limit_per_source" and problem["field"] == "source"
    assert len(await h.state.journal.list_runs()) == 2  # refused before the journal
    assert await rejected(h, 429) == 1
    async with h.client.get("/metrics") as resp:
        assert 'snaphook_events_rejected_total{status="429"} 1.0' in await resp.text()
    assert (await post(h, spare(source="velero")))[0] == 202  # other sources are unaffected


async def test_batch_over_the_rate_answers_429_per_event(limited: Harness) -> None:
    h = limited
    status, _, answers = await post(h, [spare(), spare(), spare()])
    assert status == 202  # two were accepted: inspect every element
    assert [a.get("status") for a in answers].count(429) == 1
    status, headers, answers = await post(h, [spare(), spare()])
    assert status == 429 and int(headers["Retry-After"]) >= 1
    assert all(a["status"] == 429 and a["retry_after"] >= 1 for a in answers)
    assert await rejected(h, 429) == 3


def test_settings_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.upper().startswith("SNAPHOOK_")]:
        monkeypatch.delenv(name)
    defaults = Settings.load()
    assert defaults.rate_limit_per_source is None  # off unless configured
    assert (defaults.max_data_depth, defaults.max_data_bytes) == (32, 256 * 1024)
    assert (defaults.body_timeout, defaults.idle_timeout) == (10.0, 75.0)
    monkeypatch.setenv("SNAPHOOK_RATE_LIMIT_PER_SOURCE", "2.5")
    monkeypatch.setenv("SNAPHOOK_BODY_TIMEOUT", "3s")
    monkeypatch.setenv("SNAPHOOK_IDLE_TIMEOUT", "1m")
    monkeypatch.setenv("SNAPHOOK_MAX_HEADER_SIZE", "4096")
    settings = Settings.load()
    limits = Limits.from_settings(settings)
    assert limits.rate is not None and (limits.rate.rate, limits.rate.burst) == (2.5, 20)
    assert server_limits(settings) | {"logger": None} == {
        "keepalive_timeout": 60.0,  # also the header-read timeout
        "lingering_time": 3.0,
        "max_line_size": 4096,
        "max_field_size": 4096,
        "max_headers": 128,
        "logger": None,
    }
    monkeypatch.setenv("SNAPHOOK_RATE_LIMIT_PER_SOURCE", "0")
    with pytest.raises(ConfigError, match="rate_limit_per_source"):
        Settings.load()
