"""Blueprint checks the schema cannot express.

Functions exist, ``with`` fits the function's parameters, ``needs`` form a DAG, and
templates only name things that will exist when they render. Each problem becomes an
error at its YAML line.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
from pydantic import (
    AliasChoices,
    BaseModel,
    TypeAdapter,
    ValidationError,
)
from pydantic.fields import FieldInfo

from dispatcher.blueprints import Blueprint, StepSpec
from dispatcher.errors import BlueprintError
from dispatcher.events import Phase
from dispatcher.templating import TemplateEngine
from dispatcher.yamlsource import Document, Location, dotted
from functions.sdk import FunctionRegistry

__all__ = ["CONTEXT_NAMES", "check_blueprint"]

CONTEXT_NAMES = frozenset(
    {"event", "backup", "target", "params", "outcome", "steps", "leases", "run", "env", "secret"}
)
"""Top-level names a ``with`` template may use (besides jinja2's globals such as ``range``)."""


@dataclass(frozen=True)
class _Scope:
    """What a template of one step can see."""

    phase: Phase
    names: frozenset[str]  # allowed top-level names
    steps: frozenset[str]  # every step of the action
    visible: frozenset[str]  # steps whose outputs exist when this step runs


class _Checker:
    """Checks one schema-valid blueprint; each problem becomes an error at its YAML line."""

    def __init__(
        self,
        blueprint: Blueprint,
        document: Document,
        registry: FunctionRegistry,
        engine: TemplateEngine,
    ) -> None:
        self.blueprint = blueprint
        self.document = document
        self.registry = registry
        self.engine = engine
        self.names = CONTEXT_NAMES | engine.global_names
        self.lease_steps = blueprint.lease_steps()
        self.errors: list[BlueprintError] = []

    def run(self) -> list[BlueprintError]:
        for phase, steps in self.blueprint.spec.actions.items():
            self._check_action(phase, steps)
        return self.errors

    def _report(self, message: str, path: Location) -> None:
        self.errors.append(self.document.error(message, path))

    def _check_action(self, phase: Phase, steps: list[StepSpec]) -> None:
        base: tuple[str | int, ...] = ("spec", "actions", phase.value)
        by_name = {step.name: step for step in steps}
        for index, step in enumerate(steps):
            self._check_step(phase, step, by_name, (*base, index))
        for cycle in _cycles(steps):
            index = next(i for i, step in enumerate(steps) if step.name == cycle[0])
            needs_index = steps[index].needs.index(cycle[1])
            self._report(f"needs cycle: {' -> '.join(cycle)}", (*base, index, "needs", needs_index))

    def _check_step(
        self, phase: Phase, step: StepSpec, by_name: Mapping[str, StepSpec], at: Location
    ) -> None:
        self._check_needs(phase, step, by_name, at)
        scope = _Scope(phase, self.names, frozenset(by_name), _visible(step, by_name))
        label = f"step {step.name!r}"
        self._check_call(label, step.function, step.with_, at, implicit=frozenset())
        self._check_templates(label, step.with_, (*at, "with"), scope)
        if step.lease is None:
            return
        release, at = step.lease.release, (*at, "lease", "release")
        label += " lease release"
        # The runner passes the lease id to the release function as ``lease``, and its
        # templates see the lease record (id, outputs) under the same name. They render
        # from what was known when the lease was taken, so other leases are not in scope.
        self._check_call(label, release.function, release.with_, at, implicit=frozenset({"lease"}))
        scope = dataclasses.replace(scope, names=(scope.names - {"leases"}) | {"lease"})
        self._check_templates(label, release.with_, (*at, "with"), scope)

    def _check_needs(
        self, phase: Phase, step: StepSpec, by_name: Mapping[str, StepSpec], at: Location
    ) -> None:
        for index, need in enumerate(step.needs):
            target = by_name.get(need)
            path = (*at, "needs", index)
            if target is None:
                hint = _suggest(need, by_name)
                self._report(
                    f"step {step.name!r} needs {need!r}, which is not a step of {phase}{hint}", path
                )
            elif target.final and not step.final:
                self._report(
                    f"step {step.name!r} needs {need!r}, a 'when: {target.when}' step that only "
                    "runs after the main steps",
                    path,
                )

    def _check_call(
        self,
        label: str,
        function: str,
        values: Mapping[str, Any],
        at: Location,
        *,
        implicit: frozenset[str],
    ) -> None:
        spec = self.registry.get(function)
        if spec is None:
            hint = _suggest(function, self.registry.names())
            self._report(f"{label}: unknown function {function!r}{hint}", (*at, "function"))
            return
        model = spec.params_model
        for path, message in _with_problems(function, values, model, implicit, self.engine):
            self._report(f"{label}: {message}", (*at, "with", *path))

    def _check_templates(self, label: str, value: Any, at: Location, scope: _Scope) -> None:
        for path, text in _strings(value):
            if not self.engine.is_template(text):
                continue
            where = (*at, *path)
            try:
                references = self.engine.referenced(text)
            except jinja2.TemplateSyntaxError as exc:
                line = self.document.text_line(where, exc.lineno)
                message = f"{label}: template syntax error: {exc.message}"
                self.errors.append(BlueprintError(message, file=self.document.file, line=line))
                continue
            for reference in sorted(references):
                problem = self._reference_problem(reference, scope)
                if problem is not None:
                    self._report(f"{label}: template {_abbreviated(text)}: {problem}", where)

    def _reference_problem(self, reference: tuple[str, ...], scope: _Scope) -> str | None:
        root, rest = reference[0], reference[1:]
        if root not in scope.names:
            return f"unknown name {root!r}{_suggest(root, scope.names)}"
        if root == "outcome" and not scope.phase.is_post:
            return f"'outcome' is only set in backup.post and restore.post, not in {scope.phase}"
        if not rest:
            return None
        key = rest[0]
        if root == "params" and key not in self.blueprint.spec.params:
            return f"unknown param {key!r}{_suggest(key, self.blueprint.spec.params)}"
        if root == "steps" and key not in scope.steps:
            return f"no step {key!r} in {scope.phase}{_suggest(key, scope.steps)}"
        if root == "steps" and key not in scope.visible:
            return f"reads the outputs of step {key!r} but does not need it (add it to needs)"
        if root == "leases" and key not in self.lease_steps:
            return f"no step named {key!r} takes a lease in this blueprint"
        return None


def _visible(step: StepSpec, by_name: Mapping[str, StepSpec]) -> frozenset[str]:
    """Steps that finish before ``step`` starts: its needs, transitively; for a finalizer
    also every main step (finalizers run after all of them)."""
    seen: set[str] = set()
    pending = list(step.needs)
    while pending:
        name = pending.pop()
        if name not in seen and name in by_name:
            seen.add(name)
            pending.extend(by_name[name].needs)
    if step.final:
        seen.update(name for name, other in by_name.items() if not other.final)
    seen.discard(step.name)
    return frozenset(seen)


def _cycles(steps: list[StepSpec]) -> list[list[str]]:
    """Each ``needs`` cycle once, as a closed path ``[a, b, a]``."""
    names = {step.name for step in steps}
    needs = {step.name: [need for need in step.needs if need in names] for step in steps}
    state: dict[str, bool] = {}  # False while on the current path, True when finished
    trail: list[str] = []
    found: list[list[str]] = []

    def visit(name: str) -> None:
        state[name] = False
        trail.append(name)
        for need in needs[name]:
            if need not in state:
                visit(need)
            elif state[need] is False:
                found.append([*trail[trail.index(need) :], need])
        trail.pop()
        state[name] = True

    for step in steps:
        if step.name not in state:
            visit(step.name)
    return found


def _with_problems(
    function: str,
    values: Mapping[str, Any],
    model: type[BaseModel],
    implicit: frozenset[str],
    engine: TemplateEngine,
) -> Iterator[tuple[Location, str]]:
    """(path under ``with``, message) for each way ``values`` cannot fit ``model``.

    Template strings render at run time, so only literal values are type-checked here.
    """
    keys = _accepted_keys(model)
    if model.model_config.get("extra") != "allow":  # "ignore" would drop typos silently
        for key in values:
            if key not in keys:
                hint = _suggest(key, keys)
                yield (key,), f"function {function!r} has no parameter {key!r}{hint}"
    given = {keys[key] for key in values if key in keys}
    for name, info in model.model_fields.items():
        if info.is_required() and name not in given and not implicit & {name, info.alias}:
            yield (), f"function {function!r} requires parameter {info.alias or name!r} in with"
    for key, value in values.items():
        if key in keys and not _has_template(value, engine):
            try:
                _field_adapter(model, keys[key]).validate_python(value)
            except ValidationError as exc:
                for error in exc.errors(include_url=False, include_input=False):
                    where = dotted(("with", key, *error["loc"]))
                    yield (key, *error["loc"]), f"{where}: {error['msg']}"


def _accepted_keys(model: type[BaseModel]) -> dict[str, str]:
    """Every key ``model`` accepts in its input → the field it fills."""
    config = model.model_config
    by_name = bool(config.get("populate_by_name") or config.get("validate_by_name"))
    keys: dict[str, str] = {}
    for name, info in model.model_fields.items():
        aliases = _aliases(info)
        keys.update(dict.fromkeys(aliases, name))
        if by_name or not aliases:
            keys[name] = name
    return keys


def _aliases(info: FieldInfo) -> list[str]:
    alias = info.validation_alias
    if isinstance(alias, str):
        return [alias]
    if isinstance(alias, AliasChoices):
        return [choice for choice in alias.choices if isinstance(choice, str)]
    return [info.alias] if info.alias else []


@functools.cache
def _field_adapter(model: type[BaseModel], name: str) -> TypeAdapter[Any]:
    # The field's type with its constraints, without the model's cross-field validators,
    # which would judge the partial, template-less set of values.
    return TypeAdapter(model.model_fields[name].rebuild_annotation())


def _has_template(value: Any, engine: TemplateEngine) -> bool:
    return any(engine.is_template(text) for _, text in _strings(value))


def _strings(value: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[Location, str]]:
    """Every string inside a JSON-like value, with its path."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(item, (*path, str(key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, (*path, index))


def _abbreviated(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _suggest(word: str, options: Iterable[str]) -> str:
    matches = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def check_blueprint(
    blueprint: Blueprint,
    document: Document,
    registry: FunctionRegistry,
    engine: TemplateEngine,
) -> list[BlueprintError]:
    """Every semantic problem of one schema-valid blueprint."""
    return _Checker(blueprint, document, registry, engine).run()
