"""The read-only HTTP API over real HTTP: runs, health, readiness, metrics, unknown paths."""

from __future__ import annotations

import json
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Harness, HarnessFactory, event_json

PROBLEM = "application/problem+json"

BLUEPRINTS = {
    "ok": """
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: ok}
spec:
  actions:
    backup.pre:
      - {name: quiesce, function: test.effect}
""",
    "deny": """
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: deny}
spec:
  actions:
    backup.pre:
      - {name: check, function: test.effect}
      - name: flaky
        function: test.flaky
        with: {failures: 1}
        retry: {attempts: 2, backoff: 10ms}
      - {name: refuse, function: test.fail, needs: [check, flaky]}
""",
    "freeze": """
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: freeze}
spec:
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
""",
}

BINDINGS = [
    {"blueprint": "ok", "match": {"namespace": "ns"}},
    {"blueprint": "deny", "match": {"namespace": "deny"}},
    {"blueprint": "freeze", "match": {"namespace": "db"}},
]
DENIED = "deny/StatefulSet/pg"
FROZEN = "db/StatefulSet/pg"


@pytest.fixture
async def h(harness: HarnessFactory) -> Harness:
    return await harness(BLUEPRINTS, bindings=BINDINGS)


async def get(h: Harness, path: str, **params: str) -> tuple[int, str, Any]:
    """Status, media type and parsed body (JSON, or text for non-JSON answers)."""
    async with h.client.get(path, params=params) as resp:
        text = await resp.text()
        media = resp.headers.get("Content-Type", "").split(";")[0].strip()
        body = json.loads(text) if media.endswith("json") else text
        return resp.status, media, body


async def finished(h: Harness, **event: Any) -> dict[str, Any]:
    return await h.final((await h.emit(**event))["run_id"])


def assert_problem(answer: tuple[int, str, Any], status: int, field: str | None) -> None:
    code, media, body = answer
    assert (code, media) == (status, PROBLEM), body
    assert body["status"] == status and body["title"] and body["detail"]
    assert body.get("field") == field


# --- runs -----------------------------------------------------------------------------------


async def test_list_runs_newest_first_with_limit(h: Harness) -> None:
    run_ids = [(await finished(h))["run_id"] for _ in range(3)]
    status, media, body = await get(h, "/v1/runs")
    assert (status, media) == (200, "application/json")
    assert [r["run_id"] for r in body["runs"]] == run_ids[::-1]
    _, _, limited = await get(h, "/v1/runs", limit="2")
    assert [r["run_id"] for r in limited["runs"]] == run_ids[:0:-1]
    newest = body["runs"][0]
    assert newest["status"] == "succeeded" and newest["allowed"] is True
    assert (newest["blueprint"], newest["subject"], newest["type"]) == (
        "ok",
        "ns/Deployment/app",
        "io.snaphook.backup.pre",
    )


async def test_list_runs_filters_by_status(h: Harness) -> None:
    ok = await finished(h)
    denied = await finished(h, subject=DENIED)
    assert (ok["status"], denied["status"]) == ("succeeded", "failed")
    for wanted, run in (("succeeded", ok), ("failed", denied)):
        _, _, body = await get(h, "/v1/runs", status=wanted)
        assert [r["run_id"] for r in body["runs"]] == [run["run_id"]]
    _, _, running = await get(h, "/v1/runs", status="running")
    assert running["runs"] == []


@pytest.mark.parametrize(
    "params, field",
    [
        *(({"limit": value}, "limit") for value in ("0", "1001", "-1", "1.5", "ten", "", "²")),
        ({"limit": "9" * 5000}, "limit"),
        ({"status": "done"}, "status"),
        ({"status": ""}, "status"),
    ],
    ids=lambda v: repr(v)[:30] if isinstance(v, dict) else v,
)
async def test_list_runs_rejects_bad_query(h: Harness, params: dict[str, str], field: str) -> None:
    assert_problem(await get(h, "/v1/runs", **params), 400, field)


async def test_run_detail_shows_steps_with_attempts_timings_and_outputs(h: Harness) -> None:
    event = event_json(subject=DENIED)
    resp = await h.send(event)
    run_id = (await resp.json())["run_id"]
    await h.final(run_id)
    status, media, run = await get(h, f"/v1/runs/{run_id}")
    assert (status, media) == (200, "application/json")
    assert (run["run_id"], run["status"], run["allowed"]) == (run_id, "failed", False)
    assert (run["source"], run["event_id"], run["failure_policy"]) == ("test", event["id"], "fail")
    assert "refuse" in run["reason"]
    assert run["event"]["data"]["backup"] == {"name": "nightly", "id": "b1"}
    assert run["event"]["data"]["target"]["namespace"] == "deny"
    steps = {s["name"]: s for s in run["steps"]}
    assert [s["name"] for s in run["steps"]] == ["check", "flaky", "refuse"]
    expected = {
        "check": ("succeeded", 1, {"effect": 1}),
        "flaky": ("succeeded", 2, {"effect": 2}),
        "refuse": ("failed", 1, None),
    }
    for name, (step_status, attempts, outputs) in expected.items():
        step = steps[name]
        assert (step["status"], step["attempts"], step["outputs"]) == (
            step_status,
            attempts,
            outputs,
        )
        assert step["started_at"] <= step["finished_at"]
        assert step["duration"] == pytest.approx(step["finished_at"] - step["started_at"], abs=1e-5)
    assert steps["refuse"]["error"] and "refused on purpose" in steps["refuse"]["error"]
    assert steps["check"]["error"] is None
    assert run["leases"] == []


