"""NATS JetStream plumbing for the journal: connecting, buckets, conditional writes, errors.

Nothing here knows about runs or leases. What it settles once:

- connecting: a bounded number of attempts at start-up (a wrong URL fails fast), unbounded
  reconnects afterwards (a running dispatcher rides out a NATS restart);
- buckets: created idempotently, an existing bucket adopted and its replica count changed to
  the configured one, reads that go to the stream leader (never a lagging follower);
- conditional writes: create-if-absent or replace-if-unchanged, one helper;
- errors: :func:`describe` renders any NATS failure for a ``JournalError`` and
  :func:`public_url` strips credentials from server URLs shown in messages.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Final

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from dispatcher.errors import JournalError

__all__ = [
    "NATS_ERRORS",
    "Conflict",
    "connect",
    "describe",
    "ensure_bucket",
    "public_url",
    "read",
    "write",
]

log = logging.getLogger("snaphook.journal")

NATS_ERRORS: Final = (nats.errors.Error, OSError)  # TimeoutError is an OSError
Conflict: Final = nats.js.errors.KeyWrongLastSequenceError  # a revision check failed

_STREAM_NAME_IN_USE: Final = 10058  # JetStream: the stream exists with another config
_RESIZE_WAIT: Final = 30.0  # seconds for a re-sized bucket to have a leader again


def public_url(url: str) -> str:
    """``url`` without credentials, for messages."""
    scheme, sep, rest = url.rpartition("://")
    return f"{scheme}{sep}{rest.rsplit('@', 1)[-1]}"


def describe(exc: BaseException) -> str:
    if isinstance(exc, nats.js.errors.APIError) and exc.description:
        return f"{exc.description} (JetStream error {exc.err_code})"
    if isinstance(exc, TimeoutError):
        return "no answer from NATS in time"
    return f"{type(exc).__name__}: {exc}"


async def connect(
    servers: list[str], timeout: float, reconnected: Callable[[], None] | None = None
) -> Client:
    """A connection to ``servers``; ``reconnected`` is called after each reconnect."""
    nc = Client()

    async def disconnected() -> None:
        if not nc.is_closed:  # closing on purpose is not news
            log.warning("NATS connection lost; reconnecting")

    async def on_reconnected() -> None:
        log.info("NATS connection re-established")
        if reconnected is not None:
            reconnected()

    await nc.connect(
        servers=servers,
        name="snaphook",
        connect_timeout=max(1, round(timeout)),
        reconnect_time_wait=1,
        max_reconnect_attempts=1,  # at start-up: try each server twice, then fail
        error_cb=_on_error,
        disconnected_cb=disconnected,
        reconnected_cb=on_reconnected,
    )
    # Once connected, reconnect forever: a running dispatcher rides out a NATS rolling
    # restart or a lost node (its journal calls fail with JournalError meanwhile) instead of
    # closing the connection for good. nats-py reads this option at each reconnect.
    nc.options["max_reconnect_attempts"] = -1
    return nc


async def _on_error(exc: Exception) -> None:
    log.warning("NATS: %s", describe(exc))


async def ensure_bucket(js: JetStreamContext, bucket: str, replicas: int) -> KeyValue:
    """The key-value bucket, created if missing (history 1, file storage); an existing one
    gets ``replicas`` copies. Safe to run from many replicas at once."""
    stream = f"KV_{bucket}"
    for _ in range(2):  # a second pass if another replica created it meanwhile
        try:
            info = await js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            config = api.KeyValueConfig(
                bucket=bucket,
                description="snaphook journal",
                history=1,
                replicas=replicas,
                storage=api.StorageType.FILE,
                direct=False,
            )
            try:
                await js.create_key_value(config)  # same config as an existing one: no-op
            except nats.js.errors.APIError as exc:
                if exc.err_code == _STREAM_NAME_IN_USE:
                    continue
                raise JournalError(
                    f"cannot create bucket {bucket!r} with {replicas} replica(s): {describe(exc)}"
                ) from None
        else:
            await _adjust_replicas(js, bucket, info, replicas)
        # direct=False: reads go to the stream leader, so they see every acknowledged
        # write; a direct get may be answered by a follower that lags behind.
        return KeyValue(name=bucket, stream=stream, pre=f"$KV.{bucket}.", js=js, direct=False)
    raise JournalError(f"bucket {bucket!r} keeps changing while it is being created")


async def _adjust_replicas(
    js: JetStreamContext, bucket: str, info: api.StreamInfo, replicas: int
) -> None:
    config = info.config
    if config.max_msgs_per_subject is None or config.max_msgs_per_subject < 1:
        raise JournalError(f"stream {config.name!r} exists but is not a key-value bucket")
    if config.num_replicas in (None, replicas):
        return
    problem = f"bucket {bucket!r} has {config.num_replicas} replica(s) and the journal is "
    problem += f"configured for {replicas}"
    if replicas > 1 and info.cluster is None:
        # Some servers accept the change and then keep one copy: say so instead.
        raise JournalError(f"{problem}, which needs a JetStream cluster; NATS is standalone")
    try:
        await js.update_stream(replace(config, num_replicas=replicas))
    except nats.js.errors.APIError as exc:
        raise JournalError(f"{problem}; changing it failed: {describe(exc)}") from None
    log.warning("journal bucket %s: replicas %s -> %s", bucket, config.num_replicas, replicas)
    await _until_led(js, info.config.name or f"KV_{bucket}", bucket)


async def _until_led(js: JetStreamContext, stream: str, bucket: str) -> None:
    """Wait until a re-sized stream has a leader again: writes in between would find no
    one to answer them. No event announces it, so this polls."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _RESIZE_WAIT
    while True:
        info = await js.stream_info(stream)
        if info.cluster is None or info.cluster.leader:
            return
        if loop.time() > deadline:
            raise JournalError(f"bucket {bucket!r} has no leader {_RESIZE_WAIT:g}s after resizing")
        await asyncio.sleep(0.1)


async def read(kv: KeyValue, key: str) -> KeyValue.Entry | None:
    try:
        return await kv.get(key)
    except nats.js.errors.KeyNotFoundError:  # also: deleted
        return None


async def write(kv: KeyValue, key: str, value: bytes, revision: int | None) -> int:
    """Create ``key`` (``revision`` None) or replace the value read at ``revision``; the new
    revision, or :data:`Conflict` if another writer came first."""
    if revision is None:
        return await kv.create(key, value)
    return await kv.update(key, value, last=revision)
