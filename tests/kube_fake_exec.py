"""``pods/exec`` over WebSocket, as the API server (proxying the kubelet) serves it.

The client upgrades ``GET|POST /api/v1/namespaces/<ns>/pods/<pod>/exec?command=..&
container=..&stdin=..&stdout=..&stderr=..`` offering subprotocols; the server picks the
first it knows of ``v5.channel.k8s.io``, ``v4.channel.k8s.io``, ``channel.k8s.io``. Every
binary frame starts with its channel byte: 0 stdin, 1 stdout, 2 stderr, 3 error (a
``Status`` JSON from v4 on, plain text before), and in v5 a client frame ``[255, 0]``
closes stdin. On open the server sends an empty frame on the lowest writable channel;
after the command ends it writes the error channel and closes the socket.

Refusals happen before the upgrade, as plain HTTP ``Status`` answers: 404 for a missing
pod or container, 400 for a missing command or a finished pod.

A test scripts what a command does with ``cluster.on_exec(pod, handler)``; the handler gets
the :class:`ExecCall` (command, container, ``await call.read_stdin()``, ``await
call.write(channel, data)``) and returns an :class:`ExecResult`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from tests.kube_fake_resources import ApiError, Target, bad_request

if TYPE_CHECKING:
    from tests.kube_fake import FakeCluster

STDIN, STDOUT, STDERR, ERROR = 0, 1, 2, 3
CLOSE = 255  # v5: [255, <channel>] closes that channel
PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io", "channel.k8s.io")
_FRAME = 16 * 1024  # output is sent in frames of at most this many bytes


@dataclass(frozen=True)
class ExecResult:
    stdout: bytes | str = b""
    stderr: bytes | str = b""
    exit_code: int = 0
    error: str | None = None  # the runtime could not run the command at all
    hang_up: bool = False  # close the stream without reporting on the error channel


@dataclass(eq=False)
class ExecCall:
    """One exec request, as the container runtime saw it."""

    namespace: str
    pod: str
    container: str
    command: list[str]
    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool
    protocol: str
    stdin_data: bytearray = field(default_factory=bytearray)
    outcome: str = "running"  # completed, disconnected (the client went away first)
    stdin_closed: asyncio.Event = field(default_factory=asyncio.Event)
    stdin_more: asyncio.Event = field(default_factory=asyncio.Event)
    stdin_read: int = 0  # bytes of stdin_data read_line() handed out
    ws: web.WebSocketResponse | None = None

    async def read_stdin(self) -> bytes:
        """Everything sent on stdin, once the client closed it (v5) or went away."""
        await self.stdin_closed.wait()
        return bytes(self.stdin_data)

    async def read_line(self) -> bytes:
        """The next line on stdin as a process reading its pipe line by line gets it: once
        its newline arrived, or what is left once stdin is closed; ``b""`` at the end."""
        while True:
            newline = self.stdin_data.find(b"\n", self.stdin_read)
            if newline >= 0 or self.stdin_closed.is_set():
                end = newline + 1 if newline >= 0 else len(self.stdin_data)
                line, self.stdin_read = bytes(self.stdin_data[self.stdin_read : end]), end
                return line
            self.stdin_more.clear()
            await self.stdin_more.wait()

    async def write(self, channel: int, data: bytes | str) -> None:
        """Stream output now, before the command ends."""
        wanted = {STDOUT: self.stdout, STDERR: self.stderr}.get(channel, True)
        if self.ws is not None and wanted:
            await _send(self.ws, channel, data)


ExecHandler = Callable[[ExecCall], "Awaitable[ExecResult] | ExecResult"]


def _flag(query: Any, name: str) -> bool:
    # The API server parses booleans with Go's strconv.ParseBool.
    return str(query.get(name, "")).lower() in ("1", "t", "true")


def _container(pod: dict[str, Any], wanted: str | None) -> str:
    names: list[str] = [c["name"] for c in pod["spec"]["containers"]]
    pod_name = pod["metadata"]["name"]
    if wanted is None:
        annotations = pod["metadata"].get("annotations") or {}
        default = annotations.get("kubectl.kubernetes.io/default-container")
        if default in names:
            return str(default)
        if len(names) == 1:
            return names[0]
        raise bad_request(
            f"a container name must be specified for pod {pod_name}, choose one of: "
            f"[{' '.join(names)}]"
        )
    if wanted not in names:
        raise ApiError(404, "NotFound", f'container not found ("{wanted}")')
    return wanted


async def serve_exec(
    cluster: FakeCluster, request: web.Request, target: Target
) -> web.StreamResponse:
    pod = cluster.require(target.resource, target.namespace, target.name or "")
    query = request.query
    command = query.getall("command", [])
    if not command:
        raise bad_request("you must specify at least one command for the container")
    stdin, stdout, stderr = _flag(query, "stdin"), _flag(query, "stdout"), _flag(query, "stderr")
    if not (stdin or stdout or stderr):
        raise bad_request("you must specify at least 1 of stdin, stdout, stderr")
    container = _container(pod, query.get("container"))
    phase = (pod.get("status") or {}).get("phase")
    if phase in ("Succeeded", "Failed"):
        raise bad_request(
            f"cannot exec into a container in a completed pod; current phase is {phase}"
        )
    ws = web.WebSocketResponse(protocols=cluster.exec_protocols)
    if not ws.can_prepare(request).ok:
        raise bad_request("Upgrade request required")
    await ws.prepare(request)
    call = ExecCall(
        namespace=target.namespace or "",
        pod=target.name or "",
        container=container,
        command=list(command),
        protocol=ws.ws_protocol or "",
        ws=ws,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        tty=_flag(query, "tty"),
    )
    cluster.execs.append(call)
    cluster.notify()
    first = STDOUT if call.stdout else STDERR if call.stderr else ERROR
    await ws.send_bytes(bytes([first]))  # tells the client the streams are set up
    await _run(cluster, ws, call)
    return ws


async def _run(cluster: FakeCluster, ws: web.WebSocketResponse, call: ExecCall) -> None:
    handler = cluster.exec_handler(call.namespace, call.pod) or (lambda _: ExecResult())
    reader = asyncio.ensure_future(_read_client(ws, call))
    work = asyncio.ensure_future(_invoke(handler, call))
    cluster.track(work)
    try:
        await asyncio.wait({reader, work}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done() or work.cancelled():
            call.outcome = "disconnected"
            work.cancel()
            return
        result = work.result()
        if call.stdout:
            await _send(ws, STDOUT, result.stdout)
        if call.stderr:
            await _send(ws, STDERR, result.stderr)
        if not result.hang_up:
            await ws.send_bytes(bytes([ERROR]) + _error_payload(call, result))
        call.outcome = "completed"
    finally:
        reader.cancel()
        work.cancel()
        await ws.close()
        cluster.notify()


async def _invoke(handler: ExecHandler, call: ExecCall) -> ExecResult:
    result = handler(call)
    if inspect.isawaitable(result):
        result = await result
    assert isinstance(result, ExecResult), "an exec handler must return an ExecResult"
    return result


async def _read_client(ws: web.WebSocketResponse, call: ExecCall) -> None:
    try:
        async for msg in ws:
            if msg.type != WSMsgType.BINARY or not msg.data:
                continue
            channel, data = msg.data[0], msg.data[1:]
            if channel == STDIN and call.stdin:
                call.stdin_data.extend(data)
                call.stdin_more.set()
            elif channel == CLOSE and call.protocol.startswith("v5") and data[:1] == b"\x00":
                call.stdin_closed.set()
                call.stdin_more.set()
            # Frames for other channels are ignored, as the API server does.
    finally:
        call.stdin_closed.set()
        call.stdin_more.set()


async def _send(ws: web.WebSocketResponse, channel: int, data: bytes | str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    for start in range(0, len(raw), _FRAME):
        await ws.send_bytes(bytes([channel]) + raw[start : start + _FRAME])


def _error_payload(call: ExecCall, result: ExecResult) -> bytes:
    """What the error channel carries when the command ends."""
    if result.error is not None:
        status: dict[str, Any] = {
            "metadata": {},
            "status": "Failure",
            "message": result.error,
            "reason": "InternalError",
            "details": {"causes": [{"message": result.error}]},
            "code": 500,
        }
    elif result.exit_code != 0:
        status = {
            "metadata": {},
            "status": "Failure",
            "message": (
                "command terminated with non-zero exit code: error executing command "
                f"[{' '.join(call.command)}], exit code {result.exit_code}"
            ),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(result.exit_code)}]},
        }
    else:
        status = {"metadata": {}, "status": "Success"}
    if call.protocol.startswith(("v4", "v5")):
        return json.dumps(status).encode()
    # Before v4 the error channel carried only a message, and nothing on success.
    return b"" if status["status"] == "Success" else str(status["message"]).encode()
