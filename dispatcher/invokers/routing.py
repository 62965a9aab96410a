"""Where each invocation runs: on a function host, or in this process.

A step's own ``invoke: {url}`` (carried as ``Invocation.remote_url``) wins; otherwise the
``remote_functions`` setting maps function names to hosts: an exact name beats a pattern,
and a longer pattern beats a shorter one (``postgres.dump`` > ``postgres.*`` > ``*``).
Everything else runs in-process. Lease releases go through here too, so a release
function mapped to a host runs there — the host that froze, when it is mapped alike.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from typing import Any

from dispatcher.invokers import Invocation, Invoker

__all__ = ["Routes", "RoutingInvoker"]


class Routes:
    """The ``remote_functions`` setting: function names and patterns → function host URLs."""

    def __init__(self, routes: Mapping[str, str]) -> None:
        self._exact = {name: url for name, url in routes.items() if not _is_pattern(name)}
        # Most specific first: the longest pattern, then alphabetical for a stable order.
        self._patterns = sorted(
            ((p, url) for p, url in routes.items() if _is_pattern(p)),
            key=lambda item: (-len(item[0]), item[0]),
        )

    def url_for(self, function: str) -> str | None:
        """The function host URL for ``function``; None = in-process."""
        if function in self._exact:
            return self._exact[function]
        for pattern, url in self._patterns:
            if fnmatch.fnmatchcase(function, pattern):
                return url
        return None


class RoutingInvoker:
    def __init__(self, local: Invoker, remote: Invoker, routes: Mapping[str, str]) -> None:
        self._local = local
        self._remote = remote
        self._routes = Routes(routes)

    def route(self, function: str) -> str | None:
        """The function host URL for ``function`` from the settings; None = in-process."""
        return self._routes.url_for(function)

    async def invoke(self, invocation: Invocation) -> dict[str, Any]:
        url = invocation.remote_url or self.route(invocation.function)
        if url is None:
            return await self._local.invoke(invocation)
        if url != invocation.remote_url:
            invocation = dataclasses.replace(invocation, remote_url=url)
        return await self._remote.invoke(invocation)


def _is_pattern(name: str) -> bool:
    return any(char in name for char in "*?[")
