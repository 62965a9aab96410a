"""Blueprints: which hook functions run, in which order, around a backup or restore.

A blueprint is a YAML document (``apiVersion: snaphook.io/v1``, ``kind: Blueprint``) whose
``spec.actions`` maps each :class:`~dispatcher.events.Phase` to a list of steps. The models
below are the schema; :func:`load_blueprints` reads a directory of YAML files, validates the
schema and then checks everything a schema cannot express: functions exist, ``with`` fits
the function's parameters, ``needs`` form a DAG, and templates only name things that will
exist when they render. Every error carries its file and line, and all of them are reported
at once, because fixing blueprints one error per restart is miserable.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

import jinja2
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from dispatcher.durations import Duration
from dispatcher.errors import BlueprintError
from dispatcher.events import Phase
from dispatcher.redaction import redactor
from dispatcher.secrets import EnvSecretResolver
from dispatcher.templating import TemplateEngine
from dispatcher.yamlsource import Document, Location, dotted, read_documents
from functions.sdk import FunctionRegistry

__all__ = [
    "API_VERSION",
    "CONTEXT_NAMES",
    "Blueprint",
    "BlueprintErrors",
    "BlueprintSet",
    "BlueprintSpec",
    "LeaseSpec",
    "Metadata",
    "ParamSpec",
    "ReleaseSpec",
    "RetryPolicy",
    "StepSpec",
    "load_blueprints",
    "validate_blueprints",
]

API_VERSION = "snaphook.io/v1"
API_GROUP = "snaphook.io/"  # documents of other tools (K10, Kanister) are skipped
MAX_LEASE_TTL = 7 * 86_400.0  # a week: longer "freezes" are forgotten freezes

ParamType = Literal["string", "integer", "number", "boolean", "object", "array"]
_TYPE_NAMES: dict[str, str] = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "object": "an object",
    "array": "an array",
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class RetryPolicy(_Model):
    attempts: int = Field(default=1, ge=1, le=100)
    backoff: Duration = 1.0
    max_backoff: Duration = 60.0

    @model_validator(mode="after")
    def _backoff_within_max(self) -> RetryPolicy:
        if self.backoff > self.max_backoff:
            raise ValueError("backoff must not exceed max_backoff")
        return self


class ReleaseSpec(_Model):
    function: str = Field(min_length=1)
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")


class LeaseSpec(_Model):
    ttl: Annotated[Duration, Field(gt=0, le=MAX_LEASE_TTL)]
    release: ReleaseSpec

    @field_validator("release", mode="before")
    @classmethod
    def _function_shorthand(cls, value: Any) -> Any:
        # ``release: postgres.thaw`` is the common case: a function with no extra params.
        return {"function": value} if isinstance(value, str) else value


class StepSpec(_Model):
    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,62}$")
    function: str = Field(min_length=1)
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")
    needs: list[str] = Field(default_factory=list)
    timeout: Annotated[Duration, Field(gt=0)] = 60.0
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    on_error: Literal["fail", "continue"] = "fail"
    when: Literal["on_success", "on_failure", "always"] = "on_success"
    lease: LeaseSpec | None = None

    @property
    def final(self) -> bool:
        """A finalizer: runs after the main steps, whatever ``when`` selects."""
        return self.when != "on_success"


def _type_matches(kind: ParamType, value: Any) -> bool:
    """Whether ``value`` (JSON-like) is of the declared param type. ``True`` is no integer."""
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind == "integer":
        return isinstance(value, int)
    if kind == "number":
        return isinstance(value, int | float)
    return isinstance(value, dict if kind == "object" else list)


class ParamSpec(_Model):
    type: ParamType = "string"
    default: Any = None
    required: bool = False
    description: str = ""
    enum: list[Any] | None = Field(default=None, min_length=1)
    secret: bool = False  # values are registered with the redactor when resolved

    @field_validator("default")
    @classmethod
    def _default_has_type(cls, value: Any, info: ValidationInfo) -> Any:
        kind = info.data.get("type")
        if value is not None and kind is not None and not _type_matches(kind, value):
            raise ValueError(f"default must be {_TYPE_NAMES[kind]}")
        return value

    @field_validator("enum")
    @classmethod
    def _enum_has_type(cls, value: list[Any] | None, info: ValidationInfo) -> list[Any] | None:
        kind, default = info.data.get("type"), info.data.get("default")
        if value is not None and kind is not None:
            if not all(_type_matches(kind, item) for item in value):
                raise ValueError(f"every enum value must be {_TYPE_NAMES[kind]}")
            if default is not None and default not in value:
                raise ValueError("default must be one of the enum values")
        return value

    def problem(self, name: str, value: Any) -> str | None:
        """Why ``value`` is not acceptable for param ``name``; never quotes the value."""
        if not _type_matches(self.type, value):
            return f"param {name!r} must be {_TYPE_NAMES[self.type]}, got {type(value).__name__}"
        if self.enum is not None and value not in self.enum:
            return f"param {name!r} must be one of {self.enum}"
        return None


class Metadata(_Model):
    name: str = Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


def _unique_step_names(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    steps: list[StepSpec] = handler(value)
    first: dict[str, int] = {}
    for index, step in enumerate(steps):
        if step.name in first:
            # Raised as a ValidationError so pydantic keeps the location of the duplicate.
            message = "duplicate step name '{name}' (also step {first})"
            context = {"name": step.name, "first": first[step.name]}
            error = PydanticCustomError("duplicate_step", message, context)
            raise ValidationError.from_exception_data(
                "Action", [{"type": error, "loc": (index, "name"), "input": step.name}]
            )
        first[step.name] = index
    return steps


Action = Annotated[list[StepSpec], Field(min_length=1), WrapValidator(_unique_step_names)]
# Params are read as ``params.<name>`` in templates, so names must be identifiers.
ParamName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class BlueprintSpec(_Model):
    params: dict[ParamName, ParamSpec] = Field(default_factory=dict)
    actions: dict[Phase, Action] = Field(min_length=1)


class Blueprint(_Model):
    api_version: Literal["snaphook.io/v1"] = Field(alias="apiVersion")
    kind: Literal["Blueprint"]
    metadata: Metadata
    spec: BlueprintSpec
    # Not part of the YAML schema: the loader passes it through the validation context.
    _source: str = PrivateAttr(default="<memory>")

    @model_validator(mode="after")
    def _remember_source(self, info: ValidationInfo) -> Blueprint:
        source = info.context.get("source") if isinstance(info.context, Mapping) else None
        if isinstance(source, str):
            self._source = source
        return self

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def source(self) -> str:
        """The file this blueprint was loaded from, ``<memory>`` if built in code."""
        return self._source

    def phases(self) -> list[Phase]:
        return list(self.spec.actions)

    def steps(self, phase: Phase) -> list[StepSpec]:
        """The steps of ``phase`` in file order; ``[]`` when the blueprint has no such action."""
        return list(self.spec.actions.get(phase, []))

    def release_functions(self) -> dict[str, str]:
        """Step name → the release function of the lease it takes, across all actions."""
        return {
            step.name: step.lease.release.function
            for phase in self.phases()
            for step in self.steps(phase)
            if step.lease is not None
        }

    def lease_steps(self) -> frozenset[str]:
        """Names of steps (in any action) that take a lease: what ``leases.<name>`` may name."""
        return frozenset(
            step.name for steps in self.spec.actions.values() for step in steps if step.lease
        )

    def resolve_params(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Event params checked against the declared ones, defaults applied; undeclared
        optional params without a default resolve to ``None``. Raises ``ValueError`` listing
        every problem."""
        declared = self.spec.params
        problems: list[str] = []
        unknown = sorted(set(given) - set(declared))
        if unknown:
            problems.append(f"unknown params: {', '.join(unknown)}")
        resolved: dict[str, Any] = {}
        for name, spec in declared.items():
            value = given.get(name)  # an explicit null means "not given"
            if value is None:
                if spec.required and spec.default is None:
                    problems.append(f"missing required param {name!r}")
                resolved[name] = copy.deepcopy(spec.default)  # never share the model's object
                continue
            problem = spec.problem(name, value)
            if problem is not None:
                problems.append(problem)
            elif spec.secret and isinstance(value, str):
                redactor.add(value)
            resolved[name] = value
        if problems:
            raise ValueError("; ".join(problems))
        return resolved


