"""The planner: event phase + blueprint → levels of steps, as `snaphook plan` shows them."""

from __future__ import annotations

import json
from typing import Any

from dispatcher.blueprints import Blueprint
from dispatcher.events import Phase
from dispatcher.planner import Plan, format_plan, make_plan


def blueprint(pre: list[dict[str, Any]], post: list[dict[str, Any]] | None = None) -> Blueprint:
    actions: dict[str, Any] = {"backup.pre": pre}
    if post is not None:
        actions["backup.post"] = post
    return Blueprint.model_validate(
        {
            "apiVersion": "snaphook.io/v1",
            "kind": "Blueprint",
            "metadata": {"name": "bp"},
            "spec": {"actions": actions},
        }
    )


def levels(plan: Plan) -> dict[str, int]:
    return {s.name: s.level for s in plan.steps}


DIAMOND: list[dict[str, Any]] = [
    {"name": "d", "function": "test.effect", "needs": ["b", "c"]},
    {"name": "b", "function": "test.effect", "needs": ["a"]},
    {"name": "a", "function": "test.effect"},
    {"name": "c", "function": "test.effect", "needs": ["a"]},
]


def test_diamond_levels_and_order() -> None:
    plan = make_plan(blueprint(DIAMOND), Phase.BACKUP_PRE)
    assert levels(plan) == {"a": 0, "b": 1, "c": 1, "d": 2}
    # Steps come out sorted by level, whatever their order in the file.
    assert [s.level for s in plan.steps] == sorted(s.level for s in plan.steps)
    assert plan.steps[0].name == "a" and plan.steps[-1].name == "d"
    assert [s.name for s in plan.main] == [s.name for s in plan.steps]
    assert plan.finalizers == []
    assert plan.step("c").spec.needs == ["a"]


def test_independent_steps_share_level_zero() -> None:
    plan = make_plan(
        blueprint([{"name": n, "function": "test.effect"} for n in ("x", "y", "z")]),
        Phase.BACKUP_PRE,
    )
    assert levels(plan) == {"x": 0, "y": 0, "z": 0}


def test_finalizers_come_after_the_main_dag() -> None:
    steps: list[dict[str, Any]] = [
        *DIAMOND,
        {"name": "report", "function": "notify.log", "when": "always"},
        {"name": "cleanup", "function": "notify.log", "when": "on_failure", "needs": ["d"]},
        {"name": "page", "function": "notify.log", "when": "always", "needs": ["report"]},
    ]
    plan = make_plan(blueprint(steps), Phase.BACKUP_PRE)
    main_depth = 3  # levels 0, 1, 2
    got = levels(plan)
    assert {s.name for s in plan.finalizers} == {"report", "cleanup", "page"}
    assert all(got[f.name] >= main_depth for f in plan.finalizers)
    assert max(got[m.name] for m in plan.main) < min(got[f.name] for f in plan.finalizers)
    # Finalizers all start together once the main DAG is done: needing a main step adds no
    # extra wait; only a chain among finalizers does.
    assert got["report"] == main_depth
    assert got["cleanup"] == main_depth
    assert got["page"] == main_depth + 1
    assert [s.name for s in plan.steps][-1] == "page"


def test_finalizer_only_phase() -> None:
    plan = make_plan(
        blueprint([{"name": "report", "function": "notify.log", "when": "always"}]),
        Phase.BACKUP_PRE,
    )
    assert levels(plan) == {"report": 0}
    assert plan.main == [] and [s.name for s in plan.finalizers] == ["report"]


def test_phase_without_action_is_an_empty_plan() -> None:
    plan = make_plan(blueprint(DIAMOND), Phase.RESTORE_PRE)
    assert plan.steps == ()
    assert plan.to_json()["steps"] == []
    text = format_plan(plan)
    assert "phase restore.pre" in text
    assert "(no steps for this phase)" in text


def test_to_json_shape() -> None:
    steps: list[dict[str, Any]] = [
        {
            "name": "freeze",
            "function": "test.freeze",
            "with": {"db": "app"},
            "timeout": "30s",
            "lease": {"ttl": "15m", "release": "test.thaw"},
        },
        {
            "name": "dump",
            "function": "test.effect",
            "needs": ["freeze"],
            "retry": {"attempts": 3, "backoff": "2s"},
            "on_error": "continue",
        },
        {"name": "tell", "function": "notify.log", "when": "always"},
    ]
    plan = make_plan(
        blueprint(steps),
        Phase.BACKUP_PRE,
        params={"database": "app"},
        failure_policy="ignore",
        timeout=12.5,
    )
    doc = json.loads(json.dumps(plan.to_json()))  # JSON-ready all the way down
    assert doc["blueprint"] == "bp"
    assert doc["phase"] == "backup.pre"
    assert doc["failure_policy"] == "ignore"
    assert doc["timeout"] == 12.5
    assert doc["params"] == {"database": "app"}
    by_name = {s["name"]: s for s in doc["steps"]}
    assert [s["name"] for s in doc["steps"]] == ["freeze", "dump", "tell"]
    assert by_name["freeze"] == {
        "name": "freeze",
        "function": "test.freeze",
        "level": 0,
        "needs": [],
        "when": "on_success",
        "on_error": "fail",
        "timeout": 30.0,
        "retry": {"attempts": 1, "backoff": 1.0},
        "lease": {"ttl": 900.0, "release": "test.thaw"},
    }
    assert by_name["dump"]["needs"] == ["freeze"]
    assert by_name["dump"]["level"] == 1
    assert by_name["dump"]["retry"] == {"attempts": 3, "backoff": 2.0}
    assert by_name["dump"]["on_error"] == "continue"
    assert by_name["dump"]["lease"] is None
    assert by_name["tell"]["when"] == "always"
    assert by_name["tell"]["level"] == 2


def test_plan_params_are_a_copy() -> None:
    given = {"a": 1}
    plan = make_plan(blueprint(DIAMOND), Phase.BACKUP_PRE, params=given)
    given["a"] = 2
    assert plan.params == {"a": 1}


def test_format_plan_text() -> None:
    steps: list[dict[str, Any]] = [
        {
            "name": "freeze",
            "function": "test.freeze",
            "with": {"db": "app"},
            "timeout": "30s",
            "lease": {"ttl": "15m", "release": "test.thaw"},
        },
        {
            "name": "dump",
            "function": "test.effect",
            "needs": ["freeze"],
            "retry": {"attempts": 3, "backoff": "2s"},
        },
        {"name": "check", "function": "test.effect", "needs": ["freeze"], "on_error": "continue"},
        {"name": "tell", "function": "notify.log", "when": "always"},
    ]
    text = format_plan(make_plan(blueprint(steps), Phase.BACKUP_PRE, timeout=20))
    lines = text.splitlines()
    assert lines[0] == ("blueprint bp  phase backup.pre  failure_policy=fail  decision timeout=20s")
    assert lines[1:] == [
        "  level 0:",
        "    freeze: test.freeze  timeout 30s  lease ttl 900s release test.thaw",
        "  level 1:",
        "    dump: test.effect  timeout 60s  needs freeze  retry 3x from 2s",
        "    check: test.effect  timeout 60s  needs freeze  on_error continue",
        "  finally 2:",
        "    tell: notify.log  timeout 60s  when always",
    ]
