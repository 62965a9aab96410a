"""Deduplication of invocations on a function host.

The dispatcher sends each attempt with a stable id (``<run>/<step>/<attempt>``). The same
id can arrive twice: the dispatcher re-sends after losing a response, a broker redelivers,
Lambda retries an asynchronous invocation. Running the function again would repeat its
effect (a second dump, a second notification), so:

* while the first call is running, a repeat joins it and gets the same answer;
* once it has finished, a repeat gets the stored answer, for ``ttl`` seconds, from a cache
  bounded to ``max_entries`` (least recently used first out).

The call runs in the first caller's task; joiners wait on a future it settles. A caller
whose client went away keeps running (aiohttp does not cancel such handlers), so the
effect completes and its answer is there for the repeat that follows.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["InvocationCache", "Joined", "KeyConflict"]

T = TypeVar("T")


@dataclass(frozen=True)
class Joined(Generic[T]):
    value: T
    replayed: bool  # True when another call with the same key produced it


class KeyConflict(Exception):
    """The key is known but was used for something else (another function)."""

    def __init__(self, tag: str) -> None:
        super().__init__(tag)
        self.tag = tag


class InvocationCache(Generic[T]):
    def __init__(
        self,
        ttl: float,
        max_entries: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= 0 or max_entries < 1:
            raise ValueError("ttl must be > 0 and max_entries >= 1")
        self._ttl = ttl
        self._max = max_entries
        self._clock = clock
        self._running: dict[Hashable, tuple[str, asyncio.Future[T]]] = {}
        self._done: OrderedDict[Hashable, tuple[float, str, T]] = OrderedDict()

    async def run(self, key: Hashable, tag: str, call: Callable[[], Awaitable[T]]) -> Joined[T]:
        """``call()``'s result for ``key``: computed now, joined, or replayed.

        ``tag`` says what the key is for (the function name): :class:`KeyConflict` if the
        key is known with another tag, rather than answering for the wrong function.
        """
        stored = self._stored(key)
        if stored is not None:
            self._check(stored[0], tag)
            return Joined(stored[1], replayed=True)
        running = self._running.get(key)
        if running is not None:
            self._check(running[0], tag)
            # shield: a joiner that goes away must not cancel the call it joined.
            return Joined(await asyncio.shield(running[1]), replayed=True)
        settled: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._running[key] = (tag, settled)
        try:
            value = await call()
        except asyncio.CancelledError:
            settled.cancel()
            raise
        except BaseException as exc:
            settled.set_exception(exc)
            settled.exception()  # marks it retrieved: without joiners nobody looks at it
            raise
        finally:
            del self._running[key]
        settled.set_result(value)
        self._remember(key, tag, value)
        return Joined(value, replayed=False)

    @property
    def running(self) -> int:
        """Calls in progress now."""
        return len(self._running)

    def __len__(self) -> int:
        """Finished invocations remembered (some may have expired since)."""
        return len(self._done)

    def _check(self, known: str, tag: str) -> None:
        if known != tag:
            raise KeyConflict(known)

    def _stored(self, key: Hashable) -> tuple[str, T] | None:
        entry = self._done.get(key)
        if entry is None:
            return None
        expires, tag, value = entry
        if expires <= self._clock():
            del self._done[key]
            return None
        self._done.move_to_end(key)
        return tag, value

    def _remember(self, key: Hashable, tag: str, value: T) -> None:
        now = self._clock()
        self._done[key] = (now + self._ttl, tag, value)
        self._done.move_to_end(key)
        self._expire(now)

    def _expire(self, now: float) -> None:
        done = self._done
        while len(done) > self._max:
            done.popitem(last=False)
        while done and next(iter(done.values()))[0] <= now:
            done.popitem(last=False)
