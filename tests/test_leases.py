"""Freeze leases: released by the post event, by the dispatcher, or by the reaper — once."""

from __future__ import annotations

import asyncio
from typing import Any

from dispatcher.journal import LeaseStatus
from tests.conftest import HarnessFactory

PRE = """
    backup.pre:
      - name: freeze
        function: test.freeze
        with: {{db: orders{fail}}}
        lease: {{ttl: {ttl}, release: {{function: test.thaw, with: {{db: orders}}}}}}
{more}"""

POST_WITH_THAW = """
    backup.post:
      - name: thaw
        function: test.thaw
        with: {db: orders, lease: "{{ leases.freeze }}"}
      - name: report
        function: test.effect
        when: always
"""

POST_WITHOUT_THAW = """
    backup.post:
      - {name: report, function: test.effect}
"""


def blueprint(
    post: str = POST_WITH_THAW, *, ttl: str = "1h", fail: bool = False, more: str = ""
) -> str:
    pre = PRE.format(ttl=ttl, fail=", fail: true" if fail else "", more=more)
    return (
        "apiVersion: snaphook.io/v1\nkind: Blueprint\nmetadata: {name: bp}\n"
        f"spec:\n  actions:{pre}{post}"
    )


async def leases_of(h: Any, run_id: str) -> list[dict[str, Any]]:
    body: dict[str, Any] = await (await h.client.get(f"/v1/runs/{run_id}")).json()
    leases: list[dict[str, Any]] = body["leases"]
    return leases


async def test_post_event_step_releases_the_lease(harness: HarnessFactory) -> None:
    h = await harness({"bp": blueprint()})
    pre = await h.emit("backup.pre", wait=5, backup_id="b7")
    assert pre["allowed"] is True
    assert h.recorder.frozen == {"orders": True}
    [lease] = await leases_of(h, pre["run_id"])
    assert lease["status"] == "open"

    post = await h.emit("backup.post", wait=5, backup_id="b7")
    await h.final(post["run_id"])
    assert h.recorder.frozen == {"orders": False}
    [lease] = await leases_of(h, pre["run_id"])
    assert lease["status"] == "released"
    assert lease["released_by"] == f"step:{post['run_id']}/thaw"
    # The thaw step received the lease id through the template, and thawed exactly once.
    assert h.recorder.thawed_by == [("orders", lease["lease_id"])]


async def test_post_run_releases_leases_its_steps_did_not(harness: HarnessFactory) -> None:
    h = await harness({"bp": blueprint(POST_WITHOUT_THAW)})
    pre = await h.emit("backup.pre", wait=5, backup_id="b8")
    post = await h.emit("backup.post", backup_id="b8")
    await h.final(post["run_id"])
    [lease] = await leases_of(h, pre["run_id"])
    assert (lease["status"], lease["released_by"]) == ("released", f"post:{post['run_id']}")
    assert h.recorder.frozen == {"orders": False}


async def test_post_of_another_backup_leaves_the_lease(harness: HarnessFactory) -> None:
    h = await harness({"bp": blueprint(POST_WITHOUT_THAW)})
    pre = await h.emit("backup.pre", wait=5, backup_id="mine")
    post = await h.emit("backup.post", backup_id="someone-else")
    await h.final(post["run_id"])
    [lease] = await leases_of(h, pre["run_id"])
    assert lease["status"] == "open" and h.recorder.frozen == {"orders": True}


async def test_reaper_releases_after_ttl_when_post_never_comes(harness: HarnessFactory) -> None:
    h = await harness({"bp": blueprint(ttl="300ms")}, lease_reap_interval=0.05)
    pre = await h.emit("backup.pre", wait=5)
    assert h.recorder.frozen == {"orders": True}
    for _ in range(200):
        [lease] = await leases_of(h, pre["run_id"])
        if lease["status"] in ("released", "failed"):
            break
        await asyncio.sleep(0.02)
    assert (lease["status"], lease["released_by"]) == ("released", "reaper")
    assert h.recorder.frozen == {"orders": False}
    assert len(h.recorder.thawed_by) == 1
    # A late post event finds nothing left to release and thaws nothing twice.
    post = await h.emit("backup.post")
    await h.final(post["run_id"])
    assert len(h.recorder.thawed_by) == 1


