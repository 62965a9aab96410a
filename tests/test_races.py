"""Races between releasers, late answers and restarts: regressions found in review."""

from __future__ import annotations

import asyncio
from pathlib import Path

from dispatcher.journal import LeaseStatus
from tests.conftest import HarnessFactory

HEAD = "apiVersion: snaphook.io/v1\nkind: Blueprint\nmetadata: {name: bp}\nspec:\n  actions:\n"
FREEZE = """    backup.pre:
      - name: freeze
        function: test.freeze
        with: {db: orders}
        lease: {ttl: 1h, release: {function: test.thaw, with: {db: orders}}}
"""


async def test_reaper_then_post_step_thaws_once(harness: HarnessFactory) -> None:
    post = """    backup.post:
      - {name: verify, function: test.effect, with: {seconds: 0.5}}
      - name: thaw
        function: test.thaw
        needs: [verify]
        with: {db: orders, lease: "{{ leases.freeze }}"}
"""
    h = await harness({"bp": HEAD + FREEZE + post}, lease_reap_interval=0.05)
    pre = await h.emit("backup.pre", wait=5, backup_id="x")
    [lease] = await h.state.journal.find_leases(run_id=pre["run_id"])
    answer = await h.emit("backup.post", backup_id="x")
    await asyncio.sleep(0.1)  # the post run has loaded the (open) lease and runs "verify"
    await h.state.journal.transition_lease(lease.lease_id, LeaseStatus.OPEN, expires_at=0.0)
    run = await h.final(answer["run_id"])
    thaw = next(s for s in run["steps"] if s["name"] == "thaw")
    assert len(h.recorder.thawed_by) == 1  # the reaper's; the step saw it and stood down
    assert thaw["status"] == "skipped" and "reaper" in thaw["error"]


async def test_denial_on_timeout_holds_for_a_run_waiting_for_a_slot(
    harness: HarnessFactory,
) -> None:
    bp = HEAD + "    backup.pre:\n      - {name: a, function: test.effect, with: {seconds: 0.5}}\n"
    h = await harness({"bp": bp}, max_concurrent_runs=1)
    await h.emit("backup.pre")  # holds the only slot for 0.5 s
    body = await h.emit("backup.pre", wait=0.1, backup_id="second")
    assert body["allowed"] is False
    run = await h.final(body["run_id"])
    assert (run["status"], run["allowed"]) == ("failed", False)
    assert run["steps"][0]["status"] == "skipped"  # what the caller was told: it never ran


async def test_resume_after_the_blueprint_changed_fails_cleanly(
    harness: HarnessFactory, tmp_path: Path
) -> None:
    v1 = HEAD + "    backup.pre:\n      - {name: a, function: test.effect, with: {seconds: 5}}\n"
    v2 = v1 + "      - {name: b, function: test.effect}\n"
    first = await harness({"bp": v1}, shutdown_grace=0.1, state_dir=tmp_path / "st")
    run_id = (await first.emit("backup.pre"))["run_id"]
    await asyncio.sleep(0.2)
    await first.client.close()  # the run stays unfinished
    second = await harness({"bp": v2}, state_dir=tmp_path / "st")
    run = await second.final(run_id)
    assert run["status"] == "failed" and "changed since the run started" in run["reason"]


async def test_freeze_finishing_after_its_lease_was_released_is_undone(
    harness: HarnessFactory,
) -> None:
    slow_freeze = """    backup.pre:
      - name: freeze
        function: test.effect
        with: {seconds: 0.5, label: freeze}
        lease: {ttl: 1h, release: {function: test.thaw, with: {db: orders}}}
    backup.post:
      - {name: report, function: test.effect}
"""
    bindings = [{"blueprint": "bp", "match": {"namespace": "ns"}, "failure_policy": "ignore"}]
    h = await harness({"bp": HEAD + slow_freeze}, bindings=bindings)
    pre = await h.emit("backup.pre", wait=0.1, backup_id="y")  # allowed by policy, still freezing
    post = await h.emit("backup.post", backup_id="y")
    await h.final(post["run_id"])
    await h.final(pre["run_id"])
    calls = [f"{function}:{step}" for function, step, _ in h.recorder.calls]
    # The post run thawed before the freeze landed; the freeze's end thawed again.
    assert calls.count("test.thaw:freeze.release") == 2
    assert calls.index("test.effect:freeze") < len(calls) - 1 - calls[::-1].index(
        "test.thaw:freeze.release"
    )
