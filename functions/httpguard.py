"""One outbound HTTP policy for every hook function: timeouts, a response size cap, and an
SSRF guard.

Blueprints put URLs into the dispatcher's hands, and the dispatcher runs inside a cluster
(or a cloud VM) where a URL can reach things no caller should: the instance metadata service
(cloud credentials), the Kubernetes API, databases on private addresses. The session the
dispatcher gives functions as ``ctx.http`` is built by :func:`guarded_session`, which checks
every address it is about to connect to:

    always refused           169.254.0.0/16 (link-local, cloud metadata), fe80::/10,
                             fd00:ec2::254 (AWS metadata over IPv6), 0.0.0.0/8 and ::
    refused unless allowed   10/8, 172.16/12, 192.168/16, 100.64/10 (CGNAT), fc00::/7
    (``allow_private``)
    allowed unless disabled  127/8, ::1
    (``allow_loopback``)

The check runs at connect time on the *resolved* addresses, not on the URL text, so a name
that resolves to a metadata address, DNS rebinding (a name that changes its answer between
a check and the connect) and redirects are refused like a literal address: the addresses
checked are the very ones connected to. Two hooks on the session's ``TCPConnector`` do it:
a resolver that wraps the real one (names), and a socket factory (literal IPs, which aiohttp
never hands to a resolver). IPv4-mapped IPv6 addresses (``::ffff:169.254.169.254``) are
judged by the IPv4 address inside.

A refusal is a :class:`BlockedAddress`: a :class:`~functions.sdk.PermanentError` that is also
an ``OSError``, because that is what aiohttp wraps into ``ClientConnectorError`` (with the
refusal as its cause). :func:`http_failure` turns any exception of a request into the error
a function should raise, keeping the guard's words::

    try:
        async with ctx.http.get(url) as resp:
            body = await read_limited(resp, policy_of(ctx.http).max_response_bytes)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise http_failure(f"GET {host}", exc) from None

The guard covers connections made through the session only. Sessions never use
environment proxies (``trust_env`` stays off): through a proxy, the address checked would be
the proxy's, not the target's.
"""

from __future__ import annotations

import ipaddress
import socket
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Literal

import aiohttp
from aiohappyeyeballs import AddrInfoType
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from functions.sdk import FunctionError, PermanentError, RetryableError

