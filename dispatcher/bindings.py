"""Which blueprint an event's target is bound to.

Resolvers sit behind one :class:`BindingResolver` interface. The config-file resolver is
here; the Kubernetes annotation resolver joins it later. Precedence: the first resolver in
the chain that answers wins; within the config file, the first matching binding wins.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from dispatcher.events import HookEvent
from dispatcher.settings import BindingConfig, BindingMatch, Settings


@dataclass(frozen=True)
class Binding:
    """A resolved binding for one event."""

    blueprint: str
    failure_policy: str = "fail"
    timeout: float = 30.0
    params: dict[str, Any] = field(default_factory=dict)
    origin: str = ""  # where it came from, for messages ("config bindings[2]")


class BindingResolver(Protocol):
    async def resolve(self, event: HookEvent) -> Binding | None: ...


def _matches(match: BindingMatch, event: HookEvent) -> bool:
    target = event.target
    if match.namespace is not None and match.namespace != target.namespace:
        return False
    if match.kind is not None and match.kind.lower() != target.kind.lower():
        return False
    if match.name is not None and match.name != target.name:
        return False
    return all(target.labels.get(k) == v for k, v in match.labels.items())


class ConfigBindingResolver:
    """Static bindings from the config file, first match wins."""

    def __init__(self, bindings: Sequence[BindingConfig]) -> None:
        self._bindings = list(bindings)

    async def resolve(self, event: HookEvent) -> Binding | None:
        for index, config in enumerate(self._bindings):
            if _matches(config.match, event):
                return Binding(
                    blueprint=config.blueprint,
                    failure_policy=config.failure_policy,
                    timeout=config.timeout,
                    params=dict(config.params),
                    origin=f"config bindings[{index}]",
                )
        return None


class ChainResolver:
    """Asks each resolver in turn; the first answer wins."""

    def __init__(self, resolvers: Sequence[BindingResolver]) -> None:
        self._resolvers = list(resolvers)

    async def resolve(self, event: HookEvent) -> Binding | None:
        for resolver in self._resolvers:
            binding = await resolver.resolve(event)
            if binding is not None:
                return binding
        return None


def unknown_bindings(settings: Settings, loaded: Collection[str]) -> list[str]:
    """One message per config binding that names a blueprint not in ``loaded``."""
    where = str(settings.config) if settings.config else "settings"
    return [
        f"{where}: bindings[{index}]: unknown blueprint {binding.blueprint!r}"
        for index, binding in enumerate(settings.bindings)
        if binding.blueprint not in loaded
    ]
