"""The small SDK hook functions are written with.

A hook function is an ``async def`` taking a :class:`Context` and a pydantic model of its
parameters, returning a pydantic model (or ``None``) that becomes the step's outputs::

    class Params(BaseModel):
        seconds: float = 1.0

    @function("sleep")
    async def sleep(ctx: Context, p: Params) -> None: ...

Errors a function raises steer the runner's policy:

    FunctionError            any failure; retried while attempts remain
    ├── RetryableError       explicitly transient (optional ``delay`` hint)
    └── PermanentError       never retried (bad input, refused by the peer)

This module is the only thing function modules import from snaphook; it must never import
the dispatcher.
"""

from __future__ import annotations

import inspect
import logging
import time
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from pydantic import BaseModel, SecretStr

__all__ = [
    "AwsConfig",
    "Context",
    "EventInfo",
    "FunctionError",
    "FunctionRegistry",
    "FunctionSpec",
    "KubeConfig",
    "KubeRule",
    "ObjectStore",
    "PermanentError",
    "RetryableError",
    "SecretResolver",
    "default_registry",
    "function",
]


class FunctionError(Exception):
    """A hook function failed; the runner retries it while attempts remain."""


class RetryableError(FunctionError):
    """A transient failure. ``delay`` (seconds) overrides the computed backoff once."""

    def __init__(self, message: str, *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class PermanentError(FunctionError):
    """A failure that retrying cannot fix (bad parameters, refused request)."""


FunctionImpl = Callable[["Context", Any], Awaitable[BaseModel | None]]
_T = typing.TypeVar("_T")


@dataclass(frozen=True)
class KubeRule:
    """One Kubernetes RBAC rule a function needs (a ``PolicyRule``: groups, resources,
    verbs). The Helm chart and ``snaphook rbac`` build least-privilege Roles from these."""

    api_groups: tuple[str, ...]
    resources: tuple[str, ...]
    verbs: tuple[str, ...]


@dataclass(frozen=True)
class FunctionSpec:
    """A registered hook function, normalised once at registration."""

    name: str
    fn: FunctionImpl
    params_model: type[BaseModel]
    result_model: type[BaseModel] | None
    description: str = ""
    rbac: tuple[KubeRule, ...] = ()  # Kubernetes permissions it needs, if it calls the API


class FunctionRegistry:
    """Name → :class:`FunctionSpec`. Registration validates; lookups are plain dict reads."""

    def __init__(self) -> None:
        self._specs: dict[str, FunctionSpec] = {}

    def register(self, spec: FunctionSpec) -> None:
        if spec.name in self._specs:
            raise ValueError(f"function {spec.name!r} is already registered")
        self._specs[spec.name] = spec

    def get(self, name: str) -> FunctionSpec | None:
        return self._specs.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def names(self) -> list[str]:
        return sorted(self._specs)

    def merged(self, other: FunctionRegistry) -> FunctionRegistry:
        """A new registry holding both sets; a name present in both is an error."""
        result = FunctionRegistry()
        for spec in [*self._specs.values(), *other._specs.values()]:
            result.register(spec)
        return result


default_registry = FunctionRegistry()


def _models_of(fn: Callable[..., Any], name: str) -> tuple[type[BaseModel], type[BaseModel] | None]:
    hints = typing.get_type_hints(fn)
    params = list(inspect.signature(fn).parameters)
    if len(params) != 2:
        raise TypeError(f"function {name!r} must take (ctx, params), got {len(params)} arguments")
    params_model = hints.get(params[1])
    if not (isinstance(params_model, type) and issubclass(params_model, BaseModel)):
        raise TypeError(f"function {name!r}: parameter {params[1]!r} must be a pydantic model")
    result = hints.get("return")
    # ``-> Model | None``: a model, or nothing, as the docstring allows.
    options = [a for a in typing.get_args(result) if a is not type(None)]
    if len(options) == 1 and type(None) in typing.get_args(result):
        result = options[0]
    if result is type(None) or result is None:
        return params_model, None
    if not (isinstance(result, type) and issubclass(result, BaseModel)):
        raise TypeError(f"function {name!r} must return a pydantic model or None")
    return params_model, result


def function(
    name: str,
    *,
    registry: FunctionRegistry | None = None,
    rbac: typing.Iterable[KubeRule] = (),
) -> Callable[[FunctionImpl], FunctionImpl]:
    """Register an async hook function under ``name`` (``family.action``); ``rbac`` lists
    the Kubernetes permissions it needs (namespaced, in the target's namespace)."""

    def decorate(fn: FunctionImpl) -> FunctionImpl:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"function {name!r} must be declared with 'async def'")
        params_model, result_model = _models_of(fn, name)
        spec = FunctionSpec(
            name=name,
            fn=fn,
            params_model=params_model,
            result_model=result_model,
            description=inspect.getdoc(fn) or "",
            rbac=tuple(rbac),
        )
        (registry if registry is not None else default_registry).register(spec)
        return fn

    return decorate


