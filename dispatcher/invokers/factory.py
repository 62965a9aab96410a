"""Build invokers from settings: one recipe for the dispatcher, the function host and the
Lambda adapter, so a function sees the same Context wherever it runs."""

from __future__ import annotations

import aiohttp

from dispatcher.invokers.inprocess import InProcessInvoker
from dispatcher.settings import Settings
from functions.httpguard import HttpPolicy, guarded_session
from functions.sdk import AwsConfig, FunctionRegistry, KubeConfig, ObjectStore, SecretResolver

__all__ = ["function_session", "inprocess_invoker"]


def function_session(settings: Settings) -> aiohttp.ClientSession:
    """``ctx.http``: outbound HTTP of hook functions under the SSRF guard. Call in a loop."""
    return guarded_session(
        HttpPolicy(
            allow_private=settings.http_allow_private,
            allow_loopback=settings.http_allow_loopback,
            timeout=settings.http_timeout,
            max_response_bytes=settings.http_max_response_bytes,
        )
    )


def inprocess_invoker(
    settings: Settings,
    registry: FunctionRegistry,
    secrets: SecretResolver,
    http: aiohttp.ClientSession,
) -> InProcessInvoker:
    store = ObjectStore(endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
    aws = AwsConfig(endpoint_url=settings.aws_endpoint_url, region=settings.aws_region)
    kube = KubeConfig(
        kubeconfig=str(settings.kubeconfig) if settings.kubeconfig else None,
        context=settings.kube_context,
    )
    return InProcessInvoker(registry, http, secrets, store, aws, kube)
