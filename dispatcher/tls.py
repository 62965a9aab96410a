"""TLS for the dispatcher (``serve --tls-cert/--tls-key [--tls-client-ca]``) and its clients.

With a client CA the server verifies client certificates (mTLS); ``tls_client_cert:
optional`` lets certificate-less clients in — kubelet probes, say — and leaves the
decision to authentication, which can map a certificate's CN or SAN to a principal.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Literal

from dispatcher.errors import ConfigError
from dispatcher.settings import Settings

ClientCertMode = Literal["required", "optional"]

# Subject alternative name types that name a client (IP addresses do not: they move).
_SAN_TYPES = ("DNS", "URI", "email")


def serving_context(settings: Settings) -> ssl.SSLContext | None:
    """The context ``serve`` listens with, or None for plain HTTP."""
    cert, key, client_ca = settings.tls_cert, settings.tls_key, settings.tls_client_ca
    if cert is None and key is None:
        if client_ca is not None:
            raise ConfigError("tls_client_ca needs tls_cert and tls_key (mTLS is TLS first)")
        return None
    if cert is None or key is None:
        raise ConfigError("tls_cert and tls_key must be given together")
    return server_context(cert, key, client_ca, settings.tls_client_cert)


def server_context(
    cert: Path,
    key: Path,
    client_ca: Path | None = None,
    client_cert: ClientCertMode = "required",
) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
        if client_ca is not None:
            context.load_verify_locations(cafile=client_ca)
            required = client_cert == "required"
            context.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS: cannot load certificate, key or client CA: {exc}") from None
    return context


def client_context(
    cacert: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """Verify the server (against ``cacert`` if given), present ``cert`` if given."""
    try:
        context = ssl.create_default_context(cafile=cacert)
        if cert is not None:
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS: cannot load CA, certificate or key: {exc}") from None
    return context


def peer_names(peercert: Any) -> list[str]:
    """The subject CN(s) and name-like SANs of a verified peer certificate (``getpeercert()``)."""
    if not isinstance(peercert, dict):
        return []
    names = [
        value
        for rdn in peercert.get("subject", ())
        for attribute, value in rdn
        if attribute == "commonName"
    ]
    names += [value for kind, value in peercert.get("subjectAltName", ()) if kind in _SAN_TYPES]
    return names
