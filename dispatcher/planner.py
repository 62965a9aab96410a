"""Event + blueprint → a DAG of steps. Pure: plans run nothing and touch no storage.

Main steps (``when: on_success``, the default) form the DAG that decides the phase.
Finalizers (``when: on_failure`` / ``always``) run after every main step has finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dispatcher.blueprints import Blueprint, StepSpec
from dispatcher.events import Phase


@dataclass(frozen=True)
class PlannedStep:
    spec: StepSpec
    level: int  # longest chain of ``needs`` before this step; equal levels may run together

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def final(self) -> bool:
        return self.spec.final


@dataclass(frozen=True)
class Plan:
    blueprint: str
    phase: Phase
    steps: tuple[PlannedStep, ...]
    params: dict[str, Any] = field(default_factory=dict)
    failure_policy: str = "fail"
    timeout: float = 30.0

    def step(self, name: str) -> PlannedStep:
        for planned in self.steps:
            if planned.name == name:
                return planned
        raise KeyError(name)

    @property
    def main(self) -> list[PlannedStep]:
        return [s for s in self.steps if not s.final]

    @property
    def finalizers(self) -> list[PlannedStep]:
        return [s for s in self.steps if s.final]

    def to_json(self) -> dict[str, Any]:
        return {
            "blueprint": self.blueprint,
            "phase": self.phase.value,
            "failure_policy": self.failure_policy,
            "timeout": self.timeout,
            "params": self.params,
            "steps": [_step_json(s) for s in self.steps],
        }


def _step_json(planned: PlannedStep) -> dict[str, Any]:
    spec = planned.spec
    return {
        "name": spec.name,
        "function": spec.function,
        "level": planned.level,
        "needs": list(spec.needs),
        "when": spec.when,
        "on_error": spec.on_error,
        "timeout": spec.timeout,
        "retry": {"attempts": spec.retry.attempts, "backoff": spec.retry.backoff},
        "lease": (
            {"ttl": spec.lease.ttl, "release": spec.lease.release.function}
            if spec.lease is not None
            else None
        ),
    }


def _levels(steps: list[StepSpec]) -> dict[str, int]:
    # Blueprints are validated acyclic at load time, so plain memoised recursion is safe.
    by_name = {s.name: s for s in steps}
    levels: dict[str, int] = {}

    def level(name: str) -> int:
        if name not in levels:
            step = by_name[name]
            # A finalizer's needs on main steps are met by the offset past the main DAG;
            # only chains among finalizers push it further.
            needs = [n for n in step.needs if n in by_name and (by_name[n].final or not step.final)]
            levels[name] = 1 + max((level(n) for n in needs), default=-1)
        return levels[name]

    for step in steps:
        level(step.name)
    return levels


def make_plan(
    blueprint: Blueprint,
    phase: Phase,
    *,
    params: dict[str, Any] | None = None,
    failure_policy: str = "fail",
    timeout: float = 30.0,
) -> Plan:
    steps = blueprint.steps(phase)
    levels = _levels(steps)
    # Finalizers come after every main step: offset their levels past the main DAG.
    main_depth = 1 + max((levels[s.name] for s in steps if not s.final), default=-1)
    planned = tuple(
        PlannedStep(spec=s, level=levels[s.name] + (main_depth if s.final else 0)) for s in steps
    )
    ordered = tuple(sorted(planned, key=lambda p: p.level))
    return Plan(
        blueprint=blueprint.metadata.name,
        phase=phase,
        steps=ordered,
        params=dict(params or {}),
        failure_policy=failure_policy,
        timeout=timeout,
    )


def format_plan(plan: Plan) -> str:
    """The plan as text, one line per step, grouped by level."""
    lines = [
        f"blueprint {plan.blueprint}  phase {plan.phase.value}  "
        f"failure_policy={plan.failure_policy}  decision timeout={plan.timeout:g}s"
    ]
    if not plan.steps:
        lines.append("  (no steps for this phase)")
    current = -1
    for planned in plan.steps:
        if planned.level != current:
            current = planned.level
            label = "finally" if planned.final else "level"
            lines.append(f"  {label} {current}:")
        lines.append("    " + _describe_step(planned.spec))
    return "\n".join(lines)


def _describe_step(spec: StepSpec) -> str:
    parts = [f"{spec.name}: {spec.function}", f"timeout {spec.timeout:g}s"]
    if spec.needs:
        parts.append("needs " + ",".join(spec.needs))
    if spec.retry.attempts > 1:
        parts.append(f"retry {spec.retry.attempts}x from {spec.retry.backoff:g}s")
    if spec.when != "on_success":
        parts.append(f"when {spec.when}")
    if spec.on_error != "fail":
        parts.append(f"on_error {spec.on_error}")
    if spec.lease is not None:
        parts.append(f"lease ttl {spec.lease.ttl:g}s release {spec.lease.release.function}")
    return "  ".join(parts)