__all__ = [
    "BlockedAddress",
    "HttpPolicy",
    "ResponseTooLarge",
    "blocked_cause",
    "check_address",
    "guarded_session",
    "http_failure",
    "policy_of",
    "read_limited",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Tier = Literal["always", "private", "loopback"]

MiB: Final = 1024 * 1024


@dataclass(frozen=True)
class HttpPolicy:
    """What outbound HTTP may do. The defaults suit a dispatcher talking to public services
    and to itself (the demo and the tests call 127.0.0.1)."""

    allow_private: bool = False
    allow_loopback: bool = True
    timeout: float = 30.0  # seconds per request, unless the request says otherwise
    max_response_bytes: int = 10 * MiB

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ValueError("HttpPolicy.timeout must be positive")
        if self.max_response_bytes < 1:
            raise ValueError("HttpPolicy.max_response_bytes must be positive")


class BlockedAddress(PermanentError, OSError):
    """The guard refused an address. An ``OSError`` as well, so that aiohttp reports it as
    a ``ClientConnectorError`` (whose ``os_error`` and ``__cause__`` it is)."""

    def __init__(self, host: str, address: str, label: str) -> None:
        self.host, self.address, self.label = host, address, label
        shown = host if host == address else f"{host} at {address}"
        # errno None: nothing failed at the OS level; strerror is what aiohttp shows.
        super().__init__(None, f"refusing to connect to {shown} ({label})")

    def __str__(self) -> str:
        return str(self.strerror)


class ResponseTooLarge(PermanentError):
    """A response body exceeded the policy's ``max_response_bytes``."""

    def __init__(self, limit: int, host: str | None = None) -> None:
        self.limit = limit
        where = f" from {host}" if host else ""
        super().__init__(f"response larger than {limit} bytes{where}")


@dataclass(frozen=True)
class _Range:
    network: Network
    tier: Tier
    label: str


def _ranges(tier: Tier, label: str, *cidrs: str) -> list[_Range]:
    return [_Range(ipaddress.ip_network(cidr), tier, label) for cidr in cidrs]


# Order matters: the metadata address fd00:ec2::254 lies inside fc00::/7 and must be refused
# even where private ranges are allowed, so the "always" ranges are looked at first.
_RANGES: Final = [
    *_ranges("always", "link-local / cloud metadata", "169.254.0.0/16"),
    *_ranges("always", "cloud metadata", "fd00:ec2::254/128"),
    *_ranges("always", "link-local", "fe80::/10"),
    # Connecting to 0.0.0.0 or :: reaches this host on Linux: loopback under another name.
    *_ranges("always", "unspecified address", "0.0.0.0/8", "::/128"),
    *_ranges("loopback", "loopback", "127.0.0.0/8", "::1/128"),
    *_ranges("private", "private", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"),
    *_ranges("private", "carrier-grade NAT", "100.64.0.0/10"),
    *_ranges("private", "unique local", "fc00::/7"),
]

_HINTS: Final = {
    "private": "; allow with the http_allow_private setting",
    "loopback": "; allow with the http_allow_loopback setting",
}


def _parse(address: str) -> IPAddress:
    # A scope id (fe80::1%eth0) names an interface, not an address.
    parsed = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped  # ::ffff:169.254.169.254 is 169.254.169.254
    return parsed


def _refusal(ip: IPAddress, policy: HttpPolicy) -> str | None:
    """Why ``ip`` is refused under ``policy`` (a label), or ``None`` if it may be used."""
    for entry in _RANGES:
        if ip.version != entry.network.version or ip not in entry.network:
            continue
        allowed = (entry.tier == "private" and policy.allow_private) or (
            entry.tier == "loopback" and policy.allow_loopback
        )
        return None if allowed else entry.label + _HINTS.get(entry.tier, "")
    return None


def check_address(host: str, address: str, policy: HttpPolicy) -> None:
    """Raise :class:`BlockedAddress` if ``policy`` forbids connecting to ``address`` (an IP
    literal) on behalf of ``host`` (the name the caller asked for, for the message)."""
    try:
        ip = _parse(address)
    except ValueError:
        raise BlockedAddress(host, address, "not an IP address") from None
    label = _refusal(ip, policy)
    if label is not None:
        raise BlockedAddress(host, str(ip), label)


class GuardedResolver(AbstractResolver):
    """Resolves through ``inner``, then refuses the name if *any* address it got is
    forbidden: a name answering with a public and a metadata address is an attack, not a
    choice to be made quietly."""

    def __init__(self, policy: HttpPolicy, inner: AbstractResolver) -> None:
        self._policy = policy
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            check_address(host, result["host"], self._policy)
        return results

    async def close(self) -> None:
        await self._inner.close()


def _socket_factory(policy: HttpPolicy) -> Callable[[AddrInfoType], socket.socket]:
    """The last check before ``connect()``: it sees the address actually connected to,
    including IP literals, which aiohttp does not pass through the resolver."""

    def make_socket(addr_info: AddrInfoType) -> socket.socket:
        family, kind, proto, _, sockaddr = addr_info
        address = str(sockaddr[0])
        check_address(address, address, policy)
        return socket.socket(family=family, type=kind, proto=proto)

    return make_socket


_policies: weakref.WeakKeyDictionary[aiohttp.ClientSession, HttpPolicy] = (
    weakref.WeakKeyDictionary()
)


def guarded_session(
    policy: HttpPolicy | None = None, *, resolver: AbstractResolver | None = None
) -> aiohttp.ClientSession:
    """A ``ClientSession`` that enforces ``policy`` on every connection it makes.

    ``resolver`` is the name resolver being guarded (default: the system's, through a
    thread); tests pass one with fixed answers. Call from within the event loop.
    """
    policy = policy or HttpPolicy()
    connector = aiohttp.TCPConnector(
        resolver=GuardedResolver(policy, resolver or ThreadedResolver()),
        socket_factory=_socket_factory(policy),
    )
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=policy.timeout),
        trust_env=False,
    )
    _policies[session] = policy
    return session


def policy_of(session: aiohttp.ClientSession) -> HttpPolicy:
    """The policy ``session`` was built with; the default one for a plain session, so size
    limits hold wherever a function runs."""
    return _policies.get(session) or HttpPolicy()


async def read_limited(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body of ``resp``, or :class:`ResponseTooLarge` as soon as it passes
    ``limit`` bytes (never buffering more than that)."""
    declared = resp.content_length
    if declared is not None and declared > limit:
        raise ResponseTooLarge(limit, resp.url.host)
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise ResponseTooLarge(limit, resp.url.host)
        chunks.append(chunk)
    return b"".join(chunks)


def _causes(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        # aiohttp raises these ``from`` the OSError, but code that re-wraps one may not.
        if isinstance(current, aiohttp.ClientConnectorError):
            yield current.os_error
        current = current.__cause__ or current.__context__


def blocked_cause(exc: BaseException) -> BlockedAddress | None:
    """The guard's refusal behind ``exc`` (however aiohttp wrapped it), if there is one."""
    for cause in _causes(exc):
        if isinstance(cause, BlockedAddress):
            return cause
    return None


def http_failure(what: str, exc: BaseException) -> FunctionError:
    """The error a function raises for a failed request. ``what`` says which request
    (``"POST hooks.example.com"``); it is the caller's job to keep secrets out of it.

    Refused by the guard, too large, an invalid URL → permanent; timeouts and connection
    problems → retryable. Messages never quote URLs (they may carry tokens).
    """
    blocked = blocked_cause(exc)
    if blocked is not None:
        return PermanentError(f"{what}: {blocked}")
    if isinstance(exc, PermanentError):
        return PermanentError(f"{what}: {exc}")
    if isinstance(exc, aiohttp.InvalidURL):
        return PermanentError(f"{what}: invalid URL")
    if isinstance(exc, aiohttp.TooManyRedirects):
        return PermanentError(f"{what}: too many redirects")
    if isinstance(exc, aiohttp.ClientResponseError):  # its str() would quote the URL
        return RetryableError(f"{what}: {type(exc).__name__}: {exc.status} {exc.message}")
    if isinstance(exc, TimeoutError):
        return RetryableError(f"{what}: timed out")
    return RetryableError(f"{what}: {type(exc).__name__}: {exc}")