async def test_failed_freeze_is_released_at_once(harness: HarnessFactory) -> None:
    h = await harness({"bp": blueprint(fail=True)})
    pre = await h.emit("backup.pre", wait=5)
    assert pre["allowed"] is False
    await h.final(pre["run_id"])
    [lease] = await leases_of(h, pre["run_id"])
    assert (lease["status"], lease["released_by"]) == ("released", "step-failed")
    assert h.recorder.frozen == {"orders": False}


async def test_run_failing_after_freeze_releases_its_lease(harness: HarnessFactory) -> None:
    more = "      - {name: dump, function: test.fail, needs: [freeze]}\n"
    h = await harness({"bp": blueprint(more=more)})
    pre = await h.emit("backup.pre", wait=5)
    assert pre["allowed"] is False and "dump" in pre["reason"]
    await h.final(pre["run_id"])
    [lease] = await leases_of(h, pre["run_id"])
    assert (lease["status"], lease["released_by"]) == ("released", "run-failed")
    assert h.recorder.frozen == {"orders": False}


async def test_exactly_one_release_when_reaper_and_post_race(harness: HarnessFactory) -> None:
    h = await harness({"bp": blueprint(POST_WITHOUT_THAW, ttl="1h")})
    pre = await h.emit("backup.pre", wait=5, backup_id="race")
    [lease] = await h.state.journal.find_leases(run_id=pre["run_id"])
    # Make the lease due now, then let the reaper and a post event go for it together.
    await h.state.journal.transition_lease(lease.lease_id, LeaseStatus.OPEN, expires_at=0.0)
    post = await h.emit("backup.post", backup_id="race")
    await asyncio.gather(h.final(post["run_id"]), h.state.leases.reap_once())
    await asyncio.sleep(0.1)
    assert len(h.recorder.thawed_by) == 1
    [final] = await leases_of(h, pre["run_id"])
    assert final["status"] == "released"


async def test_open_leases_metric(harness: HarnessFactory) -> None:
    h = await harness({"bp": blueprint()})
    await h.emit("backup.pre", wait=5, backup_id="m")
    text = await (await h.client.get("/metrics")).text()
    assert "snaphook_open_leases 1.0" in text
    post = await h.emit("backup.post", backup_id="m")
    await h.final(post["run_id"])
    text = await (await h.client.get("/metrics")).text()
    assert "snaphook_open_leases 0.0" in text


async def test_post_without_a_pre_has_nothing_to_thaw(harness: HarnessFactory) -> None:
    h = await harness({"bp": blueprint()})
    post = await h.emit("backup.post", wait=5, backup_id="never-frozen")
    assert post["allowed"] is True
    run = await h.final(post["run_id"])
    thaw = next(s for s in run["steps"] if s["name"] == "thaw")
    assert thaw["status"] == "skipped" and "no lease freeze" in thaw["error"]
    assert h.recorder.thawed_by == []


async def test_denied_on_timeout_stops_the_run_and_thaws(harness: HarnessFactory) -> None:
    more = "      - {name: dump, function: test.effect, needs: [freeze], with: {seconds: 1}}\n"
    more += "      - {name: verify, function: test.effect, needs: [dump]}\n"
    bindings = [{"blueprint": "bp", "match": {"namespace": "ns"}, "failure_policy": "fail"}]
    h = await harness({"bp": blueprint(more=more)}, bindings=bindings)
    pre = await h.emit("backup.pre", wait=0.3)
    assert pre["allowed"] is False and "no decision within 0.3s" in pre["reason"]
    run = await h.final(pre["run_id"])
    steps = {s["name"]: s["status"] for s in run["steps"]}
    # dump was in flight and finishes; nothing after it starts; the freeze is undone.
    assert steps == {"freeze": "succeeded", "dump": "succeeded", "verify": "skipped"}
    [lease] = await leases_of(h, pre["run_id"])
    assert (lease["status"], lease["released_by"]) == ("released", "run-failed")
    assert h.recorder.frozen == {"orders": False}


async def test_what_the_release_returned_is_kept_on_the_lease(harness: HarnessFactory) -> None:
    h = await harness({"bp": blueprint(ttl="300ms")}, lease_reap_interval=0.05)
    pre = await h.emit("backup.pre", wait=5)
    for _ in range(200):
        [lease] = await leases_of(h, pre["run_id"])
        if lease["status"] == "released":
            break
        await asyncio.sleep(0.02)
    # The reaper's thaw answered {db, frozen}: kept, as a post step's would be.
    assert lease["release_outputs"] == {"db": "orders", "frozen": False}
