"""Freeze leases — the safety property: no code path leaves a database frozen.

A step with ``lease:`` records the lease *before* its function runs (so a crash in the
middle of freezing still leaves a lease to release); the release function must therefore
tolerate "not frozen". A lease ends by exactly one of:

* a post-phase step that calls the release function with ``leases.<step>``;
* the post run itself, which releases what its steps did not;
* the run that took it failing;
* the reaper, when ``expires_at`` passes (post event lost, dispatcher restarted, ...).

Every end goes through a compare-and-set on the lease status, so exactly one wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dispatcher.blueprints import LeaseSpec
from dispatcher.invokers import Invocation, Invoker
from dispatcher.journal import Journal, LeaseRecord, LeaseStatus, RunRecord, StepStatus
from dispatcher.metrics import Metrics
from dispatcher.retrying import backoff_delay, classify
from dispatcher.scope import LeaseView, event_info
from dispatcher.templating import TemplateEngine
from functions.sdk import EventInfo, FunctionRegistry

log = logging.getLogger("snaphook.leases")

RELEASE_ATTEMPTS = 3
RELEASE_TIMEOUT = 60.0
RELEASE_BACKOFF = 1.0


class LeaseReleaseError(Exception):
    """One or more releases failed; every release was still attempted."""

    def __init__(self, failures: Sequence[tuple[str, str]]) -> None:
        self.failures = list(failures)
        super().__init__("; ".join(f"lease {lid}: {msg}" for lid, msg in failures))


class LeaseManager:
    def __init__(
        self,
        journal: Journal,
        invoker: Invoker,
        engine: TemplateEngine,
        registry: FunctionRegistry,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self._journal = journal
        self._invoker = invoker
        self._engine = engine
        self._registry = registry
        self._metrics = metrics
        self._clock = clock
        self._sleep = sleep

    async def take(
        self, run: RunRecord, step: str, spec: LeaseSpec, scope: Mapping[str, Any]
    ) -> LeaseRecord:
        """Record a lease for ``step`` before its function freezes anything."""
        now = self._clock()
        lease = LeaseRecord(
            lease_id=f"lease-{uuid.uuid4().hex[:16]}",
            run_id=run.run_id,
            step=step,
            target=run.subject,
            backup_id=str((run.event.get("data") or {}).get("backup", {}).get("id", "")),
            release_function=spec.release.function,
            release_with=dict(spec.release.with_),
            context={k: v for k, v in scope.items() if k not in ("leases",)},
            expires_at=now + spec.ttl,
            created_at=now,
        )
        await self._journal.put_lease(lease)
        self._metrics.open_leases.inc()
        log.info("lease taken", extra=_fields(lease, ttl=spec.ttl))
        return lease

    async def claim(self, lease: LeaseRecord, by: str) -> bool:
        """Reserve a lease for a releaser (a post step); ``False`` if someone else has it.

        The record passed in is updated too, so in-memory views never act on stale state.
        """
        won = await self._journal.transition_lease(
            lease.lease_id, LeaseStatus.OPEN, status=LeaseStatus.RELEASING, released_by=by
        )
        if won:
            lease.status, lease.released_by = LeaseStatus.RELEASING, by
        return won

    async def unclaim(self, lease: LeaseRecord) -> None:
        """Hand a claimed lease back (its releasing step failed): the next releaser tries."""
        if await self._journal.transition_lease(
            lease.lease_id, LeaseStatus.RELEASING, status=LeaseStatus.OPEN, released_by=None
        ):
            lease.status, lease.released_by = LeaseStatus.OPEN, None

    async def refresh(self, lease: LeaseRecord) -> LeaseRecord:
        """Bring ``lease`` up to date with the journal (another releaser may have acted)."""
        current = await self._journal.get_lease(lease.lease_id)
        if current is not None:
            lease.status, lease.released_by = current.status, current.released_by
            lease.released_at, lease.error = current.released_at, current.error
        return lease

    async def mark_released(
        self, lease: LeaseRecord, by: str, outputs: dict[str, Any] | None = None
    ) -> None:
        now = self._clock()
        await self._journal.transition_lease(
            lease.lease_id,
            LeaseStatus.RELEASING,
            status=LeaseStatus.RELEASED,
            released_at=now,
            released_by=by,
            release_outputs=outputs,
        )
        lease.release_outputs = outputs
        lease.status, lease.released_at, lease.released_by = LeaseStatus.RELEASED, now, by
        self._metrics.open_leases.dec()
        log.info("lease released", extra=_fields(lease, by=by))

    async def release_again(self, lease: LeaseRecord, why: str) -> None:
        """Undo a freeze that finished after its lease had already been released.

        (A post run or the reaper released the lease while the freeze was still running;
        the release then found nothing frozen, and the freeze happened afterwards.)
        """
        log.warning("late freeze: releasing again", extra=_fields(lease, why=why))
        try:
            await self._call_release(lease)
        except Exception as exc:
            message = classify(exc, timeout=RELEASE_TIMEOUT).message
            self._metrics.lease_release_failures.inc()
            log.error("lease re-release failed", extra=_fields(lease, error=message))
            raise LeaseReleaseError([(lease.lease_id, message)]) from None

    async def release(self, lease: LeaseRecord, by: str, *, claimed: bool = False) -> bool:
        """Call the lease's release function; ``False`` if another releaser owns it."""
        if not claimed and not await self.claim(lease, by):
            return False
        lease.status = LeaseStatus.RELEASING
        try:
            outputs = await self._call_release(lease)
        except Exception as exc:  # one failing release must not stop the others
            message = classify(exc, timeout=RELEASE_TIMEOUT).message
            await self._journal.transition_lease(
                lease.lease_id,
                LeaseStatus.RELEASING,
                status=LeaseStatus.FAILED,
                released_at=self._clock(),
                released_by=by,
                error=message,
            )
            lease.status, lease.error = LeaseStatus.FAILED, message
            self._metrics.open_leases.dec()
            self._metrics.lease_release_failures.inc()
            log.error("lease release failed", extra=_fields(lease, by=by, error=message))
            raise LeaseReleaseError([(lease.lease_id, message)]) from None
        await self.mark_released(lease, by, outputs)
        return True

    async def release_all(self, leases: Sequence[LeaseRecord], by: str) -> int:
        """Release every lease concurrently; failures are aggregated into one error."""
        results = await asyncio.gather(
            *(self.release(lease, by) for lease in leases), return_exceptions=True
        )
        failures: list[tuple[str, str]] = []
        for result in results:
            if isinstance(result, LeaseReleaseError):
                failures.extend(result.failures)
            elif isinstance(result, BaseException):
                raise result  # a journal failure: nothing was decided, let the caller retry
        if failures:
            raise LeaseReleaseError(failures)
        return sum(1 for r in results if r is True)

    async def reap_once(self) -> int:
        """Release every expired lease, and re-release those a crash left mid-release."""
        now = self._clock()
        expired = await self._journal.expired_leases(now)
        count = 0
        try:
            count = await self.release_all(expired, "reaper")
        except LeaseReleaseError as exc:
            log.error("reaper could not release some leases", extra={"error": str(exc)})
        return count

    async def recover(self) -> int:
        """After a restart: leases claimed by a releaser that died are released now."""
        stuck = await self._journal.find_leases(status=LeaseStatus.RELEASING)
        open_count = len(await self._journal.find_leases(status=LeaseStatus.OPEN))
        self._metrics.open_leases.set(open_count + len(stuck))
        done = 0
        for lease in stuck:
            # A failure is recorded on the lease as FAILED with its reason.
            with contextlib.suppress(LeaseReleaseError):
                done += await self.release(lease, "recovery", claimed=True)
        return done

    async def run_reaper(self, interval: float) -> None:
        while True:
            try:
                await self.reap_once()
            except Exception:
                log.exception("lease reaper pass failed; retrying next interval")
            await self._sleep(interval)

    async def _call_release(self, lease: LeaseRecord) -> dict[str, Any]:
        outputs = await self._freeze_outputs(lease)
        view = LeaseView(lease.lease_id, lease.step, outputs, lease.expires_at)
        scope = {**lease.context, "lease": view}
        # The context keeps secret params masked; the real values live with the run.
        run = await self._journal.get_run(lease.run_id)
        if run is not None:
            scope["params"] = run.params
        namespace = str(lease.context.get("target", {}).get("namespace") or "") or None
        params = await self._engine.render(lease.release_with, scope, namespace=namespace)
        if self._accepts(lease.release_function, "lease") and "lease" not in params:
            params["lease"] = lease.lease_id
        invocation = Invocation(
            function=lease.release_function,
            params=params,
            event=_event_of(lease),
            run_id=lease.run_id,
            step=f"{lease.step}.release",
            attempt=1,
            timeout=RELEASE_TIMEOUT,
            lease_id=lease.lease_id,
        )
        return await self._invoke_with_retry(invocation)

    async def _invoke_with_retry(self, invocation: Invocation) -> dict[str, Any]:
        for attempt in range(1, RELEASE_ATTEMPTS + 1):
            current = Invocation(**{**invocation.__dict__, "attempt": attempt})
            try:
                async with asyncio.timeout(RELEASE_TIMEOUT):
                    return await self._invoker.invoke(current)
            except Exception as exc:
                failure = classify(exc, timeout=RELEASE_TIMEOUT)
                if not failure.retryable or attempt == RELEASE_ATTEMPTS:
                    raise
                delay = failure.delay
                if delay is None:
                    delay = backoff_delay(attempt, base=RELEASE_BACKOFF, cap=30.0)
                await self._sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _accepts(self, function: str, field: str) -> bool:
        spec = self._registry.get(function)
        return spec is not None and field in spec.params_model.model_fields

    async def _freeze_outputs(self, lease: LeaseRecord) -> dict[str, Any]:
        for step in await self._journal.get_steps(lease.run_id):
            if step.name == lease.step and step.status is StepStatus.SUCCEEDED:
                return step.outputs or {}
        return {}


def _event_of(lease: LeaseRecord) -> EventInfo:
    event = lease.context.get("event", {})
    return EventInfo(
        id=str(event.get("id", "")),
        source=str(event.get("source", "")),
        type=str(event.get("type", "")),
        subject=lease.target,
        data=event.get("data") or {},
    )


def _fields(lease: LeaseRecord, **more: Any) -> dict[str, Any]:
    return {"lease_id": lease.lease_id, "run_id": lease.run_id, "step": lease.step, **more}


__all__ = ["LeaseManager", "LeaseReleaseError", "LeaseView", "event_info"]
