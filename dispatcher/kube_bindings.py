"""Bindings by annotation: the event's workload, or its Namespace, names the blueprint.

Like Kanister's ``kanister.kasten.io/blueprint``, a team binds its application by annotating
it; the operator needs no config change per application::

    metadata:
      annotations:
        snaphook.io/blueprint: mongodb-kube
        snaphook.io/param.container: mongod     # blueprint params, as strings
        snaphook.io/failure-policy: ignore      # fail (default) | ignore
        snaphook.io/timeout: 45s                # the sync decision's timeout

The subject ``db/StatefulSet/mongo`` is looked up as StatefulSet ``mongo`` in Namespace
``db``. The workload's ``snaphook.io/blueprint`` wins over the Namespace's. Every other
annotation is read from both, the workload's over the Namespace's, except that Namespace
params are ignored when the Namespace names a *different* blueprint than the one chosen
(they were written for that one). Param values are strings, converted to the blueprint's
declared param type (``"3"`` for an integer param, ``"true"`` for a boolean, JSON for objects
and arrays). A subject of kind Namespace (``db/Namespace/db``) reads the Namespace only.

Answers: ``None`` (not bound, 422 from the dispatcher) when neither object names a
blueprint; :class:`EventError` 422 for a kind that is not looked up, an object that does not
exist, or a bad annotation (naming the object and annotation); 503 with ``Retry-After``
when the Kubernetes API cannot answer.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Collection
from dataclasses import replace
from typing import Any

from dispatcher.bindings import Binding, BindingResolver, ChainResolver, ConfigBindingResolver
from dispatcher.blueprints import Blueprint, BlueprintSet
from dispatcher.durations import parse_duration
from dispatcher.errors import EventError
from dispatcher.events import HookEvent, TargetRef
from dispatcher.kube import NAMESPACES, WORKLOADS, KubeAccess, KubeError, Resource
from dispatcher.kube_watch import AnnotationIndex, Annotations
from dispatcher.settings import Settings

BLUEPRINT = "snaphook.io/blueprint"
PARAM_PREFIX = "snaphook.io/param."
FAILURE_POLICY = "snaphook.io/failure-policy"
TIMEOUT = "snaphook.io/timeout"
RETRY_AFTER = "5"

__all__ = ["KubeBindingResolver", "binding_resolver"]
_SHOWN = 80  # characters of an annotation value quoted in an error


class KubeBindingResolver:
    """A :class:`BindingResolver` reading ``snaphook.io/*`` annotations (module docstring)."""

    def __init__(
        self,
        access: KubeAccess,
        *,
        kinds: Collection[str],
        blueprints: Callable[[], BlueprintSet] | None = None,
        ttl: float = 10.0,
        watch: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        def index(resource: Resource) -> AnnotationIndex:
            return AnnotationIndex(access, resource, ttl=ttl, watch=watch, clock=clock)

        self._blueprints = blueprints
        self._namespaces = index(NAMESPACES)
        self._workloads = {
            kind.lower(): index(WORKLOADS[kind.lower()])
            for kind in kinds
            if kind.lower() in WORKLOADS
        }

    def start(self) -> None:
        """Start watching Namespaces and every enabled kind (in the background)."""
        for index in self._indexes():
            index.start()

    async def warm(self) -> None:
        """Start watching and wait until every index holds its first LIST."""
        self.start()
        await asyncio.gather(*(index.wait_synced() for index in self._indexes()))

    async def close(self) -> None:
        await asyncio.gather(*(index.close() for index in self._indexes()))

    def _indexes(self) -> list[AnnotationIndex]:
        return [self._namespaces, *self._workloads.values()]

    async def resolve(self, event: HookEvent) -> Binding | None:
        target = event.target
        workload, namespace = await self._annotations(target)
        return _binding(target, workload, namespace, self._blueprints)

    async def _annotations(self, target: TargetRef) -> tuple[_Object | None, _Object]:
        """The workload's annotations (``None`` for a Namespace subject) and its Namespace's."""
        kind = target.kind.lower()
        if kind == "namespace":
            if target.namespace != target.name:
                raise _unprocessable(
                    f"subject {target.key}: a Namespace is named 'name/Namespace/name'"
                )
            found = await self._lookup(self._namespaces, None, target.name, target)
            return None, _Object(f"Namespace {target.name}", found)
        index = self._workloads.get(kind)
        if index is None:
            kinds = ", ".join([i.resource.kind for i in self._workloads.values()] + ["Namespace"])
            raise _unprocessable(
                f"kind {target.kind!r} is not looked up for snaphook.io annotations "
                f"(kube_binding_kinds: {kinds}); bind {target.key} in the config file"
            )
        where = f"{index.resource.kind} {target.namespace}/{target.name}"
        found_workload, found_namespace = await asyncio.gather(
            self._lookup(index, target.namespace, target.name, target),
            self._lookup(self._namespaces, None, target.namespace, target),
        )
        return _Object(where, found_workload), _Object(
            f"Namespace {target.namespace}", found_namespace
        )

    async def _lookup(
        self, index: AnnotationIndex, namespace: str | None, name: str, target: TargetRef
    ) -> Annotations:
        kind = index.resource.kind
        shown = f"{namespace}/{name}" if namespace else name
        try:
            found = await index.lookup(namespace, name)
        except KubeError as exc:
            raise _unavailable(kind, shown, exc) from None
        if found is None:
            raise _unprocessable(f"{kind} {shown} (subject {target.key}) does not exist")
        return found


class _Object:
    """An object's snaphook annotations and how to name it in messages."""

    def __init__(self, where: str, annotations: Annotations) -> None:
        self.where = where
        self.annotations = annotations

    def get(self, key: str) -> str | None:
        return self.annotations.get(key)

    def params(self) -> dict[str, str]:
        return {
            key.removeprefix(PARAM_PREFIX): value
            for key, value in self.annotations.items()
            if key.startswith(PARAM_PREFIX)
        }

    def problem(self, annotation: str, value: str, why: str) -> EventError:
        shown = value if len(value) <= _SHOWN else value[: _SHOWN - 3] + "..."
        return _unprocessable(f"{self.where}: annotation {annotation}: {shown!r} {why}")


def _binding(
    target: TargetRef,
    workload: _Object | None,
    namespace: _Object,
    blueprints: Callable[[], BlueprintSet] | None,
) -> Binding | None:
    chosen = next((o for o in (workload, namespace) if o is not None and o.get(BLUEPRINT)), None)
    if chosen is None:
        return None
    name = chosen.get(BLUEPRINT) or ""
    layers = [o for o in (namespace, workload) if o is not None]  # later layers win
    params: dict[str, tuple[_Object, str]] = {}
    for layer in layers:
        if layer is namespace and namespace.get(BLUEPRINT) not in (None, name):
            continue  # written for the Namespace's own blueprint, not this one
        params.update({key: (layer, value) for key, value in layer.params().items()})
    blueprint = blueprints().get(name) if blueprints is not None else None
    binding = Binding(
        blueprint=name,
        origin=f"annotation {BLUEPRINT} on {chosen.where}",
        params={key: _param(blueprint, key, *given) for key, given in params.items()},
    )
    policy = _last(layers, FAILURE_POLICY)
    if policy is not None:
        layer, value = policy
        if value not in ("fail", "ignore"):
            raise layer.problem(FAILURE_POLICY, value, "is not 'fail' or 'ignore'")
        binding = replace(binding, failure_policy=value)
    timeout = _last(layers, TIMEOUT)
    if timeout is not None:
        layer, value = timeout
        try:
            seconds = parse_duration(value)
        except ValueError:
            seconds = 0.0
        if seconds <= 0:
            raise layer.problem(TIMEOUT, value, "is not a positive duration (e.g. 30s, 2m)")
        binding = replace(binding, timeout=seconds)
    return binding


def _last(layers: list[_Object], annotation: str) -> tuple[_Object, str] | None:
    found = None
    for layer in layers:
        value = layer.get(annotation)
        if value is not None:
            found = (layer, value.strip())
    return found


def _param(blueprint: Blueprint | None, key: str, layer: _Object, value: str) -> Any:
    """An annotation's string as the value of the blueprint's param ``key``."""
    annotation = PARAM_PREFIX + key
    if blueprint is None:
        return value  # the dispatcher answers "blueprint not loaded"
    spec = blueprint.spec.params.get(key)
    if spec is None:
        declared = ", ".join(sorted(blueprint.spec.params)) or "none"
        raise layer.problem(
            annotation,
            value,
            f"sets a param blueprint {blueprint.metadata.name!r} does not declare "
            f"(params: {declared})",
        )
    if spec.type == "string":
        return value
    try:
        converted = json.loads(value)
    except ValueError:
        converted = value
    problem = spec.problem(key, converted)
    if problem is not None:
        raise layer.problem(annotation, value, f"is not valid: {problem}")
    return converted


def _unprocessable(detail: str) -> EventError:
    return EventError(422, "Invalid binding annotation", detail, field="subject")


def _unavailable(kind: str, shown: str, exc: KubeError) -> EventError:
    if exc.forbidden:
        why = f"snaphook may not get {kind} {shown} ({exc.status} {exc.reason}; see snaphook rbac)"
    elif exc.status is None:
        why = f"cannot read {kind} {shown}: {exc.reason}"
    else:
        why = f"cannot read {kind} {shown}: the API server answered {exc.status} {exc.reason}"
    return EventError(
        503,
        "Kubernetes API unavailable",
        f"{why}; retry later",
        field="subject",
        headers={"Retry-After": RETRY_AFTER},
    )


def binding_resolver(
    settings: Settings,
    access: KubeAccess | None,
    blueprints: Callable[[], BlueprintSet],
) -> BindingResolver:
    """Config bindings, then (with ``kube_bindings``) annotations: the operator's explicit
    bindings in the config file win over what a namespace's owners annotate."""
    config = ConfigBindingResolver(settings.bindings)
    if not settings.kube_bindings or access is None:
        return config
    annotations = KubeBindingResolver(
        access,
        kinds=settings.kube_binding_kinds,
        blueprints=blueprints,
        ttl=settings.kube_cache_ttl,
        watch=settings.kube_watch,
    )
    access.on_close(annotations.close)
    annotations.start()  # called in the running loop (the app's startup)
    return ChainResolver([config, annotations])