async def test_run_detail_lists_its_leases(h: Harness) -> None:
    pre = await finished(h, subject=FROZEN)
    [lease] = pre["leases"]
    assert (lease["step"], lease["target"], lease["status"]) == ("freeze", FROZEN, "open")
    assert lease["release_function"] == "test.thaw"
    await finished(h, event_type="backup.post", subject=FROZEN)
    _, _, after = await get(h, f"/v1/runs/{pre['run_id']}")
    assert after["leases"][0]["status"] == "released"


@pytest.mark.parametrize("run_id", ["run-0123456789abcdef0123", "x" * 300, "%E2%98%83"])
async def test_unknown_run_is_a_404_problem(h: Harness, run_id: str) -> None:
    assert_problem(await get(h, f"/v1/runs/{run_id}"), 404, "run_id")


# --- health, readiness, unknown paths -----------------------------------------------------------


async def test_healthz_and_readyz(h: Harness) -> None:
    assert await get(h, "/healthz") == (200, "application/json", {"status": "ok"})
    status, _, ready = await get(h, "/readyz")
    assert status == 200 and ready["status"] == "ready"
    assert sorted(ready["blueprints"]) == ["deny", "freeze", "ok"]


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
@pytest.mark.parametrize("path", ["/nope", "/v1", "/v1/events/x", "/v1/runs/a/b", "/metrics/x"])
async def test_unknown_paths_are_404_problems(h: Harness, method: str, path: str) -> None:
    async with h.client.request(method, path, data=b"{}") as resp:
        assert resp.status == 404
        assert resp.headers["Content-Type"].startswith(PROBLEM)
        body = await resp.json(content_type=None)
    assert body["status"] == 404 and body["title"]


@pytest.mark.parametrize("path", ["/v1/runs", "/healthz", "/readyz", "/metrics"])
async def test_read_only_paths_refuse_post_with_a_405_problem(h: Harness, path: str) -> None:
    async with h.client.post(path, data=b"{}") as resp:
        assert resp.status == 405
        assert resp.headers["Content-Type"].startswith(PROBLEM)
        assert "GET" in resp.headers["Allow"]
        assert (await resp.json(content_type=None))["status"] == 405


# --- metrics ------------------------------------------------------------------------------------


async def scrape(h: Harness) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, media, text = await get(h, "/metrics")
    assert (status, media) == (200, "text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def test_metrics_count_events_runs_steps_and_leases(h: Harness) -> None:
    event = event_json()
    resp = await h.send(event)
    await h.final((await resp.json())["run_id"])
    (await h.send(event)).release()  # a redelivery: answered, not accepted again
    await finished(h, subject=DENIED)
    await finished(h, subject=FROZEN)
    bad = await h.send(event_json(data={"backup": {"name": "n"}}))
    unbound = await h.send(event_json(subject="elsewhere/Deployment/app"))
    assert (bad.status, unbound.status) == (400, 422)
    bad.release()
    unbound.release()
    # Lookups that fail are not rejected *events*.
    await get(h, "/v1/runs/unknown")
    await get(h, "/v1/runs", limit="0")

    m = await scrape(h)
    pre = "io.snaphook.backup.pre"
    assert value(m, "snaphook_events_accepted_total", type=pre) == 3
    assert value(m, "snaphook_events_duplicate_total") == 1
    assert value(m, "snaphook_events_rejected_total", status="400") == 1
    assert value(m, "snaphook_events_rejected_total", status="422") == 1
    assert value(m, "snaphook_events_rejected_total", status="404") is None
    assert value(m, "snaphook_runs_total", outcome="succeeded") == 2
    assert value(m, "snaphook_runs_total", outcome="failed") == 1
    ok_steps = value(m, "snaphook_step_duration_seconds_count", function="test.effect", result="ok")
    assert ok_steps == 2  # quiesce of the accepted run, check of the denied one
    flaky_errors = {"function": "test.flaky", "result": "error"}
    assert value(m, "snaphook_step_duration_seconds_count", **flaky_errors) == 1
    assert value(m, "snaphook_step_duration_seconds_bucket", le="+Inf", **flaky_errors) == 1
    assert value(m, "snaphook_open_leases") == 1  # the freeze waits for its post event

    await finished(h, event_type="backup.post", subject=FROZEN)
    assert value(await scrape(h), "snaphook_open_leases") == 0
