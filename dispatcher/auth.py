"""Ingress authentication (who is calling) and authorization (may it send this event).

A request proves a principal (see :mod:`dispatcher.principals`) with any of:

* ``Authorization: Bearer <token>`` — the token's SHA-256 against the principals'
  ``bearer_sha256`` (constant time); failing that, a Kubernetes TokenReview when enabled,
  mapping ``system:serviceaccount:<ns>:<name>`` to a principal;
* a Standard Webhooks signature (``webhook-id/-timestamp/-signature``) with one of the
  principals' ``webhook_secrets``, fresh and not replayed (:mod:`dispatcher.signatures`);
* a verified TLS client certificate whose CN or SAN is in ``client_cert_subjects``.

Every credential presented must be valid, and all of them must name the same principal.
No valid credential where one is needed → ``401`` for the whole request (with
``WWW-Authenticate: Bearer``); a principal sending an event whose source or target it may
not use → ``403`` for that event. Events are authorized before anything is journaled.
Failures are logged by reason category, never with the credential.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from ssl import SSLContext

from aiohttp import web

from dispatcher.errors import EventError
from dispatcher.events import HookEvent
from dispatcher.principals import WHSEC_PREFIX, AuthSettings, Principal
from dispatcher.redaction import redactor
from dispatcher.signatures import HEADERS, ReplayCache, SignatureError, Signed, sign, verify
from dispatcher.tls import client_context, peer_names
from dispatcher.tokenreview import TokenReviewer, TokenReviewUnavailable

log = logging.getLogger("snaphook.auth")

CHALLENGE = 'Bearer realm="snaphook"'
# RFC 6750 b64token: what a bearer token (random string or JWT) can consist of.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# The read API; everything else there (health, readiness, metrics) stays open for probes.
PROTECTED_RESOURCES = frozenset({"/v1/runs", "/v1/runs/{run_id}"})


@dataclass(frozen=True)
class Caller:
    """The outcome of authentication: a principal, or anonymous (when that is allowed)."""

    principal: Principal | None
    via: tuple[str, ...]  # the schemes that identified it, for logs
    policy: AuthSettings
    remote: str | None = None

    @property
    def name(self) -> str | None:
        return self.principal.name if self.principal is not None else None

    def authorize(self, event: HookEvent) -> None:
        """Raise 401/403 unless this caller may send ``event``."""
        principal = self.principal
        if principal is None:
            # Migration mode (required: false): a source some principal owns needs its
            # credentials; anonymous callers keep the sources nobody claims.
            if self.policy.claims(event.source):
                self._refused("source_needs_credentials", event)
                raise _unauthorized(f"events with source {event.source[:100]!r} need credentials")
            return
        if not principal.allows_source(event.source):
            self._refused("source_not_allowed", event)
            raise EventError(
                403,
                "Forbidden",
                f"principal {principal.name!r} may not send events with source "
                f"{event.source[:100]!r}",
                field="source",
            )
        if not principal.allows_target(event.target.namespace, event.subject):
            self._refused("target_not_allowed", event)
            raise EventError(
                403,
                "Forbidden",
                f"principal {principal.name!r} may not send events for {event.subject!r}",
                field="subject",
            )

    def _refused(self, reason: str, event: HookEvent) -> None:
        log.warning(
            "event refused",
            extra={
                "reason": reason,
                "principal": self.name,
                "source": event.source[:200],
                "subject": event.subject,
                "remote": self.remote,
            },
        )


def _unauthorized(detail: str, *, invalid_token: bool = False) -> EventError:
    challenge = CHALLENGE + (', error="invalid_token"' if invalid_token else "")
    return EventError(401, "Unauthorized", detail, headers={"WWW-Authenticate": challenge})


class Refused(Exception):
    """Internal: authentication failed for ``reason`` (a log category)."""

    def __init__(self, reason: str, error: EventError) -> None:
        super().__init__(error.detail)
        self.reason = reason
        self.error = error


class Gate:
    """Authenticates requests against the ``auth:`` settings of one app."""

    def __init__(self, settings: AuthSettings, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.reviewer: TokenReviewer | None = None  # connected by the app's lifecycle
        self._clock = clock
        self._replays = ReplayCache(settings.webhook_tolerance, settings.replay_cache_size)
        self._token_hashes = [
            (p, bytes.fromhex(h)) for p in settings.principals for h in p.bearer_sha256
        ]
        self._webhook_keys = [(p, key) for p in settings.principals for key in p.webhook_keys()]
        self._by_cert = {n: p for p in settings.principals for n in p.client_cert_subjects}
        self._by_account = {
            a: p for p in settings.principals for a in p.kubernetes_service_accounts
        }

    @property
    def active(self) -> bool:
        return self.settings.configured

    def require_credentials(self, request: web.Request) -> None:
        """401 at once when credentials are required and none came: the body is not read."""
        if not (self.active and self.settings.enforced):
            return
        if "Authorization" in request.headers or any(h in request.headers for h in HEADERS):
            return
        if peer_names(request.get_extra_info("peercert")):
            return
        self._log_refusal(request, "no_credentials")
        raise _unauthorized(_CREDENTIALS_REQUIRED)

    async def authenticate(self, request: web.Request, body: bytes) -> Caller:
        """The caller of ``request``; 401 (or 503 when Kubernetes cannot tell) otherwise."""
        if not self.active:
            return Caller(None, (), self.settings)
        try:
            return await self._authenticate(request, body)
        except Refused as refused:
            self._log_refusal(request, refused.reason)
            raise refused.error from None

    async def _authenticate(self, request: web.Request, body: bytes) -> Caller:
        found: dict[str, Principal] = {}
        signed = self._signature(request, body)
        if signed is not None:
            found["signature"] = signed.owner
        cert = self._certificate(request)
        if cert is not None:
            found["client-cert"] = cert
        token = _bearer_token(request)
        if token is not None:
            scheme, principal = await self._token(token)
            found[scheme] = principal
        if len({p.name for p in found.values()}) > 1:
            raise Refused(
                "principal_mismatch",
                _unauthorized("the credentials presented identify different principals"),
            )
        if not found:
            if self.settings.enforced:
                raise Refused("no_credentials", _unauthorized(_CREDENTIALS_REQUIRED))
            return Caller(None, (), self.settings, request.remote)
        # Last, so that a request refused for another reason does not use up its id.
        if signed is not None and not self._replays.claim(
            (signed.owner.name, signed.msg_id, signed.timestamp)
        ):
            raise Refused(
                "replayed",
                _unauthorized("this webhook-id and webhook-timestamp were already used (replay)"),
            )
        principal = next(iter(found.values()))
        caller = Caller(principal, tuple(sorted(found)), self.settings, request.remote)
        log.debug("authenticated", extra={"principal": caller.name, "via": caller.via})
        return caller

    def _signature(self, request: web.Request, body: bytes) -> Signed[Principal] | None:
        values = [request.headers.getall(h, []) for h in HEADERS]
        if not any(values):
            return None
        if any(len(v) != 1 for v in values):
            raise Refused(
                "malformed_signature",
                _unauthorized(
                    "a signed request needs exactly one webhook-id, "
                    "webhook-timestamp and webhook-signature header"
                ),
            )
        msg_id, timestamp, signatures = (v[0] for v in values)
        try:
            signed = verify(
                msg_id,
                timestamp,
                signatures,
                body,
                self._webhook_keys,
                tolerance=self.settings.webhook_tolerance,
                now=self._clock(),
            )
        except SignatureError as exc:
            raise Refused(exc.reason, _unauthorized(exc.detail)) from None
        return signed

    def _certificate(self, request: web.Request) -> Principal | None:
        # Present only when the TLS layer verified the chain against the client CA. A
        # certificate that names no principal is not an error: it may only vouch for the
        # connection, and a token or signature then names the principal.
        for name in peer_names(request.get_extra_info("peercert")):
            if name in self._by_cert:
                return self._by_cert[name]
        return None

    async def _token(self, token: str) -> tuple[str, Principal]:
        digest = hashlib.sha256(token.encode()).digest()
        match: Principal | None = None
        for principal, stored in self._token_hashes:
            # No early exit: the time taken does not depend on which hash matched.
            if hmac.compare_digest(stored, digest):
                match = principal
        if match is not None:
            return "bearer", match
        if self.reviewer is None:
            raise Refused("invalid_token", _unauthorized(_INVALID_TOKEN, invalid_token=True))
        return "tokenreview", await self._review(self.reviewer, token)

    async def _review(self, reviewer: TokenReviewer, token: str) -> Principal:
        try:
            review = await reviewer.review(token)
        except TokenReviewUnavailable as exc:
            # Not the caller's fault, and its token may be fine: retryable, never 401.
            raise Refused(
                "tokenreview_unavailable",
                EventError(
                    503,
                    "Authentication unavailable",
                    f"the token could not be reviewed: {exc}; retry later",
                    headers={"Retry-After": "5"},
                ),
            ) from None
        if not review.authenticated or review.user is None:
            raise Refused("invalid_token", _unauthorized(_INVALID_TOKEN, invalid_token=True))
        principal = self._by_account.get(review.user)
        if principal is None:
            raise Refused(
                "unmapped_account",
                _unauthorized(
                    f"the token is valid for Kubernetes user {review.user[:200]!r}, "
                    "which is not mapped to any principal",
                    invalid_token=True,
                ),
            )
        return principal

    def _log_refusal(self, request: web.Request, reason: str) -> None:
        log.warning(
            "authentication failed",
            extra={
                "reason": reason,
                "remote": request.remote,
                "path": request.path,
                # Binary mode names the source in a header; other modes are not parsed
                # for callers that failed to authenticate.
                "source": request.headers.get("ce-source", "")[:200] or None,
            },
        )

    async def kubernetes(self, app: web.Application) -> AsyncIterator[None]:
        """Cleanup context: the TokenReview client lives as long as the app."""
        self.reviewer = await TokenReviewer.connect(self.settings.tokenreview)
        try:
            yield
        finally:
            reviewer, self.reviewer = self.reviewer, None
            await reviewer.close()


_CREDENTIALS_REQUIRED = (
    "credentials are required: Authorization: Bearer <token>, "
    "a Standard Webhooks signature, or a client certificate"
)
_INVALID_TOKEN = "the bearer token is not valid"


def _bearer_token(request: web.Request) -> str | None:
    values = request.headers.getall("Authorization", [])
    if not values:
        return None
    scheme, _, token = values[0].strip().partition(" ")
    if len(values) > 1 or scheme.lower() != "bearer":
        raise Refused(
            "unsupported_scheme",
            _unauthorized("only one Authorization header, of scheme Bearer, is accepted"),
        )
    token = token.strip()
    if not _B64TOKEN.fullmatch(token):
        raise Refused("invalid_token", _unauthorized(_INVALID_TOKEN, invalid_token=True))
    return token


AUTH = web.AppKey("snaphook_auth", Gate)


def install(app: web.Application, settings: AuthSettings) -> None:
    """Give ``app`` its gate, and the read API its protection."""
    gate = Gate(settings)
    app[AUTH] = gate
    for principal in settings.principals:
        for secret in principal.webhook_secrets:
            plain = secret.get_secret_value()
            # The key alone (without the prefix) is as secret as the whole string.
            redactor.add(plain, plain.removeprefix(WHSEC_PREFIX))
    if settings.tokenreview.enabled:
        app.cleanup_ctx.append(gate.kubernetes)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The read API needs a principal when auth is required; events are checked by ingress."""
    gate = request.app[AUTH]
    if gate.active and _resource(request) in PROTECTED_RESOURCES:
        gate.require_credentials(request)
        await gate.authenticate(request, await request.read())
    return await handler(request)


def _resource(request: web.Request) -> str | None:
    # The matched route, not the raw path: "/v1//runs" or percent-escapes cannot dodge it.
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else None


# --- the client side: `snaphook emit` and `snaphook runs` --------------------------------


@dataclass(frozen=True)
class ClientCredentials:
    """How snaphook's own commands authenticate to a dispatcher."""

    token: str | None = None
    webhook_secret: str | None = None
    cert: Path | None = None
    key: Path | None = None
    cacert: Path | None = None

    def __post_init__(self) -> None:
        # A credential echoed in an error message or a log line is masked.
        redactor.add(self.token, self.webhook_secret)

    def headers(self, body: bytes) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.webhook_secret:
            headers.update(sign(self.webhook_secret, body))
        return headers

    def ssl_context(self) -> SSLContext | bool:
        """aiohttp's ``ssl=``: a context when given certificates, else default verification."""
        if self.cert is None and self.cacert is None:
            return True
        return client_context(self.cacert, self.cert, self.key)
