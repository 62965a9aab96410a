"""Running a plan: DAG order, retries, timeouts, on_error, finalizers, templating, restarts."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from dispatcher.journal import StepStatus
from dispatcher.retrying import backoff_delay
from tests.conftest import HarnessFactory, event_json


def blueprint(steps: str, *, phase: str = "backup.pre", extra: str = "") -> str:
    body = "\n".join("      " + line for line in steps.strip().splitlines())
    return (
        "apiVersion: snaphook.io/v1\nkind: Blueprint\nmetadata: {name: bp}\nspec:\n"
        f"  actions:\n    {phase}:\n{body}\n{extra}"
    )


def by_name(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in run["steps"]}


async def test_needs_order_and_parallel_branches(harness: HarnessFactory) -> None:
    h = await harness(
        {
            "bp": blueprint("""
- {name: a, function: test.effect, with: {seconds: 0.05}}
- {name: b, function: test.effect, needs: [a], with: {seconds: 0.2}}
- {name: c, function: test.effect, needs: [a], with: {seconds: 0.2}}
- {name: d, function: test.effect, needs: [b, c]}
""")
        }
    )
    run = await h.final((await h.emit())["run_id"])
    steps = by_name(run)
    assert run["status"] == "succeeded"
    assert steps["a"]["finished_at"] <= steps["b"]["started_at"]
    assert steps["a"]["finished_at"] <= steps["c"]["started_at"]
    # b and c only need a: they overlap instead of running one after the other.
    assert steps["c"]["started_at"] < steps["b"]["finished_at"]
    assert steps["b"]["started_at"] < steps["c"]["finished_at"]
    assert max(steps["b"]["finished_at"], steps["c"]["finished_at"]) <= steps["d"]["started_at"]


async def test_retries_until_success_with_backoff(harness: HarnessFactory) -> None:
    h = await harness(
        {
            "bp": blueprint("""
- name: flaky
  function: test.flaky
  with: {failures: 2}
  retry: {attempts: 3, backoff: 10ms, max_backoff: 20ms}
""")
        }
    )
    body = await h.emit(wait=5)
    assert body["allowed"] is True
    run = await h.final(body["run_id"])
    step = by_name(run)["flaky"]
    assert (step["status"], step["attempts"]) == ("succeeded", 3)
    assert [c[2] for c in h.recorder.calls] == [1, 2, 3]


async def test_retries_exhausted_then_denied(harness: HarnessFactory) -> None:
    h = await harness(
        {
            "bp": blueprint("""
- name: flaky
  function: test.flaky
  with: {failures: 5}
  retry: {attempts: 2, backoff: 10ms}
""")
        }
    )
    body = await h.emit(wait=5)
    assert body["allowed"] is False
    assert "flaky" in body["reason"] and "flaky attempt 2" in body["reason"]
    step = by_name(await h.final(body["run_id"]))["flaky"]
    assert (step["status"], step["attempts"]) == ("failed", 2)


async def test_permanent_error_is_not_retried(harness: HarnessFactory) -> None:
    h = await harness(
        {"bp": blueprint("- {name: x, function: test.fail, retry: {attempts: 5, backoff: 10ms}}")}
    )
    body = await h.emit(wait=5)
    assert body["allowed"] is False
    step = by_name(await h.final(body["run_id"]))["x"]
    assert (step["status"], step["attempts"]) == ("failed", 1)
    assert "refused on purpose" in step["error"]


async def test_timeout_per_attempt(harness: HarnessFactory) -> None:
    h = await harness(
        {
            "bp": blueprint("""
- name: slow
  function: test.effect
  with: {seconds: 5}
  timeout: 100ms
  retry: {attempts: 2, backoff: 10ms}
