"""``notify.log``: write a message to the dispatcher's structured log.

Other ``notify.*`` functions (webhook, slack, email, sns) live beside it as they land.
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from functions.sdk import Context, function

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


class LogParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str = Field(min_length=1, max_length=10_000)
    level: Literal["debug", "info", "warning"] = "info"


class LogResult(BaseModel):
    message: str


@function("notify.log")
async def log(ctx: Context, p: LogParams) -> LogResult:
    """Log ``message`` at ``level``; the message is also kept as the step's output."""
    ctx.logger.log(_LEVELS[p.level], p.message, extra={"notify": True})
    return LogResult(message=p.message)
