"""Who may call snaphook, and for which sources: the ``auth:`` section of the config file.

A *principal* is a named caller (a backup platform instance, an in-cluster job). It proves
who it is with any of its credentials and may then send events whose CloudEvents ``source``
matches one of its ``sources`` globs (and, optionally, whose target matches its
``namespaces`` / ``subjects`` globs)::

    auth:
      required: true                 # default: true as soon as a principal is configured
      webhook_tolerance: 5m          # Standard Webhooks timestamp tolerance
      principals:
        - name: k10-prod
          sources: ["k10/prod", "k10/prod-*"]
          namespaces: ["shop-*"]     # optional; omitted = any target
          bearer_sha256: [<hex>, <hex>]        # `snaphook auth hash-token`; two = rotation
          webhook_secrets: [whsec_...]         # Standard Webhooks keys, several = rotation
          client_cert_subjects: [k10.backup.svc]   # mTLS: certificate CN or SAN
          kubernetes_service_accounts: [kasten-io:k10-k10]   # via TokenReview
      tokenreview: {enabled: true, cache_ttl: 10s}

Bearer tokens are kept only as SHA-256 hashes; the tokens are random (high entropy), so a
fast hash is enough and a leaked config file does not leak them. Webhook secrets are HMAC
keys and must be kept as they are: they are ``SecretStr`` so no repr or log shows them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections import Counter
from collections.abc import Iterable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from dispatcher.durations import Duration

WHSEC_PREFIX = "whsec_"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
MIN_WEBHOOK_KEY_BYTES = 16  # Standard Webhooks recommends 24-64; below 16 is too weak
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SA_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")


def hash_token(token: str) -> str:
    """The at-rest form of a bearer token: its SHA-256, lower-case hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def webhook_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret; ``ValueError`` (without the value) if bad."""
    if not secret.startswith(WHSEC_PREFIX):
        raise ValueError(f"a webhook secret must start with {WHSEC_PREFIX!r}")
    try:
        key = base64.b64decode(secret.removeprefix(WHSEC_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a webhook secret must be whsec_ followed by base64") from None
    if len(key) < MIN_WEBHOOK_KEY_BYTES:
        raise ValueError(f"a webhook secret must hold at least {MIN_WEBHOOK_KEY_BYTES} bytes")
    return key


def service_account_user(name: str) -> str:
    """``ns:name`` or ``system:serviceaccount:ns:name`` → the Kubernetes user name."""
    namespace, sep, account = name.removeprefix(SERVICE_ACCOUNT_PREFIX).partition(":")
    if not (sep and _SA_NAME.fullmatch(namespace) and _SA_NAME.fullmatch(account)):
        raise ValueError(
            f"service account {name[:100]!r} is not 'namespace:name' "
            "or 'system:serviceaccount:namespace:name'"
        )
    return f"{SERVICE_ACCOUNT_PREFIX}{namespace}:{account}"


class Principal(BaseModel):
    """One caller, its credentials, and what it may send."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=253)
    # CloudEvents ``source`` globs (fnmatch, case-sensitive). Required, so that "may send
    # anything" is always written down as "*"; an empty list makes a read-only principal.
    sources: list[str]
    # Optional target restrictions; None = any. Globs over the target namespace and over
    # the whole subject ``namespace/kind/name``.
    namespaces: list[str] | None = None
    subjects: list[str] | None = None
    bearer_sha256: list[str] = Field(default_factory=list)
    webhook_secrets: list[SecretStr] = Field(default_factory=list)
    client_cert_subjects: list[str] = Field(default_factory=list)
    kubernetes_service_accounts: list[str] = Field(default_factory=list)

    @field_validator("bearer_sha256")
    @classmethod
    def _hex_hashes(cls, hashes: list[str]) -> list[str]:
        normalised = [h.strip().lower() for h in hashes]
        for value in normalised:
            if not _HEX64.fullmatch(value):
                # A raw token pasted here by mistake must not end up in an error message.
                raise ValueError(
                    "each entry must be a SHA-256 hex digest (snaphook auth hash-token)"
                )
        return normalised

    @field_validator("webhook_secrets")
    @classmethod
    def _whsec(cls, secrets: list[SecretStr]) -> list[SecretStr]:
        for secret in secrets:
            webhook_key(secret.get_secret_value())
        return secrets

    @field_validator("kubernetes_service_accounts")
    @classmethod
    def _service_accounts(cls, names: list[str]) -> list[str]:
        return [service_account_user(name) for name in names]

    def allows_source(self, source: str) -> bool:
        return any(fnmatchcase(source, pattern) for pattern in self.sources)

    def allows_target(self, namespace: str, subject: str) -> bool:
        if self.namespaces is not None and not _any_match(namespace, self.namespaces):
            return False
        return self.subjects is None or _any_match(subject, self.subjects)

    def webhook_keys(self) -> list[bytes]:
        return [webhook_key(secret.get_secret_value()) for secret in self.webhook_secrets]


