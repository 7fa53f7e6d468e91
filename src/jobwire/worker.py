"""The worker runtime: claims jobs under a lease, runs their tasks, keeps leases alive,
delivers cancellation to running tasks, does the store's housekeeping
(expiring dead workers' leases, pruning old jobs) and fires periodic jobs' ticks."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import uuid
from collections.abc import Collection, Coroutine
from typing import Any

from jobwire import periodic
from jobwire.app import Jobwire
from jobwire.context import Cancelled, Context
from jobwire.model import JSON, Event, EventType, Job, Status, now
from jobwire.runner import Runner, error_text
from jobwire.store import End, Lease, LeaseLost, Store, StoreError
from jobwire.text import clip

log = logging.getLogger("jobwire.worker")


@dataclasses.dataclass(frozen=True, slots=True)
class _End:
    """How an attempt ended: a terminal status with its result or error, or QUEUED: a
    retry after `delay` seconds."""

    status: Status
    result: JSON = None
    error: str | None = None
    delay: float = 0.0


class Worker:
    """Runs up to `concurrency` jobs at once from `store` using the tasks of `jobwire`;
    plain `def` tasks on up to `threads` threads (default: `concurrency`), each attempt
    for at most its task's timeout (default: `task_timeout`; None: no limit). Only jobs
    in `queues` (None: in any queue) are claimed."""

    def __init__(
        self,
        jobwire: Jobwire,
        store: Store,
        *,
        concurrency: int = 10,
        lease_seconds: float = 30.0,
        poll_seconds: float = 1.0,
        retention_seconds: float = 24 * 3600,
        worker_id: str | None = None,
        max_items: int = 100_000,
        threads: int | None = None,
        task_timeout: float | None = None,
        queues: Collection[str] | None = None,
    ) -> None:
        self.jobwire = jobwire
        self.store = store
        self.concurrency = concurrency
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self.retention_seconds = retention_seconds
        self.id = worker_id or uuid.uuid4().hex
        self.max_items = max_items
        self.queues = None if queues is None else sorted(set(queues))
        self._running: dict[str, tuple[Context, asyncio.Task[JSON]]] = {}
        self._claiming = 0  # slots of claims under way, not in _running yet
        self._ends: list[End] = []  # to record
        self._recorder: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._jobs: set[asyncio.Task[None]] = set()
        self._runner = Runner(concurrency if threads is None else threads, task_timeout,
                              self._wake.set)
        store.listen(self._hint)

    @property
    def running(self) -> list[str]:
        return list(self._running)

    def _hint(self, job: str, seq: int, ev: Event | None) -> None:
        if ev is None or ev.type in (EventType.CREATED, EventType.RETRYING):
            self._wake.set()  # new work may be waiting
        if ev is not None and ev.type == EventType.CANCEL_REQUESTED:
            self._cancel(job)

    def _cancel(self, job: str) -> None:
        running = self._running.get(job)
        if running is not None:
            ctx, task = running
            ctx.cancelled = True
            task.cancel()

    async def start(self) -> None:
        self._loops = [asyncio.create_task(loop()) for loop in
                       (self._claim_loop, self._heartbeat_loop, self._housekeeping_loop)]
        self._loops.append(asyncio.create_task(periodic.run(self.jobwire, self.store)))

    async def stop(self) -> None:
        """Stop the running tasks and hand their jobs back at once: queued again, the
        attempt not counted (nothing failed), without waiting for their leases to run
        out."""
        self._stopping = True
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self._recorder is not None:  # a claim under way may start jobs: let it land
            await asyncio.gather(self._recorder, return_exceptions=True)
        leases = [ctx.lease for ctx, _ in self._running.values()]
        running = [inner for _, inner in self._running.values()]
        for inner in running:
            inner.cancel()
        # Their done callbacks (_stopped) run before this gather's own, added later.
        await asyncio.gather(*running, return_exceptions=True)
        while self._recorder is not None or self._jobs:  # the ends recorded meanwhile
            await asyncio.gather(*self._jobs, *filter(None, [self._recorder]),
                                 return_exceptions=True)
        if leases:
            try:
                # Jobs whose end was recorded meanwhile are no longer held and untouched.
                await self.store.hand_back(leases)
                # Those with a cancel requested: expired now, by expiry's rules (cancelled).
                await self.store.heartbeat(leases, 0)
                await self.store.expire_leases()
            except StoreError as exc:
                log.warning("could not hand back %d jobs; their leases will expire: %s",
                            len(leases), exc)

    def _free(self) -> tuple[list[str], int]:
        """The tasks to claim and how many jobs: as many as slots are free, counting
        those that claims under way will fill."""
        free = self.concurrency - len(self._running) - self._claiming
        return self._runner.claimable(self.jobwire.tasks, free)

    async def _claim_loop(self) -> None:
        while True:
            # Cleared before the claim, not after: a hint that comes while it runs (a job
            # committed after its snapshot) must still cut the wait below short.
            self._wake.clear()
            names, free = self._free()
            jobs: list[Job] = []
            if free > 0 and names:
                self._claiming += free
                try:
                    jobs = await self.store.claim(self.id, names, free, self.lease_seconds,
                                                  self.queues)
                except StoreError as exc:
                    log.warning("claim failed: %s", exc)
                finally:
                    self._claiming -= free
                self._start(jobs)
            if jobs and len(self._running) < self.concurrency:
                continue  # maybe more waiting
            # Not wait_for: on 3.11 it swallows a cancel that meets a wake-up, and stop()
            # would wait for this loop forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_seconds):
                    await self._wake.wait()

    def _start(self, jobs: list[Job]) -> None:
        for job in jobs:
            if (earlier := self._running.get(job.id)) is not None:
                # Its lease ran out unnoticed (a stalled loop, failing heartbeats) and
                # we claimed the job again: that attempt lost it. Its entry is
                # replaced below, so stop it now, or nothing ever would.
                self._lose(earlier[0].lease)
            lease = Lease(job.id, self.id, job.attempt)
            ctx = Context(job, lease, self.store, self.max_items)
            inner = self._runner.start(self.jobwire.tasks[job.task], ctx)
            self._running[job.id] = (ctx, inner)
            # No task of its own per job: the attempt's end is read when it stops.
            inner.add_done_callback(functools.partial(self._stopped, job, ctx))

    def _stopped(self, job: Job, ctx: Context, inner: asyncio.Task[JSON]) -> None:
        end = self._outcome(job, ctx, inner)
        # The slot is free once the task has stopped: the next claim does not wait for
        # this job's end to be written. A later attempt of the job may hold it by now.
        running = self._running.get(job.id)
        if running is not None and running[0] is ctx:
            del self._running[job.id]
        if end is None or end.status == Status.QUEUED:
            self._wake.set()
            if end is not None:
                self._track(self._finish(ctx.lease, end))
            return
        # Terminal ends are written together with a claim for the slots they freed.
        limited = self.jobwire.tasks[job.task].concurrency is not None
        self._ends.append(End(ctx.lease, end.status, end.result, end.error, limited))
        if self._recorder is None:
            self._recorder = asyncio.create_task(self._record())

    def _track(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    async def _record(self) -> None:
        """Write the ends that stopped meanwhile, in one trip with a claim of as many jobs
        as slots are free (while the worker runs), until none is left."""
        try:
            while self._ends:
                ends, self._ends = self._ends, []
                names, free = ([], 0) if self._stopping else self._free()
                free = max(free, 0)
                self._claiming += free
                try:
                    outcomes, jobs = await self.store.finish_and_claim(
                        ends, self.id, names, free, self.lease_seconds, self.queues)
                except StoreError as exc:
                    log.warning("could not record %d ends at once: %s", len(ends), exc)
                    for end in ends:  # each on its own, with its own retries
                        self._track(self._finish(end.lease, _End(end.status, end.result,
                                                                 end.error)))
                    self._wake.set()
                    continue
                finally:
                    self._claiming -= free
                for end, outcome in zip(ends, outcomes, strict=True):
                    if isinstance(outcome, Exception) and not isinstance(outcome, LeaseLost):
                        log.error("could not record the end of job %s: %s",
                                  end.lease.job, outcome)
                self._start(jobs)
                if len(jobs) < free or any(end.limited for end in ends):
                    # Fewer than asked: the claim loop takes over (it waits for a hint).
                    # A limited end freed its key's slot only now: claim again for it.
                    self._wake.set()
        finally:
            self._recorder = None

    def _outcome(self, job: Job, ctx: Context, inner: asyncio.Task[JSON]) -> _End | None:
        """How the attempt ended, as what to record; None when nothing is to be recorded
        here."""
        exc = None if inner.cancelled() else inner.exception()
        if inner.cancelled() or isinstance(exc, Cancelled):
            if ctx.lost or not ctx.cancelled:
                # Lease lost, or the worker is stopping (stop() hands the job back):
                # it is retried elsewhere, so nothing is recorded here.
                return None
            return _End(Status.CANCELLED)
        if exc is None:
            return _End(Status.COMPLETED, inner.result())
        if isinstance(exc, LeaseLost):
            return None
        if not isinstance(exc, Exception):
            return None  # (KeyboardInterrupt, SystemExit: the process is going down)
        if type(exc) is StoreError:
            # The database failed under the task (connection dropped, disk full), not
            # the task (its subclasses are the task's mistakes): record nothing; the
            # lease runs out and the job is retried, keeping its finished items.
            log.warning("job %s: database failed under the task: %s", job.id, exc)
            return None
        error = error_text(exc)
        delay = None
        if ctx.attempt < job.max_attempts and not ctx.cancelled:  # never a cancel's
            delay = self.jobwire.tasks[job.task].retry_after(exc, ctx.attempt)
        # One line per failure: any guest can make jobs fail, and a traceback each
        # would flood the log. Operators get the traceback with debug logging.
        retrying = "" if delay is None else (
            f" (attempt {ctx.attempt} of {job.max_attempts}; retrying in {delay:.3g} s)")
        log.warning("job %s (%s) failed%s: %s: %s", job.id, job.task, retrying,
                    type(exc).__name__, clip(str(exc)))
        log.debug("job %s (%s) failed", job.id, job.task, exc_info=exc)
        if delay is not None:
            return _End(Status.QUEUED, error=error, delay=delay)
        return _End(Status.FAILED, error=error)

    async def _finish(self, lease: Lease, end: _End) -> None:
        for pause in (0.05, 0.2, 1.0, 3.0, None):
            try:
                if end.status == Status.QUEUED:
                    await self.store.retry(lease, end.error or "", end.delay)
                else:
                    await self.store.finish(lease, end.status, end.result, end.error)
                return
            except LeaseLost:
                return  # another worker or the expiry owns it now
            except StoreError as exc:
                if pause is None:
                    log.error("could not record the end of job %s: %s", lease.job, exc)
                    return
                await asyncio.sleep(pause)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            leases = [ctx.lease for ctx, _ in self._running.values()]
            try:
                held = await self.store.heartbeat(leases, self.lease_seconds)
            except StoreError as exc:
                log.warning("heartbeat failed: %s", exc)
                continue
            for lease in leases:
                if lease.job not in held:
                    self._lose(lease)
                elif held[lease.job]:
                    self._cancel(lease.job)

    def _lose(self, lease: Lease) -> None:
        """Stop the task of an attempt that lost its lease: nothing of it is recorded."""
        running = self._running.get(lease.job)
        # Else it stopped meanwhile (its slot is freed before its end is written, so a job
        # still here has not ended), or it is a later attempt.
        if running is not None and running[0].lease == lease:
            log.warning("lost the lease of job %s; stopping it", lease.job)
            running[0].lost = True
            running[1].cancel()

    async def _housekeeping_loop(self) -> None:
        last_prune = 0.0
        while True:
            try:
                await self.store.expire_leases()
                if now() - last_prune > min(60.0, self.retention_seconds / 2):
                    last_prune = now()
                    await self.store.prune(now() - self.retention_seconds)
            except StoreError as exc:
                log.warning("housekeeping failed: %s", exc)
            await asyncio.sleep(max(0.2, min(self.lease_seconds / 2, 5.0)))

