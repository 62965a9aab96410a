"""Run a function on a function host: one ``io.snaphook.function.invoke`` CloudEvent per
attempt, POSTed in binary mode to the URL routing chose (``Invocation.remote_url``).

Same semantics as in-process, mapped from what the host answers:

    200 result event                      the outputs
    200 error event                       RetryableError / PermanentError, as it says
    408, 429, 5xx, refused, unreachable   RetryableError (Retry-After becomes the delay)
    other 4xx, 3xx, not a CloudEvent      PermanentError with the host's own words
    no answer before the deadline         TimeoutError (the runner: "timed out after")

The invocation id (``<run>/<step>/<attempt>``) is the event id. When a connection breaks
after the request went out (the answer is lost), the same event is sent again while the
attempt has time left: the host recognises the id and answers from its record instead of
running the function twice.

The rendered params, secrets included, travel in the request body: hosts are reached over
https, or cleartext http only to loopback and private addresses (``remote_plain_http``),
checked on the address actually connected to. Nothing of the params is ever logged.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
from aiohappyeyeballs import AddrInfoType
from pydantic import SecretStr

from dispatcher.cehttp import encode_event, parse_request
from dispatcher.errors import EventError
from dispatcher.function_events import invocation_event, outcome_of
from dispatcher.invokers import Invocation
from dispatcher.settings import Settings
from dispatcher.tls import client_context
from functions.httpguard import read_limited
from functions.sdk import PermanentError, RetryableError

__all__ = ["CleartextRefused", "RemoteInvoker"]

log = logging.getLogger("snaphook.remote")

PlainHttp = Literal["private", "never", "any"]
RESENDS = 2  # extra sends of the same invocation after a lost answer
MAX_ANSWER_BYTES = 16 * 1024 * 1024
MAX_DETAIL = 500
_PRIVATE = [
    ipaddress.ip_network(cidr)
    for cidr in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
]


class CleartextRefused(OSError):
    """Plain http to an address that is neither loopback nor private. An ``OSError`` so
    that aiohttp reports it as a connection error, with this as the cause."""

    def __init__(self, address: str) -> None:
        super().__init__(
            None,
            f"refusing cleartext http to {address}, which is not a loopback or private "
            "address: the invocation carries rendered params (secrets included); use https, "
            "or set remote_plain_http: any",
        )

    def __str__(self) -> str:
        return str(self.strerror)


def _cleartext_allowed(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or any(ip in net for net in _PRIVATE if net.version == ip.version)


def _private_only(addr_info: AddrInfoType) -> socket.socket:
    """Socket factory: sees the very address about to be connected to (resolved names and
    IP literals alike), so DNS cannot steer cleartext traffic to a public address."""
    family, kind, proto, _, sockaddr = addr_info
    if not _cleartext_allowed(str(sockaddr[0])):
        raise CleartextRefused(str(sockaddr[0]))
    return socket.socket(family=family, type=kind, proto=proto)


class RemoteInvoker:
    def __init__(
        self,
        *,
        source: str = "snaphook",
        token: SecretStr | None = None,
        plain_http: PlainHttp = "private",
        ca: ssl.SSLContext | None = None,
        resends: int = RESENDS,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
    ) -> None:
        self._source = source
        self._token = token
        self._plain_http = plain_http
        self._ssl = ca
        self._resends = resends
        self._max_answer = max_answer_bytes
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> RemoteInvoker:
        ca = client_context(cacert=settings.remote_ca) if settings.remote_ca else None
        return cls(
            source=settings.reply_source,
            token=settings.remote_token,
            plain_http=settings.remote_plain_http,
            ca=ca,
        )

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()

    async def invoke(self, invocation: Invocation) -> dict[str, Any]:
        url = invocation.remote_url
        if url is None:
            raise PermanentError(f"no function host URL for {invocation.function!r}")
        parts = urlsplit(url)
        where = f"function host {parts.scheme}://{parts.netloc}"
        session = self._session(parts.scheme)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + invocation.timeout
        for send in range(self._resends + 1):
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            try:
                return await self._send(session, url, where, invocation, remaining)
            except aiohttp.ClientConnectorError as exc:
                raise _unreachable(where, exc) from None
            except (
                aiohttp.ServerDisconnectedError,
                aiohttp.ClientOSError,
                aiohttp.ClientPayloadError,
            ) as exc:
                # The request may have arrived and run: only the same id may be sent again.
                if send == self._resends:
                    raise RetryableError(f"{where}: connection lost: {_describe(exc)}") from None
                log.warning(
                    "function host connection lost; sending the invocation again",
                    extra={"function": invocation.function, "invocation": invocation.invocation_id},
                )
        raise AssertionError("unreachable: the last send returns or raises")

    def _session(self, scheme: str) -> aiohttp.ClientSession:
        if scheme == "http" and self._plain_http == "never":
            raise PermanentError(
                "cleartext http to function hosts is disabled (remote_plain_http: never); "
                "use an https URL"
            )
        kind = "private" if scheme == "http" and self._plain_http == "private" else "open"
        session = self._sessions.get(kind)
        if session is None or session.closed:
            factory: Callable[[AddrInfoType], socket.socket] | None = None
            if kind == "private":
                factory = _private_only
            connector = aiohttp.TCPConnector(ssl=self._ssl or True, socket_factory=factory)
            # No environment proxies: the address checked must be the one connected to.
            session = aiohttp.ClientSession(connector=connector, trust_env=False)
            self._sessions[kind] = session
        return session

    async def _send(
        self,
        session: aiohttp.ClientSession,
        url: str,
        where: str,
        invocation: Invocation,
        remaining: float,
    ) -> dict[str, Any]:
        # The contract caps one call at a day; a longer step timeout is told a day.
        event = invocation_event(invocation, source=self._source, timeout=min(remaining, 86_400))
        headers, body = encode_event(event, "binary")
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token.get_secret_value()}"
        async with session.post(
            url,
            data=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=remaining),
            allow_redirects=False,  # a redirect would carry the params somewhere else
        ) as resp:
            answer = await read_limited(resp, self._max_answer)
            return self._outcome(resp, answer, where)

    def _outcome(self, resp: aiohttp.ClientResponse, answer: bytes, where: str) -> dict[str, Any]:
        status = resp.status
        if 200 <= status < 300:
            try:
                parsed = parse_request(resp.raw_headers, answer, max_batch=1)
            except EventError as exc:
                raise PermanentError(
                    f"{where} answered {status} but not with a CloudEvent: {exc.detail}"
                ) from None
            return outcome_of(parsed.events[0], where)
        detail = _detail(resp.content_type, answer)
        if status in (408, 429) or status >= 500:
            message = f"{where} answered {status} {resp.reason or ''}".rstrip()
            raise RetryableError(f"{message}: {detail}", delay=_retry_after(resp))
        if 300 <= status < 400:
            raise PermanentError(
                f"{where} redirected ({status}); point the URL at the function host itself"
            )
        raise PermanentError(f"{where} refused the invocation ({status}): {detail}")


def _unreachable(where: str, exc: aiohttp.ClientConnectorError) -> Exception:
    cause = exc.os_error
    if isinstance(cause, CleartextRefused):
        return PermanentError(f"{where}: {cause}")
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return PermanentError(f"{where}: TLS failed: {cause}")
    return RetryableError(f"{where} unreachable: {cause.strerror or cause}")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _detail(content_type: str, answer: bytes) -> str:
    """What the host said: a problem's detail (or title), else the start of the body."""
    text = answer.decode("utf-8", "replace")
    if content_type.endswith("json"):
        try:
            problem = json.loads(text)
        except ValueError:
            problem = None
        if isinstance(problem, dict):
            said = problem.get("detail") or problem.get("title")
            if isinstance(said, str) and said:
                return said[:MAX_DETAIL]
    return text.strip()[:MAX_DETAIL] or "(empty body)"


def _retry_after(resp: aiohttp.ClientResponse) -> float | None:
    value = resp.headers.get("Retry-After", "")
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: rare from a host, the runner's backoff will do
    return seconds if 0 <= seconds <= 3600 else None
