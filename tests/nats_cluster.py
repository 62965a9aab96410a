"""nats-server processes of a test's own: one JetStream node, or a 3-node cluster.

Each node gets free loopback ports and a store directory under the test's ``tmp_path``, and
is killed by its PID (never by name: other tests run their own servers). A cluster is
usable once JetStream has elected its meta leader, which :meth:`NatsCluster.ready` waits
for; streams and buckets with three replicas (R3) then survive one node's death.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.errors

from tests.conftest import free_port
from tests.processes import sigkill, tail

NATS_SERVER = Path(os.environ.get("SNAPHOOK_TEST_NATS_SERVER", "/usr/sbin/nats-server"))
READY_WITHIN = 20.0


@dataclass
class NatsNode:
    name: str
    root: Path
    port: int = field(default_factory=free_port)
    cluster_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.root / f"{self.name}.log"

    def start(self, cluster: str | None = None, routes: list[int] | None = None) -> None:
        assert self.proc is None, f"{self.name} is running"
        store = self.root / f"{self.name}-store"
        store.mkdir(parents=True, exist_ok=True)
        args = [
            str(NATS_SERVER),
            "-a", "127.0.0.1",
            "-p", str(self.port),
            "-n", self.name,
            "-js",
            "-sd", str(store),
            "-l", str(self.log),
        ]  # fmt: skip
        if cluster is not None:
            args += [
                "--cluster_name", cluster,
                "--cluster", f"nats://127.0.0.1:{self.cluster_port}",
                "--routes", ",".join(f"nats://127.0.0.1:{p}" for p in routes or []),
            ]  # fmt: skip
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )

    def kill(self) -> None:
        """SIGKILL, as a node crash."""
        if self.proc is None:
            return
        sigkill(self.proc)
        self.proc = None

    def log_tail(self, lines: int = 20) -> str:
        return tail(self.log, lines)


@dataclass
class NatsCluster:
    """One node (``size=1``, no clustering) or a full-mesh JetStream cluster."""

    root: Path
    size: int = 3
    nodes: list[NatsNode] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.nodes = [NatsNode(f"n{i}", self.root) for i in range(self.size)]

    @property
    def url(self) -> str:
        """Every node, comma-separated (what ``SNAPHOOK_NATS_URL`` takes)."""
        return ",".join(node.url for node in self.nodes)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self) -> None:
        if self.size == 1:
            self.nodes[0].start()
            return
        for node in self.nodes:
            others = [n.cluster_port for n in self.nodes if n is not node]
            node.start(cluster=f"c{self.nodes[0].port}", routes=others)

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()

    async def ready(self) -> None:
        """Wait until JetStream answers on every live node (the meta leader is elected)."""
        deadline = time.monotonic() + READY_WITHIN
        for node in self.nodes:
            if node.proc is None:
                continue
            while True:
                if node.proc.poll() is not None:
                    raise RuntimeError(f"nats-server {node.name} exited:\n{node.log_tail()}")
                if await _jetstream_answers(node.url):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"JetStream not ready on {node.name}:\n{node.log_tail()}")
                await asyncio.sleep(0.1)


async def _jetstream_answers(url: str) -> bool:
    host, port = url.removeprefix("nats://").split(":")
    try:  # listening yet? (nats.connect would wait a reconnect interval to find out)
        _, writer = await asyncio.open_connection(host, int(port))
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    try:
        nc = await nats.connect(url, connect_timeout=1, max_reconnect_attempts=0)
    except (nats.errors.Error, OSError):
        return False
    try:
        await nc.jetstream().account_info()
        return True
    except (nats.errors.Error, OSError):
        return False
    finally:
        await nc.close()
