"""Kubernetes TokenReview: is this bearer token a live Kubernetes credential, and whose?

In-cluster callers (a backup job, an operator) present their projected service account
token; the API server says whether it is valid and for which user
(``system:serviceaccount:<ns>:<name>``). Answers are cached briefly, keyed by the token's
hash, so a burst of events costs one API call. When the API server cannot answer, that is
:class:`TokenReviewUnavailable` — the caller's token may well be fine, so the request is
answered 503 (retry), never 401.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

from dispatcher.kube import api_client
from dispatcher.principals import TokenReviewSettings

if TYPE_CHECKING:
    # Imported where used otherwise: kubernetes_asyncio takes ~0.4 s to import, which every
    # `snaphook` command would pay although few deployments enable TokenReview.
    from kubernetes_asyncio import client

log = logging.getLogger("snaphook.auth")


class TokenReviewUnavailable(Exception):
    """The API server could not review the token (unreachable, timeout, refused us)."""


@dataclass(frozen=True)
class Review:
    authenticated: bool
    user: str | None = None  # the Kubernetes user name when authenticated


class TokenReviewer:
    def __init__(
        self,
        api: client.ApiClient,
        settings: TokenReviewSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from kubernetes_asyncio import client

        self._api = client.AuthenticationV1Api(api)
        self._client = api
        self._settings = settings
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, Review]] = OrderedDict()

    @classmethod
    async def connect(cls, settings: TokenReviewSettings) -> TokenReviewer:
        """A reviewer using the in-cluster service account, or ``settings.kubeconfig``."""
        return cls(await api_client(settings.kubeconfig, None, what="auth.tokenreview"), settings)

    async def close(self) -> None:
        await self._client.close()

    async def review(self, token: str) -> Review:
        key = hashlib.sha256(token.encode()).hexdigest()  # the token itself is never a key
        cached = self._cached(key)
        if cached is not None:
            return cached
        review = await self._ask(token)
        self._remember(key, review)
        return review

    def _cached(self, key: str) -> Review | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        expires, review = entry
        if expires <= self._clock():
            del self._cache[key]
            return None
        return review

    def _remember(self, key: str, review: Review) -> None:
        self._cache[key] = (self._clock() + self._settings.cache_ttl, review)
        self._cache.move_to_end(key)
        while len(self._cache) > self._settings.cache_size:
            self._cache.popitem(last=False)

    async def _ask(self, token: str) -> Review:
        from kubernetes_asyncio import client

        body = client.V1TokenReview(
            api_version="authentication.k8s.io/v1",
            kind="TokenReview",
            spec=client.V1TokenReviewSpec(
                token=token, audiences=list(self._settings.audiences) or None
            ),
        )
        try:
            answer: Any = await self._api.create_token_review(
                body, _request_timeout=self._settings.timeout
            )
        except client.ApiException as exc:
            # E.g. 403: snaphook's own service account may not create tokenreviews (RBAC).
            log.warning("tokenreview refused", extra={"status": exc.status, "reason": exc.reason})
            raise TokenReviewUnavailable(f"the API server answered {exc.status}") from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.warning("tokenreview failed", extra={"error": type(exc).__name__})
            raise TokenReviewUnavailable("the API server cannot be reached") from None
        return _review_of(answer)


def _review_of(answer: Any) -> Review:
    status = answer.status
    if status is None or not status.authenticated or status.user is None:
        return Review(authenticated=False)
    return Review(authenticated=True, user=status.user.username)