class TokenReviewSettings(BaseModel):
    """Kubernetes TokenReview for bearer tokens that match no static hash."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    # None: the in-cluster service account (the usual case); else a kubeconfig file.
    kubeconfig: Path | None = None
    # spec.audiences of the review; empty = the API server's own audience.
    audiences: list[str] = Field(default_factory=list)
    # Answers (yes and no) are reused this long: one API call per token per TTL, not per event.
    cache_ttl: Duration = 10.0
    cache_size: int = Field(default=10_000, ge=1)
    timeout: Annotated[Duration, Field(gt=0)] = 5.0  # per API call


class AuthSettings(BaseModel):
    """The ``auth:`` settings section. Absent = no authentication (everything open)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # None = true once a principal is configured. ``false`` with principals is the
    # migration mode: credentials are checked when given, and the sources a principal
    # claims need them, but other sources stay open.
    required: bool | None = None
    principals: list[Principal] = Field(default_factory=list)
    webhook_tolerance: Duration = 300.0
    # Webhook ids remembered for replay rejection (per process, in memory).
    replay_cache_size: int = Field(default=100_000, ge=100)
    tokenreview: TokenReviewSettings = Field(default_factory=TokenReviewSettings)

    @property
    def enforced(self) -> bool:
        return self.required if self.required is not None else bool(self.principals)

    @property
    def configured(self) -> bool:
        """Whether any of this is on; if not, the ingress behaves as if auth did not exist."""
        return bool(self.principals) or self.enforced or self.tokenreview.enabled

    @model_validator(mode="after")
    def _consistent(self) -> AuthSettings:
        if self.required and not self.principals:
            raise ValueError("required is true but no principal is configured")
        _unique("principal name", (p.name for p in self.principals))
        _unique("bearer_sha256 entry", (h for p in self.principals for h in p.bearer_sha256))
        _unique(
            "webhook secret",
            (s.get_secret_value() for p in self.principals for s in p.webhook_secrets),
            show=False,
        )
        _unique(
            "client_cert_subjects entry",
            (c for p in self.principals for c in p.client_cert_subjects),
        )
        _unique(
            "kubernetes_service_accounts entry",
            (a for p in self.principals for a in p.kubernetes_service_accounts),
        )
        return self

    def claims(self, source: str) -> bool:
        """Whether some principal owns ``source``, so that anonymous callers may not use it."""
        return any(p.allows_source(source) for p in self.principals)


def _any_match(value: str, patterns: list[str]) -> bool:
    return any(fnmatchcase(value, pattern) for pattern in patterns)


def _unique(what: str, values: Iterable[str], *, show: bool = True) -> None:
    # A credential shared by two principals would make "who is calling" ambiguous.
    repeated = [value for value, count in Counter(values).items() if count > 1]
    if repeated:
        named = f": {repeated[0][:100]!r}" if show else ""
        raise ValueError(f"{what} appears more than once{named}")
