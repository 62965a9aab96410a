"""A small, protocol-faithful Kubernetes API server: TokenReview only.

``POST /apis/authentication.k8s.io/v1/tokenreviews`` behaves as the real API server does:

* the caller must itself authenticate (``Authorization: Bearer``) — 401 ``Status`` if not —
  and be allowed to create tokenreviews (RBAC) — 403 ``Status`` if not;
* the body must be an ``authentication.k8s.io/v1`` ``TokenReview`` with ``spec.token`` —
  400 ``Status`` otherwise;
* the answer is ``201 Created`` with the TokenReview, ``spec`` echoed and ``status`` filled:
  ``authenticated``, ``user`` (``username``, ``uid``, ``groups``) and ``audiences`` for a
  known token valid for the requested audiences (the API server's own when none are
  requested); ``user: {}`` and an ``error`` for anything else.

Tests drive it through kubernetes_asyncio, as snaphook does, and read ``reviews`` to see
how many reviews reached it.
"""

from __future__ import annotations

import json
import secrets
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
API_AUDIENCES = ("https://kubernetes.default.svc.cluster.local",)


@dataclass(frozen=True)
class Identity:
    username: str
    uid: str
    groups: tuple[str, ...]
    audiences: tuple[str, ...]


@dataclass
class FakeKubeAPI:
    # The token snaphook's own service account presents, and whether RBAC lets it review.
    reviewer_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    reviewer_may_review: bool = True
    tokens: dict[str, Identity] = field(default_factory=dict)
    reviews: list[dict[str, Any]] = field(default_factory=list)  # request bodies received

    def service_account_token(
        self, namespace: str, name: str, audiences: tuple[str, ...] = API_AUDIENCES
    ) -> str:
        """Issue a token for ``system:serviceaccount:<namespace>:<name>``."""
        token = secrets.token_urlsafe(32)
        self.tokens[token] = Identity(
            username=f"system:serviceaccount:{namespace}:{name}",
            uid=str(uuid.uuid4()),
            groups=(
                "system:serviceaccounts",
                f"system:serviceaccounts:{namespace}",
                "system:authenticated",
            ),
            audiences=audiences,
        )
        return token

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(PATH, self._create)
        return app

    def kubeconfig(self, path: Path, server: str) -> Path:
        """A kubeconfig that reaches this server as the reviewer."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": server}}],
            "users": [{"name": "snaphook", "user": {"token": self.reviewer_token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "snaphook"}}],
            "current-context": "fake",
        }
        path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
        return path

    async def _create(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.reviewer_token}":
            return _status(401, "Unauthorized", "Unauthorized")
        if not self.reviewer_may_review:
            return _status(
                403,
                "Forbidden",
                'tokenreviews.authentication.k8s.io is forbidden: User "system:serviceaccount:'
                'snaphook:snaphook" cannot create resource "tokenreviews" in API group '
                '"authentication.k8s.io" at the cluster scope',
            )
        try:
            body = await request.json()
        except ValueError:
            return _status(400, "BadRequest", "the body is not JSON")
        problem = _invalid(body)
        if problem is not None:
            return _status(*problem)
        self.reviews.append(body)
        spec = body["spec"]
        answer = {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": self._status_of(spec["token"], spec.get("audiences") or []),
        }
        return web.json_response(answer, status=201)

    def _status_of(self, token: str, requested: list[str]) -> dict[str, Any]:
        identity = self.tokens.get(token)
        if identity is None:
            return {"user": {}, "error": "[invalid bearer token, token lookup failed]"}
        wanted = requested or list(API_AUDIENCES)
        granted = [a for a in wanted if a in identity.audiences]
        if not granted:
            return {"user": {}, "error": "[invalid bearer token, token audiences is invalid]"}
        return {
            "authenticated": True,
            "user": {
                "username": identity.username,
                "uid": identity.uid,
                "groups": list(identity.groups),
            },
            "audiences": granted,
        }


def _invalid(body: Any) -> tuple[int, str, str] | None:
    """(code, reason, message) of the Status for a body the API server would refuse."""
    if not isinstance(body, dict) or (body.get("apiVersion"), body.get("kind")) != (
        "authentication.k8s.io/v1",
        "TokenReview",
    ):
        return 400, "BadRequest", "the object is not an authentication.k8s.io/v1 TokenReview"
    spec = body.get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("token"), str):
        return 422, "Invalid", "TokenReview.authentication.k8s.io is invalid: spec.token"
    audiences = spec.get("audiences")
    if audiences is not None and not (
        isinstance(audiences, list) and all(isinstance(a, str) for a in audiences)
    ):
        return 422, "Invalid", "TokenReview.authentication.k8s.io is invalid: spec.audiences"
    return None


def _status(code: int, reason: str, message: str) -> web.Response:
    """A ``metav1.Status`` failure, as the API server answers errors."""
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return web.json_response(body, status=code)