class BlueprintErrors(BlueprintError):
    """Every error found in a set of blueprint files; ``str()`` gives one per line."""

    def __init__(self, errors: list[BlueprintError]) -> None:
        if not errors:
            raise ValueError("BlueprintErrors needs at least one error")
        first = errors[0]
        super().__init__(first.message, file=first.file, line=first.line)
        self.errors = list(errors)

    def __str__(self) -> str:
        return "\n".join(str(error) for error in self.errors)


@dataclass(frozen=True)
class BlueprintSet:
    """The validated blueprints by name; fixed once loaded (a reload builds a new set)."""

    blueprints: Mapping[str, Blueprint] = field(default_factory=dict)

    def get(self, name: str) -> Blueprint | None:
        return self.blueprints.get(name)

    def names(self) -> list[str]:
        return sorted(self.blueprints)

    def __len__(self) -> int:
        return len(self.blueprints)

    def __contains__(self, name: object) -> bool:
        return name in self.blueprints


def load_blueprints(
    path: Path, registry: FunctionRegistry, *, engine: TemplateEngine | None = None
) -> BlueprintSet:
    """The blueprints in ``path`` (a file, or a directory searched recursively for
    ``*.yaml``/``*.yml``). Raises :class:`BlueprintErrors` listing every problem found."""
    blueprints, errors = _load(path, registry, engine)
    if errors:
        raise BlueprintErrors(errors)
    return BlueprintSet(MappingProxyType(blueprints))


