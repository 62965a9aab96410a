"""What the HTTP handlers share: the services an app was built with."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from dispatcher.blueprints import BlueprintSet
from dispatcher.journal import Journal
from dispatcher.leases import LeaseManager
from dispatcher.limits import Limits
from dispatcher.metrics import Metrics
from dispatcher.replies import ReplySender
from dispatcher.runner import Runner
from dispatcher.service import Dispatcher
from dispatcher.settings import Settings


@dataclass
class AppState:
    settings: Settings
    blueprints: BlueprintSet
    journal: Journal
    runner: Runner
    leases: LeaseManager
    dispatcher: Dispatcher
    metrics: Metrics
    ready: bool = False  # true once recovery is done; false again while draining
    replies: ReplySender | None = None
    limits: Limits = field(default_factory=Limits)  # per-event limits, from the settings
    background: list[asyncio.Task[Any]] = field(default_factory=list)  # reaper, recovery


STATE = web.AppKey("snaphook_state", AppState)
