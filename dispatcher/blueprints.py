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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from dispatcher.durations import Duration
from dispatcher.errors import BlueprintError
from dispatcher.events import Phase
from dispatcher.invokers import check_remote_url
from dispatcher.redaction import MASK, redactor

__all__ = [
    "API_VERSION",
    "Blueprint",
    "BlueprintErrors",
    "BlueprintSet",
    "BlueprintSpec",
    "InvokeSpec",
    "LeaseSpec",
    "Metadata",
    "ParamSpec",
    "ReleaseSpec",
    "RetryPolicy",
    "StepSpec",
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


class InvokeSpec(_Model):
    """Where a step's function runs instead of in the dispatcher: a function host
    (``snaphook function serve``, docs/function-host.md). Literal: no templates."""

    url: str

    @field_validator("url")
    @classmethod
    def _host_url(cls, value: str) -> str:
        problem = check_remote_url(value)
        if problem is not None:
            raise ValueError(problem)
        return value


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
    invoke: InvokeSpec | None = None

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

    def masked_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``params`` with the values of ``secret: true`` params masked, for display."""
        declared = self.spec.params
        return {
            name: MASK
            if name in declared and declared[name].secret and value is not None
            else value
            for name, value in params.items()
        }


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
