"""What one run does with freeze leases: takes them for its freeze steps, claims the ones
its post steps release, stands down when another releaser got there first, undoes freezes
that land after their lease ended, and releases the rest when the phase ends.

The lease life cycle itself (compare-and-set, release calls, the reaper) is in
:mod:`dispatcher.leases`; this is the runner's side of it.
"""

from __future__ import annotations

import logging
from typing import Any

from dispatcher.execution import Execution
from dispatcher.journal import Journal, LeaseRecord, LeaseStatus
from dispatcher.leases import LeaseManager, LeaseReleaseError
from dispatcher.planner import PlannedStep
from dispatcher.templating import TemplateEngine

log = logging.getLogger("snaphook.leases")


class RunLeases:
    def __init__(self, journal: Journal, leases: LeaseManager, engine: TemplateEngine) -> None:
        self._journal = journal
        self._leases = leases
        self._engine = engine

    async def load(self, ex: Execution, *, fresh: bool) -> None:
        """The run's own leases, and in a post phase those of the same target and backup."""
        # A run accepted a moment ago has taken no lease yet.
        own = [] if fresh else await self._journal.find_leases(run_id=ex.run.run_id)
        inherited: list[LeaseRecord] = []
        if ex.plan.phase.is_post:
            inherited = [
                lease
                for lease in await self._journal.find_leases(target=ex.run.subject)
                if lease.backup_id == ex.backup_id and lease.run_id != ex.run.run_id
            ]
        # Oldest first: ``leases.<step>`` shows the newest, but every one is released.
        for lease in [*inherited, *own]:
            ex.leases[lease.step] = lease
            ex.all_leases.append(lease)
            ex.lease_outputs[lease.lease_id] = await self._outputs_of(lease)

    async def _outputs_of(self, lease: LeaseRecord) -> dict[str, Any]:
        for step in await self._journal.get_steps(lease.run_id):
            if step.name == lease.step:
                return step.outputs or {}
        return {}

    async def for_attempt(
        self, ex: Execution, planned: PlannedStep, scope: dict[str, Any]
    ) -> LeaseRecord:
        """This step's open lease, taken now if it has none (or its last one already ended:
        released by the reaper or a post run while an earlier attempt was freezing)."""
        assert planned.spec.lease is not None
        lease = ex.leases.get(planned.name)
        if lease is not None and lease.run_id == ex.run.run_id:
            await self._leases.refresh(lease)
            if lease.status is LeaseStatus.OPEN:
                return lease
        # Journaled before the function runs: a crash mid-freeze still leaves a lease.
        masked = {**scope, "params": ex.masked_params}
        lease = await self._leases.take(ex.run, planned.name, planned.spec.lease, masked)
        ex.leases[planned.name] = lease
        ex.all_leases.append(lease)
        return lease

    async def done_elsewhere(self, ex: Execution, planned: PlannedStep) -> str | None:
        """For a step that releases leases: why there is nothing left for it to do, if so.

        Lease states are re-read first, and the step claims its leases before running, so
        it never calls a release function that the reaper or another run already called.
        """
        leases = ex.releasable(planned, self._engine)
        if not leases and not ex.released_names(planned, self._engine):
            return None
        for lease in leases:
            await self._leases.refresh(lease)
        reason = ex.nothing_to_release(planned, self._engine)
        if reason is None and not await self._claim(ex, planned):
            reason = "nothing to release: another releaser has the lease"
        return reason

    async def _claim(self, ex: Execution, planned: PlannedStep) -> bool:
        """Claim the open leases this step releases; whether it holds any now."""
        claimed = ex.claimed.setdefault(planned.name, [])
        for lease in ex.releasable(planned, self._engine):
            if (
                lease.status is LeaseStatus.OPEN
                and lease not in claimed
                and await self._leases.claim(lease, self._by_step(ex, planned))
            ):
                claimed.append(lease)
        return bool(claimed)

    async def unclaim(self, ex: Execution, planned: PlannedStep) -> None:
        for lease in ex.claimed.pop(planned.name, []):
            await self._leases.unclaim(lease)

    async def released_by_step(
        self, ex: Execution, planned: PlannedStep, outputs: dict[str, Any]
    ) -> None:
        """The releasing step succeeded: the leases it claimed are released."""
        for lease in ex.claimed.pop(planned.name, []):
            await self._leases.mark_released(lease, self._by_step(ex, planned), outputs)

    async def check_late_freeze(self, ex: Execution, planned: PlannedStep) -> None:
        """A freeze that succeeded after its lease ended is undone at once."""
        lease = ex.leases.get(planned.name)
        if lease is None or lease.run_id != ex.run.run_id:
            return
        await self._leases.refresh(lease)
        if lease.status is not LeaseStatus.OPEN:
            try:
                await self._leases.release_again(lease, f"released by {lease.released_by}")
            except LeaseReleaseError as exc:
                ex.lease_errors.append(str(exc))

    async def release_quietly(self, leases: list[LeaseRecord], by: str, ex: Execution) -> bool:
        """Release, recording failures on the run instead of raising."""
        try:
            await self._leases.release_all(leases, by)
        except LeaseReleaseError as exc:
            ex.lease_errors.append(str(exc))
            return False
        return True

    async def end(self, ex: Execution) -> None:
        """Post phase: release what the steps did not. Failed run: release what it took."""
        targets: list[LeaseRecord] = []
        if ex.plan.phase.is_post:
            targets += [lease for lease in ex.all_leases if lease.run_id != ex.run.run_id]
        if ex.failed:
            targets += [lease for lease in ex.all_leases if lease.run_id == ex.run.run_id]
        if not targets:
            return
        by = f"post:{ex.run.run_id}" if ex.plan.phase.is_post else "run-failed"
        fresh = [await self._journal.get_lease(lease.lease_id) for lease in targets]
        await self.release_quietly([lease for lease in fresh if lease is not None], by, ex)

    async def release_run(self, run_id: str) -> None:
        """A run abandoned without executing (blueprint gone or changed): undo its leases."""
        leases = await self._journal.find_leases(run_id=run_id)
        try:
            await self._leases.release_all(leases, "run-failed")
        except LeaseReleaseError as exc:
            log.error("lease release failed", extra={"run_id": run_id, "error": str(exc)})

    @staticmethod
    def _by_step(ex: Execution, planned: PlannedStep) -> str:
        return f"step:{ex.run.run_id}/{planned.name}"
