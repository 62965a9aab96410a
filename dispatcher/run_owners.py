"""Which replica executes a run: one owner record per run in a JetStream key-value bucket.

A replica executes a run only while it holds the run's record, created with a
compare-and-set (``kv.create`` fails if the key exists) and refreshed with another one
(``kv.update`` at the revision it last wrote) with every heartbeat. The bucket's TTL ends a
record its owner stopped refreshing, so the replica that gets the run's message after a
crash takes over once the dead owner's record is gone, and never while a live owner
still refreshes it. The record names the message it came with (its stream sequence):
a second message for the same run can then be told apart from a redelivery of the first.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from dataclasses import dataclass

import nats.errors
from nats.js.api import KeyValueConfig, StorageType
from nats.js.client import JetStreamContext
from nats.js.errors import BadRequestError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

log = logging.getLogger("snaphook.queue")

BUCKET_EXISTS = 10058  # the bucket's stream exists with another configuration


@dataclass
class Owner:
    """A run's owner record as read or written."""

    run_id: str
    replica: str
    seq: int  # stream sequence of the message the owner holds
    revision: int  # of the record in the bucket


def replica_name() -> str:
    """This process, as owner records and logs name it."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class RunOwners:
    def __init__(self, kv: KeyValue, replica: str) -> None:
        self._kv = kv
        self.replica = replica

    @classmethod
    async def open(
        cls, js: JetStreamContext, bucket: str, *, ttl: float, replicas: int
    ) -> RunOwners:
        """Create the bucket, or bring an existing one to ``ttl`` and ``replicas``."""
        config = KeyValueConfig(
            bucket=bucket,
            description="snaphook: which dispatcher replica executes each run",
            history=1,
            ttl=ttl,
            replicas=replicas,
            storage=StorageType.FILE,
        )
        try:
            kv = await js.create_key_value(config)
        except BadRequestError as exc:
            if exc.err_code != BUCKET_EXISTS:
                raise
            stream = f"KV_{bucket}"
            info = await js.stream_info(stream)
            await js.update_stream(
                info.config.evolve(
                    max_age=ttl, num_replicas=replicas, duplicate_window=min(ttl, 120.0)
                )
            )
            kv = await js.key_value(bucket)
        return cls(kv, replica_name())

    async def take(self, run_id: str, seq: int) -> tuple[Owner | None, Owner | None]:
        """Own ``run_id`` for the message ``seq``: (our record, None), or (None, the owner's).

        The owner's record is ``None`` too if it vanished between the two reads.
        """
        value = self._value(seq)
        for _ in range(2):
            try:
                revision = await self._kv.create(run_id, value)
            except KeyWrongLastSequenceError:
                current = await self.get(run_id)
                if current is not None:
                    return None, current
                continue  # expired just now: try again
            return Owner(run_id, self.replica, seq, revision), None
        return None, None

    async def get(self, run_id: str) -> Owner | None:
        try:
            entry = await self._kv.get(run_id)
        except KeyNotFoundError:  # also a deleted record
            return None
        try:
            body = json.loads(entry.value or b"{}")
            return Owner(run_id, str(body["replica"]), int(body["seq"]), entry.revision or 0)
        except (ValueError, KeyError, TypeError):
            return None  # not ours to read: treated as no owner, so it expires unused

    async def refresh(self, owner: Owner) -> bool | None:
        """Extend our record: ``False`` if another replica holds the run now, ``None`` if
        NATS could not be asked (the record then lives until its TTL)."""
        value = self._value(owner.seq)
        try:
            try:
                owner.revision = await self._kv.update(owner.run_id, value, last=owner.revision)
            except KeyWrongLastSequenceError:
                # Expired while we were cut off; ours again unless someone took it since.
                owner.revision = await self._kv.create(owner.run_id, value)
        except KeyWrongLastSequenceError:
            return False
        except nats.errors.Error as exc:
            log.warning(
                "owner record not refreshed", extra={"run_id": owner.run_id, "error": str(exc)}
            )
            return None
        return True

    async def release(self, owner: Owner) -> None:
        """Delete our record (only if still ours), so a retry elsewhere needn't wait."""
        try:
            await self._kv.delete(owner.run_id, last=owner.revision)
        except nats.errors.Error as exc:
            # Not ours any more, or NATS is away: the record expires by itself.
            log.debug("owner record kept", extra={"run_id": owner.run_id, "error": str(exc)})

    def _value(self, seq: int) -> bytes:
        return json.dumps({"replica": self.replica, "seq": seq}).encode()