def validate_blueprints(
    path: Path, registry: FunctionRegistry, *, engine: TemplateEngine | None = None
) -> list[BlueprintError]:
    """Every problem in the blueprints in ``path``, sorted by file and line; ``[]`` if valid."""
    return _load(path, registry, engine)[1]


def _load(
    path: Path, registry: FunctionRegistry, engine: TemplateEngine | None
) -> tuple[dict[str, Blueprint], list[BlueprintError]]:
    engine = engine or TemplateEngine(EnvSecretResolver())
    loaded: dict[str, tuple[Blueprint, Document]] = {}
    files, errors = _yaml_files(path)
    for file in files:
        documents, read_errors = read_documents(file)
        errors.extend(read_errors)
        for document in documents:
            blueprint = _validate_document(document, errors)
            if blueprint is not None:
                errors.extend(_Checker(blueprint, document, registry, engine).run())
                _add_unique(loaded, blueprint, document, errors)
    blueprints = {name: blueprint for name, (blueprint, _) in loaded.items()}
    return blueprints, sorted(errors, key=lambda error: (error.file, error.line or 0))


def _add_unique(
    loaded: dict[str, tuple[Blueprint, Document]],
    blueprint: Blueprint,
    document: Document,
    errors: list[BlueprintError],
) -> None:
    name_path = ("metadata", "name")
    previous = loaded.get(blueprint.name)
    if previous is None:
        loaded[blueprint.name] = (blueprint, document)
        return
    first = previous[1]
    where = f"{first.file}:{first.line_of(name_path)}"
    errors.append(
        document.error(f"blueprint {blueprint.name!r} is already defined at {where}", name_path)
    )


def _yaml_files(path: Path) -> tuple[list[Path], list[BlueprintError]]:
    if path.is_file():
        return [path], []
    if not path.is_dir():
        return [], [BlueprintError("no such file or directory", file=str(path))]
    files = [
        candidate
        for candidate in path.rglob("*")
        if candidate.suffix in (".yaml", ".yml")
        and candidate.is_file()
        # Kubernetes mounts a ConfigMap with hidden ``..data``/``..<timestamp>`` copies of
        # every file; reading those would define each blueprint twice.
        and not any(part.startswith(".") for part in candidate.relative_to(path).parts)
    ]
    return sorted(files), []


def _validate_document(document: Document, errors: list[BlueprintError]) -> Blueprint | None:
    """The document as a Blueprint; ``None`` if it is invalid (errors appended) or foreign."""
    data = document.data
    if not isinstance(data, dict):
        errors.append(document.error("a document must be a mapping with apiVersion and kind"))
        return None
    api_version = data.get("apiVersion")
    if not isinstance(api_version, str):
        problem = "missing apiVersion" if api_version is None else "apiVersion must be a string"
        errors.append(document.error(problem, ("apiVersion",)))
        return None
    if not api_version.startswith(API_GROUP):
        return None
    kind = data.get("kind")
    if kind == "Config":
        return None  # the dispatcher's own config file (see settings.py) may live beside
    if kind is not None and kind != "Blueprint":
        errors.append(
            document.error(f"unknown kind {kind!r}: expected Blueprint (or Config)", ("kind",))
        )
        return None
    try:
        return Blueprint.model_validate(data, context={"source": document.file})
    except ValidationError as exc:
        errors.extend(document.validation_errors(exc))
        return None


# --- semantic checks: what the schema cannot express --------------------------------------

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
        # templates see the lease record (id, outputs) under the same name.
        self._check_call(label, release.function, release.with_, at, implicit=frozenset({"lease"}))
        scope = dataclasses.replace(scope, names=scope.names | {"lease"})
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