""")
        }
    )
    body = await h.emit(wait=5)
    assert body["allowed"] is False
    step = by_name(await h.final(body["run_id"]))["slow"]
    assert step["attempts"] == 2 and "timed out after 0.1s" in step["error"]
    assert h.recorder.calls == []  # the function never got to its effect


def test_backoff_is_exponential_capped_and_jittered() -> None:
    low = [backoff_delay(n, base=1.0, cap=8.0, rng=lambda: 0.0) for n in range(1, 7)]
    high = [backoff_delay(n, base=1.0, cap=8.0, rng=lambda: 1.0) for n in range(1, 7)]
    assert low == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert high == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    rng = random.Random(7)
    spread = {round(backoff_delay(3, base=1.0, cap=60, rng=rng.random), 3) for _ in range(20)}
    assert len(spread) > 10 and all(2.0 <= d <= 4.0 for d in spread)


async def test_on_error_continue_keeps_the_phase_allowed(harness: HarnessFactory) -> None:
    h = await harness(
        {
            "bp": blueprint("""
- {name: optional, function: test.fail, on_error: continue}
- {name: after, function: test.effect, needs: [optional]}
""")
        }
    )
    body = await h.emit(wait=5)
    assert body["allowed"] is True
    steps = by_name(await h.final(body["run_id"]))
    assert steps["optional"]["status"] == "failed"
    assert steps["after"]["status"] == "succeeded"


async def test_finalizers_run_after_a_failure(harness: HarnessFactory) -> None:
    h = await harness(
        {
            "bp": blueprint("""
- {name: broken, function: test.fail}
- {name: blocked, function: test.effect, needs: [broken]}
- {name: cleanup, function: test.effect, when: on_failure}
- {name: report, function: test.effect, when: always, needs: [cleanup]}
""")
        }
    )
    body = await h.emit(wait=5)
    run = await h.final(body["run_id"])
    steps = by_name(run)
    assert (run["status"], run["allowed"]) == ("failed", False)
    assert steps["blocked"]["status"] == "skipped" and "broken" in steps["blocked"]["error"]
    assert steps["cleanup"]["status"] == "succeeded"
    assert steps["report"]["status"] == "succeeded"
    assert steps["cleanup"]["finished_at"] <= steps["report"]["started_at"]
    assert steps["broken"]["finished_at"] <= steps["cleanup"]["started_at"]


async def test_on_failure_finalizer_skipped_when_all_succeed(harness: HarnessFactory) -> None:
    h = await harness(
        {
            "bp": blueprint("""
- {name: ok, function: test.effect}
- {name: cleanup, function: test.effect, when: on_failure}
- {name: report, function: test.effect, when: always}
""")
        }
    )
    steps = by_name(await h.final((await h.emit())["run_id"]))
    assert steps["cleanup"]["status"] == "skipped"
    assert steps["report"]["status"] == "succeeded"
    assert sorted(h.recorder.effects.values()) == [1, 1]


async def test_step_outputs_feed_later_templates(harness: HarnessFactory) -> None:
    h = await harness(
        {
            "bp": blueprint("""
- {name: first, function: test.effect}
- name: say
  function: notify.log
  needs: [first]
  with:
    message: "effect={{ steps.first.outputs.effect }} backup={{ backup.name }}\\
      \\ ns={{ target.namespace }}"
""")
        }
    )
    steps = by_name(await h.final((await h.emit())["run_id"]))
    assert steps["say"]["outputs"] == {"message": "effect=1 backup=nightly ns=ns"}


async def test_secrets_never_reach_run_records(
    harness: HarnessFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SNAPHOOK_SECRET_CREDS_PASSWORD", "hunter2-very-secret")
    h = await harness(
        {
            "bp": blueprint("""
- name: leak
  function: notify.log
  with: {message: "password is {{ secret('creds', 'password') }}"}
""")
        }
    )
    run = await h.final((await h.emit())["run_id"])
    assert by_name(run)["leak"]["outputs"] == {"message": "password is **********"}
    assert "hunter2-very-secret" not in str(run)


async def test_template_error_fails_the_step_without_retry(harness: HarnessFactory) -> None:
    h = await harness(
        {
            "bp": blueprint("""
