"""Run one command in a container over the API server's exec WebSocket.

The channel protocol (``v5.channel.k8s.io``, falling back to ``v4.channel.k8s.io``): every
binary frame starts with a channel byte — 0 stdin, 1 stdout, 2 stderr, 3 error. The error
channel carries a ``Status`` when the command ends: ``Success``, or ``Failure`` with reason
``NonZeroExitCode`` and the exit code as the ``ExitCode`` cause; any other failure means
the command could not run at all. v5 adds ``[255, 0]`` to close stdin (a v4 server ignores
frames for channels it does not know, so it is always sent after stdin).

Output is kept up to a limit per stream (the rest is read and dropped, so a chatty command
never blocks on a full pipe), plus the last bytes of stderr for error messages.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp

if TYPE_CHECKING:
    from kubernetes_asyncio.stream import WsApiClient

STDIN, STDOUT, STDERR, ERROR, CLOSE = 0, 1, 2, 3, 255
# Offered in order of preference; only v5 can signal the end of stdin.
PROTOCOLS = "v5.channel.k8s.io, v4.channel.k8s.io"
_STDIN_FRAME = 32 * 1024
_TAIL = 2048  # bytes of stderr kept for error messages, whatever the output limit


class ExecFailed(Exception):
    """The command could not be run (not found, runtime error), or — ``broken`` — the
    stream broke off before it reported how it ended (worth retrying)."""

    def __init__(self, message: str, *, broken: bool = False) -> None:
        super().__init__(message)
        self.broken = broken


@dataclass
class Capture:
    """The first ``limit`` bytes of a stream, its last bytes, and whether any was cut."""

    limit: int
    head: bytearray = field(default_factory=bytearray)
    tail: bytearray = field(default_factory=bytearray)
    total: int = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self.limit - len(self.head)
        if room > 0:
            self.head.extend(data[:room])
        self.tail.extend(data)
        del self.tail[:-_TAIL]

    @property
    def truncated(self) -> bool:
        return self.total > len(self.head)

    def text(self) -> str:
        return self.head.decode("utf-8", errors="replace")

    def tail_text(self) -> str:
        return self.tail.decode("utf-8", errors="replace")


@dataclass
class ExecOutcome:
    exit_code: int
    stdout: Capture
    stderr: Capture


def exit_code_of(payload: bytes) -> int:
    """The exit code an error-channel message reports; :class:`ExecFailed` if the command
    did not run."""
    try:
        status = json.loads(payload)
    except ValueError:
        status = None
    if not isinstance(status, dict):
        # Before v4 the channel carried only an error text (and nothing on success).
        text = payload.decode("utf-8", errors="replace").strip()
        if not text:
            return 0
        raise ExecFailed(text[:500])
    if status.get("status") == "Success":
        return 0
    causes = (status.get("details") or {}).get("causes") or []
    if status.get("reason") == "NonZeroExitCode":
        for cause in causes:
            if cause.get("reason") == "ExitCode" and str(cause.get("message", "")).isdigit():
                return int(cause["message"])
    raise ExecFailed(str(status.get("message") or "the command failed to run")[:500])


async def _send_stdin(ws: aiohttp.ClientWebSocketResponse, data: bytes) -> None:
    for start in range(0, len(data), _STDIN_FRAME):
        await ws.send_bytes(bytes([STDIN]) + data[start : start + _STDIN_FRAME])
    await ws.send_bytes(bytes([CLOSE, STDIN]))


async def run_exec(
    api: WsApiClient,
    namespace: str,
    pod: str,
    container: str,
    command: list[str],
    *,
    stdin: bytes | None,
    limit: int,
) -> ExecOutcome:
    """Run ``command`` and collect its output; API refusals surface as the client raises
    them (``aiohttp.WSServerHandshakeError``) for the caller to translate."""
    from kubernetes_asyncio.client import CoreV1Api

    # Typed loosely: the stubs declare ``command`` a str and omit ``_headers``, both of which
    # the generated code accepts (a list becomes repeated ``command=`` query parameters).
    core: Any = CoreV1Api(api)
    connecting = await core.connect_get_namespaced_pod_exec(
        pod,
        namespace,
        command=command,
        container=container,
        stdin=stdin is not None,
        stdout=True,
        stderr=True,
        tty=False,
        _preload_content=False,
        _headers={"sec-websocket-protocol": PROTOCOLS},
    )
    stdout, stderr = Capture(limit), Capture(limit)
    exit_code: int | None = None
    async with connecting as ws:
        feeder = asyncio.ensure_future(_send_stdin(ws, stdin)) if stdin is not None else None
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.BINARY or not msg.data:
                    continue
                channel, data = msg.data[0], msg.data[1:]
                if channel == STDOUT:
                    stdout.feed(data)
                elif channel == STDERR:
                    stderr.feed(data)
                elif channel == ERROR and data:
                    exit_code = exit_code_of(data)
        finally:
            if feeder is not None:
                feeder.cancel()  # the command ended without reading all of stdin
                await asyncio.gather(feeder, return_exceptions=True)
    if exit_code is None:
        # v4+ always report on the error channel; a bare close means the stream broke off.
        raise ExecFailed("the exec stream closed before the command reported its exit", broken=True)
    return ExecOutcome(exit_code, stdout, stderr)
