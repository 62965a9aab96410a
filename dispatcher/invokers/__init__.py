"""How a step's function gets called: in this process now, remotely later.

Every invoker has the same contract: given an :class:`Invocation`, return the function's
outputs as JSON-ready data with secrets masked, or raise a ``functions.sdk.FunctionError``
(``PermanentError`` when retrying cannot help). Timeouts are the runner's business.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from functions.sdk import EventInfo

__all__ = ["Invocation", "Invoker"]


@dataclass(frozen=True)
class Invocation:
    function: str
    params: dict[str, Any]  # rendered; may hold secret values, never stored
    event: EventInfo
    run_id: str
    step: str
    attempt: int
    timeout: float
    outputs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    lease_id: str | None = None

    @property
    def invocation_id(self) -> str:
        """Stable per (run, step, attempt): a remote side deduplicates by it."""
        return f"{self.run_id}/{self.step}/{self.attempt}"


class Invoker(Protocol):
    async def invoke(self, invocation: Invocation) -> dict[str, Any]: ...