- name: needs-env
  function: notify.log
  retry: {attempts: 3, backoff: 10ms}
  with: {message: "{{ env('SNAPHOOK_TEST_DEFINITELY_UNSET') }}"}
""")
        }
    )
    body = await h.emit(wait=5)
    assert body["allowed"] is False
    step = by_name(await h.final(body["run_id"]))["needs-env"]
    assert step["attempts"] == 1 and "SNAPHOOK_TEST_DEFINITELY_UNSET" in step["error"]


async def test_restart_fails_interrupted_steps_and_still_runs_finalizers(
    harness: HarnessFactory, tmp_path: Any
) -> None:
    bp = blueprint("""
- {name: quick, function: test.effect}
- {name: long, function: test.effect, needs: [quick], with: {seconds: 30}}
- {name: after, function: test.effect, needs: [long]}
- {name: report, function: test.effect, when: always}
""")
    state = tmp_path / "shared-state"
    first = await harness({"bp": bp}, state_dir=state, shutdown_grace=0.05)
    run_id = (await first.emit())["run_id"]
    for _ in range(200):
        steps = {s.name: s for s in await first.state.journal.get_steps(run_id)}
        if steps["long"].status is StepStatus.RUNNING:
            break
        await asyncio.sleep(0.01)
    await first.client.close()  # the dispatcher stops while "long" is running

    second = await harness({"bp": bp}, state_dir=state)
    run = await second.final(run_id)
    steps = by_name(run)
    assert run["status"] == "failed"
    assert steps["quick"]["status"] == "succeeded" and steps["quick"]["attempts"] == 1
    assert steps["long"]["status"] == "failed" and "interrupted" in steps["long"]["error"]
    assert steps["after"]["status"] == "skipped"
    assert steps["report"]["status"] == "succeeded"
    assert second.recorder.effects[f"{run_id}/quick"] == 0  # not executed again


async def test_restart_resumes_a_run_that_had_not_started(
    harness: HarnessFactory, tmp_path: Any
) -> None:
    bp = blueprint("""
- {name: gate, function: test.effect, with: {seconds: 30}}
""")
    state = tmp_path / "shared-state"
    first = await harness({"bp": bp}, state_dir=state, shutdown_grace=0.05, max_concurrent_runs=1)
    await first.emit()  # occupies the only run slot
    queued = (await first.emit(backup_id="b2"))["run_id"]
    await first.client.close()
    second = await harness(
        {"bp": blueprint("- {name: gate, function: test.effect}")}, state_dir=state
    )
    run = await second.final(queued)
    assert run["status"] == "succeeded" and by_name(run)["gate"]["attempts"] == 1


async def test_secret_params_are_masked_in_run_records(harness: HarnessFactory) -> None:
    bp = """
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: bp}
spec:
  params:
    token: {type: string, secret: true, required: true}
  actions:
    backup.pre:
      - {name: say, function: notify.log, with: {message: "token={{ params.token }}"}}
"""
    h = await harness({"bp": bp})
    token = "tok-7c1d0b2e-never-shown"
    data = {"backup": {"name": "n", "id": "1"}, "params": {"token": token}}
    resp = await h.send(event_json(data=data))
    run = await h.final((await resp.json())["run_id"])
    assert run["params"] == {"token": "**********"}
    assert run["event"]["data"]["params"] == {"token": "**********"}
    assert by_name(run)["say"]["outputs"] == {"message": "token=**********"}
    assert token not in str(run)


async def test_report_steps_see_the_run_outcome_and_timings(harness: HarnessFactory) -> None:
    h = await harness(
        {
            "bp": blueprint("""
- {name: broken, function: test.fail}
- name: report
  function: notify.log
  when: always
  with:
    message: >-
      failed={{ run.failed }} steps={{ run.failed_steps | join(',') }}
      took={{ steps.broken.duration is number }} why={{ steps.broken.error }}
""")
        }
    )
    run = await h.final((await h.emit())["run_id"])
    message = by_name(run)["report"]["outputs"]["message"]
    assert message == "failed=True steps=broken took=True why=refused on purpose"
