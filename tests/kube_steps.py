"""Calling kube.* functions the way the dispatcher does (InProcessInvoker), against the fake
API server, with the event subject, run, step, attempt and lease of a test's choosing."""

from __future__ import annotations

import uuid
from typing import Any

import aiohttp

from dispatcher.app import load_functions
from dispatcher.invokers import Invocation
from dispatcher.invokers.inprocess import InProcessInvoker
from dispatcher.secrets import EnvSecretResolver
from functions.sdk import EventInfo
from tests.kube_fake import RunningCluster


async def call_kube(
    cluster: RunningCluster,
    function: str,
    params: dict[str, Any],
    *,
    subject: str = "ns/Deployment/app",
    event_type: str = "io.snaphook.backup.pre",
    run_id: str | None = None,
    step: str = "step",
    attempt: int = 1,
    lease_id: str | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    invocation = Invocation(
        function=function,
        params=params,
        event=EventInfo(
            id=uuid.uuid4().hex, source="test", type=event_type, subject=subject, data={}
        ),
        run_id=run_id or f"run-{uuid.uuid4().hex[:12]}",
        step=step,
        attempt=attempt,
        timeout=timeout,
        lease_id=lease_id,
    )
    async with aiohttp.ClientSession() as http:
        invoker = InProcessInvoker(
            load_functions([]), http, EnvSecretResolver(), kube=cluster.kube_config
        )
        return await invoker.invoke(invocation)
