"""How a step's function gets called: in this process, or on a function host over HTTP.

Every invoker has the same contract: given an :class:`Invocation`, return the function's
outputs as JSON-ready data with secrets masked, or raise a ``functions.sdk.FunctionError``
(``PermanentError`` when retrying cannot help). Timeouts are the runner's business.

    inprocess.InProcessInvoker   runs the registered function here
    remote.RemoteInvoker         POSTs an ``io.snaphook.function.invoke`` CloudEvent
    routing.RoutingInvoker       picks one of the two per invocation
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from functions.sdk import EventInfo

__all__ = ["Invocation", "Invoker", "check_remote_url"]

MAX_URL_LENGTH = 2048


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
    # A function host to run it on (the step's ``invoke.url``); None = let routing decide.
    remote_url: str | None = None

    @property
    def invocation_id(self) -> str:
        """Stable per (run, step, attempt): a remote side deduplicates by it."""
        return f"{self.run_id}/{self.step}/{self.attempt}"


class Invoker(Protocol):
    async def invoke(self, invocation: Invocation) -> dict[str, Any]: ...


def check_remote_url(url: str) -> str | None:
    """What is wrong with ``url`` as a function host address, or None if nothing is."""
    if len(url) > MAX_URL_LENGTH:
        return f"URL is longer than {MAX_URL_LENGTH} characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError as exc:
        return f"not a valid URL: {exc}"
    if parts.scheme not in ("http", "https"):
        return "URL must start with http:// or https://"
    if not parts.hostname:
        return "URL must name a host"
    if parts.username is not None or parts.password is not None:
        # It would be logged and shown wherever the URL is; the token has its own setting.
        return "URL must not carry credentials (use the remote_token setting)"
    if parts.fragment:
        return "URL must not have a #fragment"
    return None