class SecretResolver(Protocol):
    """Where ``secret(name, key)`` values come from (environment, Kubernetes, ...)."""

    async def get(self, name: str, key: str, *, namespace: str | None = None) -> SecretStr: ...


@dataclass(frozen=True)
class EventInfo:
    """The CloudEvent that started the run, as a function sees it."""

    id: str
    source: str
    type: str
    subject: str
    data: Mapping[str, Any]
    extensions: Mapping[str, str] = field(default_factory=dict)


ProgressCallback = Callable[[int, int | None], None]


@dataclass(frozen=True)
class ObjectStore:
    """Where ``s3://`` URLs point: AWS by default, or any S3-compatible endpoint.

    Credentials come from the usual AWS sources (environment, profile, instance role).
    """

    endpoint_url: str | None = None
    region: str = "us-east-1"


@dataclass(frozen=True)
class AwsConfig:
    """Where AWS API calls other than S3 go (Route53, ELBv2, RDS, SNS, ...): AWS itself by
    default, or one endpoint serving them all (LocalStack, moto in tests)."""

    endpoint_url: str | None = None
    region: str = "us-east-1"


@dataclass(frozen=True)
class KubeConfig:
    """How kube.* functions reach the Kubernetes API: the pod's service account when
    ``kubeconfig`` is unset (in-cluster), else that kubeconfig file (and ``context``)."""

    kubeconfig: str | None = None
    context: str | None = None


class _HeldResources:
    """Objects a lease keeps alive in this process (e.g. the connection holding FTWRL)."""

    def __init__(self) -> None:
        self._items: dict[str, Any] = {}

    def put(self, lease_id: str, resource: Any) -> None:
        self._items[lease_id] = resource

    def pop(self, lease_id: str) -> Any | None:
        return self._items.pop(lease_id, None)


held_resources = _HeldResources()


@dataclass
class Context:
    """Everything a hook function may use; built by the invoker for each attempt."""

    event: EventInfo
    run_id: str
    step: str
    attempt: int
    deadline: float  # time.monotonic() value after which the step times out
    http: aiohttp.ClientSession
    secrets: SecretResolver
    logger: logging.LoggerAdapter[logging.Logger]
    outputs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    lease_id: str | None = None
    on_progress: ProgressCallback | None = None
    object_store: ObjectStore = field(default_factory=ObjectStore)
    aws: AwsConfig = field(default_factory=AwsConfig)
    kube: KubeConfig = field(default_factory=KubeConfig)

    def remaining(self) -> float:
        """Seconds left before the step's timeout."""
        return max(0.0, self.deadline - time.monotonic())

    def progress(self, done: int, total: int | None = None) -> None:
        if self.on_progress is not None:
            self.on_progress(done, total)

    def hold(self, resource: Any) -> None:
        """Keep ``resource`` alive until this step's lease is released (session-bound locks)."""
        if self.lease_id is None:
            raise PermanentError(f"step {self.step!r} holds a resource but declares no lease")
        held_resources.put(self.lease_id, resource)

    def release_held(self, lease_id: str) -> Any | None:
        """Take back what the freeze step of ``lease_id`` held in this process, if any."""
        return held_resources.pop(lease_id)

    def release_held_as(self, lease_id: str | None, kind: type[_T]) -> _T | None:
        """Like :meth:`release_held` (it is taken back either way), typed: ``None`` unless
        what was held is a ``kind``."""
        if not lease_id:
            return None
        held = held_resources.pop(lease_id)
        return held if isinstance(held, kind) else None
