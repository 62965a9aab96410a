"""Execute a run's plan: the DAG of main steps, the phase decision, then finalizers.

Every state change is written to the journal before it is acted on, so a restarted
dispatcher resumes each unfinished run from its records: a step that was *running* when
the process died is failed as ``interrupted`` (its effect is unknown), a step waiting to
retry continues with its next attempt, and the run's finalizers still run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from dispatcher.blueprints import Blueprint, BlueprintSet
from dispatcher.errors import JournalError, StepTakenError
from dispatcher.events import Phase
from dispatcher.execution import Execution
from dispatcher.invokers import Invocation, Invoker
from dispatcher.journal import (
    Journal,
    RunRecord,
    RunStatus,
    StepRecord,
    StepStatus,
)
from dispatcher.leases import LeaseManager
from dispatcher.metrics import Metrics
from dispatcher.planner import PlannedStep, make_plan
from dispatcher.redaction import redactor
from dispatcher.retrying import Failure, backoff_delay, classify
from dispatcher.run_leases import RunLeases
from dispatcher.templating import TemplateEngine
from dispatcher.waiters import Waiters

log = logging.getLogger("snaphook.runner")

FinalHook = Callable[[RunRecord, list[StepRecord]], Awaitable[None]]
INTERRUPTED = "interrupted: the dispatcher stopped while this step was running"


class Runner:
    def __init__(
        self,
        journal: Journal,
        invoker: Invoker,
        leases: LeaseManager,
        engine: TemplateEngine,
        blueprints: Callable[[], BlueprintSet],
        metrics: Metrics,
        *,
        on_final: FinalHook | None = None,
        max_concurrent: int = 256,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._journal = journal
        self._invoker = invoker
        self._leases = leases
        self._run_leases = RunLeases(journal, leases, engine)
        self._engine = engine
        self._blueprints = blueprints
        self._metrics = metrics
        self.on_final = on_final  # set after construction when replies are configured
        self._slots = asyncio.Semaphore(max_concurrent)
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._fresh: dict[str, tuple[RunRecord, list[StepRecord]]] = {}
        self._executions: dict[str, Execution] = {}
        self._settled: dict[str, tuple[bool, str]] = {}  # answers given before execution
        self._decided = Waiters()
        self._finished = Waiters()

    # -- public interface -------------------------------------------------------------

    def submit(
        self, run_id: str, *, fresh: tuple[RunRecord, list[StepRecord]] | None = None
    ) -> None:
        """Start executing a journaled run (no-op if it is already executing).

        ``fresh`` is the run and steps just accepted: handing them over in memory saves
        re-reading what was written a moment ago.
        """
        if run_id in self._tasks:
            return
        if fresh is not None:
            self._fresh[run_id] = fresh
        task = asyncio.create_task(self._guarded(run_id), name=f"run {run_id}")
        self._tasks[run_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(run_id, None))

    async def recover(self) -> int:
        """Resume every run the journal says is unfinished."""
        runs = await self._journal.unfinished_runs()
        for run in runs:
            self.submit(run.run_id)
        return len(runs)

    async def wait_decision(self, run_id: str, timeout: float) -> RunRecord | None:
        """The run once its phase is decided, or as it stands when ``timeout`` expires."""
        return await self._decided.wait(
            run_id, timeout, lambda: self._journal.get_run(run_id), lambda r: r.allowed is not None
        )

    async def wait_final(self, run_id: str, timeout: float) -> RunRecord | None:
        return await self._finished.wait(
            run_id, timeout, lambda: self._journal.get_run(run_id), lambda r: r.status.final
        )

    async def settle(self, run_id: str, allowed: bool, reason: str) -> RunRecord | None:
        """Make an answer already given (on a decision timeout) the run's decision.

        A caller told "denied" will neither snapshot nor send the post event, so the run
        must stop and release what it froze; told "allowed", the run simply goes on.
        Returns the run; a decision that landed first wins and is returned instead.
        """
        ex = self._executions.get(run_id)
        if ex is not None:
            if ex.run.allowed is None:
                await self._record_decision(ex, allowed, reason)
            return ex.run
        # Not executing yet (waiting for a slot, or being prepared): remembered before any
        # await, so the execution applies it as soon as it registers.
        self._settled.setdefault(run_id, (allowed, reason))
        run = await self._journal.get_run(run_id)
        if run is None or run.status.final:
            self._settled.pop(run_id, None)  # nothing will execute to apply it
        elif run.allowed is None:
            await self._journal.update_run(run_id, allowed=allowed, reason=reason)
            run.allowed, run.reason = allowed, reason
        return run

    async def execute(self, run_id: str) -> None:
        """Execute a journaled run here; return once this process is done with it.

        Done is final, or given up (another replica claimed a step, the journal failed):
        the caller reads the journal to tell which. Cancelling the caller cancels the run,
        which stays unfinished in the journal. A queue that acknowledges a run only once it
        is final uses this instead of :meth:`submit`.
        """
        self.submit(run_id)
        task = self._tasks.get(run_id)
        if task is not None:
            await task

    async def notify(self, run_id: str) -> None:
        """The run's journal record changed, maybe on another replica: catch up here.

        Wakes this process's ``wait_decision``/``wait_final`` callers once the record shows
        their milestone (not before: a wake-up returns the run as it stands), and gives an
        execution running here a decision that ``settle()`` journaled on another replica,
        as if it had been settled here.
        """
        ex = self._executions.get(run_id)
        if not (
            (ex is not None and ex.run.allowed is None)
            or run_id in self._settled
            or run_id in self._decided
            or run_id in self._finished
        ):
            return  # the common case on a busy replica: nobody here cares, no read
        run = await self._journal.get_run(run_id)
        if run is None:
            return
        if run.allowed is not None:
            ex = self._executions.get(run_id)
            if ex is not None and ex.run.allowed is None:
                # Journaled already by the replica that answered: applied, not written again.
                ex.run.allowed, ex.run.reason = run.allowed, run.reason
                log.info(
                    "phase decided elsewhere",
                    extra=ex.log_fields(allowed=run.allowed, reason=run.reason),
                )
            self._decided.signal(run_id)
        if run.status.final:
            self._settled.pop(run_id, None)  # settled here, executed elsewhere
            self._finished.signal(run_id)

    async def close(self, grace: float) -> None:
        """Let running runs finish for ``grace`` seconds, then cancel the rest.

        A cancelled run stays unfinished in the journal and is resumed at the next start.
        """
        tasks = list(self._tasks.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    @property
    def active(self) -> int:
        return len(self._tasks)

    # -- one run ------------------------------------------------------------------------

    async def _guarded(self, run_id: str) -> None:
        try:
            async with self._slots:
                await self._execute(run_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if _caused_by(exc, StepTakenError):
                log.info("run taken over by another replica", extra={"run_id": run_id})
                return
            if _caused_by(exc, JournalError):
                # A journal outage mid-run: the run stays unfinished and resumes later.
                log.exception(
                    "run aborted; it will resume from the journal", extra={"run_id": run_id}
                )
                return
            # A bug must not leave a run (and its leases) hanging until the next restart.
            log.exception("run failed unexpectedly", extra={"run_id": run_id})
            run = await self._journal.get_run(run_id)
            if run is not None and not run.status.final:
                reason = redactor.redact(f"internal error: {type(exc).__name__}: {exc}")
                await self._abandon(run, reason)
        finally:
            self._settled.pop(run_id, None)

    async def _execute(self, run_id: str) -> None:
        fresh = self._fresh.pop(run_id, None)
        run = fresh[0] if fresh is not None else await self._journal.get_run(run_id)
        if run is None or run.status.final:
            self._decided.signal(run_id)
            self._finished.signal(run_id)
            return
        blueprint = self._blueprints().get(run.blueprint)
        phase = Phase.from_event_type(run.type)
        if blueprint is None or phase is None:
            await self._abandon(run, f"blueprint {run.blueprint!r} is no longer loaded")
            return
        ex = await self._prepare(run, blueprint, phase, fresh[1] if fresh else None)
        if ex is None:
            return
        self._executions[run_id] = ex
        settled = self._settled.pop(run_id, None)
        if settled is not None and ex.run.allowed is None:
            ex.run.allowed, ex.run.reason = settled  # settle() journaled it already
        try:
            await self._run_main(ex)
            await self._decide(ex)
            await self._run_finalizers(ex)
            await self._run_leases.end(ex)
            await self._finish(ex)
        finally:
            self._executions.pop(run_id, None)

    async def _prepare(
        self,
        run: RunRecord,
        blueprint: Blueprint,
        phase: Phase,
        fresh_steps: list[StepRecord] | None,
    ) -> Execution | None:
        plan = make_plan(
            blueprint,
            phase,
            params=run.params,
            failure_policy=run.failure_policy,
            timeout=run.decision_timeout or 30.0,
        )
        steps = fresh_steps
        if steps is None:
            steps = await self._journal.get_steps(run.run_id)
        if {s.name for s in steps} != {p.name for p in plan.steps}:
            await self._abandon(
                run,
                f"blueprint {run.blueprint!r} changed since the run started (its steps differ); "
                "the run cannot resume",
            )
            return None
        # A resumed run re-teaches the redactor its secret params (the process is new);
        # a blueprint edited since may no longer accept them, which is fine here.
        with contextlib.suppress(ValueError):
            blueprint.resolve_params(run.params)
        ex = Execution(
            run=run,
            plan=plan,
            steps={s.name: s for s in steps},
            release_functions=blueprint.release_functions(),
            masked_params=blueprint.masked_params(run.params),
        )
        if run.status is RunStatus.ACCEPTED:
            # Written together with the first step's "running" record (same group commit).
            ex.starting = True
        log.info("run started", extra=ex.log_fields(blueprint=run.blueprint))
        await self._run_leases.load(ex, fresh=fresh_steps is not None)
        for step in steps:
            if step.status is StepStatus.RUNNING:
                await self._step_failed(ex, plan.step(step.name), INTERRUPTED)
        return ex

    async def _abandon(self, run: RunRecord, reason: str) -> None:
        await self._journal.update_run(
            run.run_id, status=RunStatus.FAILED, allowed=False, reason=reason
        )
        run.status, run.allowed, run.reason = RunStatus.FAILED, False, reason
        self._decided.signal(run.run_id)
        await self._run_leases.release_run(run.run_id)
        await self._complete(run)

    # -- the DAG ------------------------------------------------------------------------

    async def _run_main(self, ex: Execution) -> None:
        await self._run_dag(ex, ex.plan.main, stop_on_failure=True)

    async def _run_finalizers(self, ex: Execution) -> None:
        wanted = [p for p in ex.plan.finalizers if p.spec.when == "always" or ex.failed]
        for planned in ex.plan.finalizers:
            if planned not in wanted and not ex.steps[planned.name].status.final:
                await self._set_step(
                    ex, planned.name, status=StepStatus.SKIPPED, error="the run succeeded"
                )
        await self._run_dag(ex, wanted, stop_on_failure=False)

    async def _run_dag(
        self, ex: Execution, planned: list[PlannedStep], *, stop_on_failure: bool
    ) -> None:
        pending = [p for p in planned if not ex.steps[p.name].status.final]
        running: dict[str, asyncio.Task[None]] = {}
        async with asyncio.TaskGroup() as group:
            while pending or running:
                for step, reason in ex.blocked(pending, stop_on_failure=stop_on_failure):
                    pending.remove(step)
                    await self._set_step(ex, step.name, status=StepStatus.SKIPPED, error=reason)
                for step in ex.ready(pending):
                    pending.remove(step)
                    running[step.name] = group.create_task(self._run_step(ex, step))
                if not running:
                    break
                done, _ = await asyncio.wait(running.values(), return_when=asyncio.FIRST_COMPLETED)
                for name in [n for n, t in running.items() if t in done]:
                    del running[name]

    # -- one step -----------------------------------------------------------------------

    async def _run_step(self, ex: Execution, planned: PlannedStep) -> None:
        try:
            await self._attempts(ex, planned)
        finally:
            # However the step ended (cancelled at shutdown, a journal error), a lease it
            # claimed must not stay "releasing" until the next restart.
            if ex.claimed.get(planned.name):
                await self._run_leases.unclaim(ex, planned)

    async def _attempts(self, ex: Execution, planned: PlannedStep) -> None:
        spec = planned.spec
        attempt = ex.steps[spec.name].attempts
        while True:
            skip = await self._run_leases.done_elsewhere(ex, planned)
            if skip is not None:
                await self._set_step(ex, spec.name, status=StepStatus.SKIPPED, error=skip)
                log.info("step skipped", extra=ex.log_fields(step=spec.name, reason=skip))
                return
            attempt += 1
            await self._mark_running(ex, spec.name, attempt)
            log.info("step started", extra=ex.log_fields(step=spec.name, attempt=attempt))
            started = time.monotonic()
            try:
                outputs = await self._attempt(ex, planned, attempt)
            except Exception as exc:
                failure = classify(exc, timeout=spec.timeout)
                self._observe(spec.function, "error", started)
                if failure.retryable and attempt < spec.retry.attempts:
                    await self._retry_later(ex, planned, attempt, failure)
                    continue
                await self._step_failed(ex, planned, failure.message)
                return
            self._observe(spec.function, "ok", started)
            await self._step_succeeded(ex, planned, outputs)
            return

    async def _attempt(self, ex: Execution, planned: PlannedStep, attempt: int) -> dict[str, Any]:
        spec = planned.spec
        scope = ex.scope()
        params = await self._engine.render(spec.with_, scope, namespace=ex.namespace)
        lease_id = None
        if spec.lease is not None:
            lease = await self._run_leases.for_attempt(ex, planned, scope)
            lease_id = lease.lease_id
        invocation = Invocation(
            function=spec.function,
            params=params,
            event=ex.event,
            run_id=ex.run.run_id,
            step=spec.name,
            attempt=attempt,
            timeout=spec.timeout,
            outputs={name: s.get("outputs", {}) for name, s in scope["steps"].items()},
            lease_id=lease_id,
            remote_url=spec.invoke.url if spec.invoke is not None else None,
        )
        async with asyncio.timeout(spec.timeout):
            return await self._invoker.invoke(invocation)

    async def _retry_later(
        self, ex: Execution, planned: PlannedStep, attempt: int, failure: Failure
    ) -> None:
        retry = planned.spec.retry
        delay = failure.delay
        if delay is None:
            delay = backoff_delay(attempt, base=retry.backoff, cap=retry.max_backoff, rng=self._rng)
        # PENDING while waiting: a restart resumes with the next attempt instead of failing.
        await self._set_step(
            ex,
            planned.name,
            status=StepStatus.PENDING,
            error=f"attempt {attempt} failed: {failure.message}; retrying in {delay:.2f}s",
        )
        await self._run_leases.unclaim(ex, planned)
        log.warning(
            "step retrying",
            extra=ex.log_fields(step=planned.name, attempt=attempt, delay=round(delay, 3)),
        )
        await self._sleep(delay)

    async def _step_succeeded(
        self, ex: Execution, planned: PlannedStep, outputs: dict[str, Any]
    ) -> None:
        if planned.spec.lease is not None:
            await self._run_leases.check_late_freeze(ex, planned)
        await self._set_step(
            ex,
            planned.name,
            status=StepStatus.SUCCEEDED,
            outputs=outputs,
            error=None,
            finished_at=self._clock(),
        )
        await self._run_leases.released_by_step(ex, planned, outputs)
        log.info("step succeeded", extra=ex.log_fields(step=planned.name))

    async def _step_failed(self, ex: Execution, planned: PlannedStep, message: str) -> None:
        await self._set_step(
            ex, planned.name, status=StepStatus.FAILED, error=message, finished_at=self._clock()
        )
        log.warning("step failed", extra=ex.log_fields(step=planned.name, error=message))
        await self._run_leases.unclaim(ex, planned)
        own = ex.leases.get(planned.name)
        if planned.spec.lease is not None and own is not None and own.run_id == ex.run.run_id:
            # The freeze may have half-happened: undo it now rather than at TTL.
            await self._run_leases.release_quietly([own], "step-failed", ex)
        if planned.spec.on_error == "fail" and not planned.final and ex.run.allowed is None:
            await self._record_decision(ex, False, f"step {planned.name} failed: {message}")

    # -- decision and end -------------------------------------------------------------------

    async def _decide(self, ex: Execution) -> None:
        if ex.run.allowed is not None:
            return
        statuses = [ex.steps[p.name].status for p in ex.plan.main]
        done = statuses.count(StepStatus.SUCCEEDED)
        reason = f"{done} step(s) succeeded"
        if len(statuses) > done:
            reason += f", {len(statuses) - done} skipped or tolerated"
        if not ex.plan.finalizers and not ex.all_leases:
            # Nothing runs after the decision: _finish writes both at once.
            ex.run.allowed, ex.run.reason = True, reason
            ex.decision_pending = True
            return
        await self._record_decision(ex, True, reason)

    async def _record_decision(self, ex: Execution, allowed: bool, reason: str) -> None:
        # Set in memory before the write: a concurrent settle() sees it at once.
        ex.run.allowed, ex.run.reason = allowed, reason
        await self._journal.update_run(ex.run.run_id, allowed=allowed, reason=reason)
        log.info("phase decided", extra=ex.log_fields(allowed=allowed, reason=reason))
        self._decided.signal(ex.run.run_id)

    async def _finish(self, ex: Execution) -> None:
        failed_final = [p.name for p in ex.plan.finalizers if ex.final_failed(p)]
        reason = ex.run.reason
        if failed_final:
            reason += f"; finalizer(s) failed: {', '.join(failed_final)}"
        if ex.lease_errors:
            reason += "; lease release failed: " + "; ".join(ex.lease_errors)
        ok = not ex.failed and not failed_final and not ex.lease_errors
        status = RunStatus.SUCCEEDED if ok else RunStatus.FAILED
        changes: dict[str, Any] = {"status": status, "reason": reason}
        if ex.decision_pending:
            changes["allowed"] = ex.run.allowed
            log.info("phase decided", extra=ex.log_fields(allowed=ex.run.allowed, reason=reason))
        await self._journal.update_run(ex.run.run_id, **changes)
        ex.run.status, ex.run.reason = status, reason
        await self._complete(ex.run, list(ex.steps.values()))

    async def _complete(self, run: RunRecord, steps: list[StepRecord] | None = None) -> None:
        self._metrics.runs.labels(outcome=run.status.value).inc()
        log.info("run finished", extra={"run_id": run.run_id, "status": run.status.value})
        self._decided.signal(run.run_id)
        self._finished.signal(run.run_id)
        if self.on_final is not None:
            if steps is None:
                steps = await self._journal.get_steps(run.run_id)
            await self.on_final(run, steps)

    async def _mark_running(self, ex: Execution, name: str, attempt: int) -> None:
        record = ex.steps[name]
        started_at = record.started_at or self._clock()
        claim = self._journal.claim_step(ex.run.run_id, name, attempt, started_at)
        if ex.starting:
            ex.starting = False
            ex.run.status = RunStatus.RUNNING
            # Both land in one group commit: one disk sync on the way to the first step.
            _, won = await asyncio.gather(
                self._journal.update_run(ex.run.run_id, status=RunStatus.RUNNING), claim
            )
        else:
            won = await claim
        if not won:
            # Another replica started this attempt: calling the function here would double
            # its effect. The winner carries the run on.
            raise StepTakenError(f"step {name!r} attempt {attempt} was claimed elsewhere")
        record.status, record.attempts, record.started_at = StepStatus.RUNNING, attempt, started_at

    async def _set_step(self, ex: Execution, name: str, **changes: Any) -> None:
        await self._journal.update_step(ex.run.run_id, name, **changes)
        record = ex.steps[name]
        for key, value in changes.items():
            setattr(record, key, value)

    def _observe(self, function: str, result: str, started: float) -> None:
        self._metrics.step_duration.labels(function=function, result=result).observe(
            time.monotonic() - started
        )


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``exc`` is ``kind`` or a task group's exception group holding one."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(kind) is not None
    return isinstance(exc, kind)
