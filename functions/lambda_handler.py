"""AWS Lambda entry point for hook functions: set the handler to
``functions.lambda_handler.handler`` (docs/function-host.md).

A shim: the adapter lives in :mod:`dispatcher.lambda_adapter`, which runs functions
exactly as the dispatcher and ``snaphook function serve`` do. This is the only module
under ``functions`` allowed to import the dispatcher (an explicit import-linter exception
in pyproject.toml); no function module may import this one.
"""

from __future__ import annotations

from typing import Any

from dispatcher.lambda_adapter import LambdaAdapter, default_adapter

__all__ = ["handler"]

_adapter: LambdaAdapter | None = None


def handler(event: Any, context: Any) -> dict[str, Any]:
    """Run the invocation ``event`` carries; built on the first call (the cold start)."""
    global _adapter
    if _adapter is None:
        _adapter = default_adapter()
    return _adapter(event, context)
