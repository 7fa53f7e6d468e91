"""One jobwire process: settings, tasks, store, hub and workers, started and stopped as
one; and the in-process API a host's backend submits and reads jobs with.

The HTTP routes call the same methods, so a job submitted from a host's route and one
POSTed to /api/jobs pass the same validation, dedup and limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import re
from collections.abc import AsyncIterator, Awaitable
from datetime import datetime
from typing import Any, Literal, get_args

from jobwire import periodic
from jobwire.app import InputError, Jobwire, Submission, check_owner, check_submit
from jobwire.coalesce import Coalescer
from jobwire.hub import Hub
from jobwire.model import ACTIVE, JSON, Job, Status, now
from jobwire.sessions import LiveSessions
from jobwire.settings import Settings
from jobwire.store import JobActive, Store, TooManyActive, open_store
from jobwire.worker import Worker

__all__ = ["EVERY_OWNER", "JobActive", "NotFound", "NotStarted", "Runtime", "StatusFilter",
           "TooManyActive", "check_owner"]


class _Every(enum.Enum):
    OWNER = "every owner"


# Reads across owners (what the service key does) name this, never None: an owner that
# is None by mistake (no signed-in user) must not read everyone's jobs.
EVERY_OWNER = _Every.OWNER
StatusFilter = Literal["active", "queued", "running", "completed", "failed", "cancelled"]
STATUS_FILTERS: frozenset[str] = frozenset(get_args(StatusFilter))
MAX_LIST = 500
# Ids are uuid4 hex: a prefix is 1 to 32 lowercase hex digits, nothing a query could
# read as a pattern.
ID_PREFIX = r"^[0-9a-f]{1,32}$"

# Concurrent submits of one (owner, task, key) share one store submit that started after
# they all arrived: its caller gets what it answered, the others join its job, which is what
# the dedup index would have answered each of them, for one transaction instead of one each.
# A refusal by the active-job cap is shared alike: that key had no active job, so each
# would hear it.
_submits: Coalescer[tuple[Store, str, str, str], tuple[Job, bool]] = Coalescer()


class NotStarted(RuntimeError):
    """The runtime was used before `start()` (or `async with`) or after `stop()`."""


class NotFound(LookupError):
    """No such job for this owner: a job of another owner is not found either."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id!r} not found")
        self.job_id = job_id


def _reader(owner: str | _Every) -> str | None:
    """The store's owner filter: None reads every owner's jobs. Periodic jobs' owner
    may be read, never written as."""
    if owner is EVERY_OWNER:
        return None
    return owner if owner == periodic.OWNER else check_owner(owner)


class Runtime:
    """The settings, the task registry, the store, the hub, the live connections by
    session (`live`) and (with `concurrency` > 0) a worker, which also fires periodic
    jobs: `async with runtime:` or `await runtime.start()` / `await runtime.stop()`.

    `jobwire serve`, `jobwire worker` and an app that mounts jobwire each hold one."""

    def __init__(self, jobwire: Jobwire, settings: Settings | None = None) -> None:
        self.jobwire = jobwire
        self.settings = settings or Settings()
        self._store: Store | None = None
        self._hub: Hub | None = None
        self.worker: Worker | None = None
        self.live = LiveSessions()
        self._checker: asyncio.Task[None] | None = None
        self._starting = False

    @property
    def started(self) -> bool:
        return self._hub is not None

    @property
    def store(self) -> Store:
        if self._store is None or self._hub is None:
            raise NotStarted(self.not_started)
        return self._store

    @property
    def hub(self) -> Hub:
        if self._hub is None:
            raise NotStarted(self.not_started)
        return self._hub

    # Overridden where the runtime is reached some other way (a mounted app).
    not_started = "jobwire is not started: `async with runtime:` or `await runtime.start()`"

    async def start(self) -> None:
        if self._starting:
            raise RuntimeError("this jobwire runtime is already started")
        self._starting = True
        store = open_store(self.settings.db, max_active_jobs=self.settings.max_active_jobs)
        try:
            await store.open()
            hub = Hub(store)
            s = self.settings
            if s.concurrency > 0:
                self.worker = Worker(self.jobwire, store, concurrency=s.concurrency,
                                     lease_seconds=s.lease_seconds,
                                     retention_seconds=s.retention_seconds,
                                     max_items=s.max_items_per_job,
                                     threads=s.sync_threads or None,
                                     task_timeout=s.task_timeout or None,
                                     queues=s.queues)
                await self.worker.start()
        except BaseException:
            self.worker = None
            await store.close()
            self._starting = False
            raise
        self._store, self._hub = store, hub
        # A mounted jobwire's sockets end with their session too, not only `jobwire serve`'s.
        self._checker = asyncio.create_task(
            self.live.run(store, self.settings.session_check_seconds))

    async def stop(self) -> None:
        """Hand running jobs back (they are retried at once), then close the store."""
        store, worker, checker = self._store, self.worker, self._checker
        self._store = self._hub = self.worker = self._checker = None
        self._starting = False
        if checker is not None:
            checker.cancel()
        try:
            if worker is not None:
                await worker.stop()
        finally:
            if store is not None:
                await store.close()

    async def __aenter__(self) -> Runtime:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """Runs the runtime for the duration: `FastAPI(lifespan=jobs.lifespan)`, or
        `async with jobs.lifespan(): yield` inside a host's own lifespan."""
        async with self:
            yield

    # -- the in-process API (the HTTP routes call these too)

    async def submit(self, owner: str, task: str, input: JSON = None,
                     key: str | None = None, *, delay: float | None = None,
                     run_at: datetime | None = None, priority: int | None = None
                     ) -> tuple[Job, bool]:
        """Submit a job for `owner`: (the job, True), or (the active job with this task
        and key, False). It runs when a worker is free, or not before `delay` seconds
        (the database's clock) or `run_at` (an aware datetime); `priority` within the
        task's `priority_range`. InputError names what is invalid; TooManyActive when the
        owner has JOBWIRE_MAX_ACTIVE_JOBS active jobs."""
        sub = check_submit(owner, task, input, key, self.settings.max_json_depth,
                           delay, run_at, priority)
        return await self.submit_checked(owner, sub)

    async def submit_checked(self, owner: str, sub: Submission) -> tuple[Job, bool]:
        """`submit` of a Submission already validated (an HTTP body) for a known owner
        (an operator's retry may name the periodic jobs' owner)."""
        run_at = _check_schedule(sub, self.settings.max_delay_seconds)
        spec, value, key, place = self.jobwire.prepare(sub.task, sub.input, sub.key, owner,
                                                       sub.priority)
        store, delay = self.store, sub.delay or 0.0

        def call() -> Awaitable[tuple[Job, bool]]:
            return store.submit(owner, sub.task, value, key, spec.max_attempts, delay, run_at,
                                place)

        if key is None:
            return await call()
        (job, created), own = await _submits.run((store, owner, sub.task, key), call)
        return job, created and own

    async def get(self, owner: str | _Every, job_id: str) -> Job:
        """The job, or NotFound (alike for a missing job and another owner's)."""
        job = await self.store.get_job(_job_id(job_id), _reader(owner))
        if job is None:
            raise NotFound(job_id)
        return job

    async def list(self, owner: str | _Every, status: StatusFilter | None = None,
                   limit: int = 50, id_prefix: str | None = None, *, task: str | None = None,
                   since: float | None = None, until: float | None = None,
                   before: tuple[float, str] | None = None) -> list[Job]:
        """The owner's jobs, newest first; `status="active"` is queued and running;
        `id_prefix` keeps the ids starting with it (a short id as the dashboard shows);
        `task`, and `since`/`until` (epoch seconds: created in [since, until)) filter;
        `before` (created_at, id) resumes after a page's last job."""
        if status is not None and status not in STATUS_FILTERS:
            raise InputError(("status",), f"status is one of {', '.join(sorted(STATUS_FILTERS))}")
        if not 1 <= limit <= MAX_LIST:
            raise InputError(("limit",), f"limit is 1 to {MAX_LIST}")
        if id_prefix is not None and re.fullmatch(ID_PREFIX, id_prefix) is None:
            raise InputError(("id_prefix",), "an id prefix is 1 to 32 lowercase hex digits")
        statuses = None if status is None else (ACTIVE if status == "active" else {Status(status)})
        return await self.store.list_jobs(_reader(owner), statuses, limit, id_prefix,
                                          task=task, since=since, until=until, before=before)

    async def cancel(self, owner: str, job_id: str) -> Job:
        """Cancel a queued job at once, or ask a running one to stop. Idempotent."""
        job = await self.store.request_cancel(_job_id(job_id), check_owner(owner))
        if job is None:
            raise NotFound(job_id)
        return job

    async def delete(self, owner: str, job_id: str) -> None:
        """Delete a finished job; JobActive while it is queued or running."""
        if not await self.store.delete_job(_job_id(job_id), check_owner(owner)):
            raise NotFound(job_id)


def _check_schedule(sub: Submission, max_delay: float) -> float | None:
    """The submit's run_at in epoch seconds (None: none given), within `max_delay` of now;
    InputError naming the field otherwise."""
    if sub.delay is not None and sub.run_at is not None:
        raise InputError(("run_at",), "give delay or run_at, not both")
    if sub.delay is not None and sub.delay > max_delay:
        raise InputError(("delay",), f"must be at most {max_delay:g} seconds "
                                     "(JOBWIRE_MAX_DELAY_SECONDS)")
    if sub.run_at is None:
        return None
    run_at = sub.run_at.timestamp()
    if run_at - now() > max_delay:
        raise InputError(("run_at",), f"must be at most {max_delay:g} seconds from now "
                                      "(JOBWIRE_MAX_DELAY_SECONDS)")
    return run_at


def _job_id(job_id: Any) -> str:
    if not isinstance(job_id, str) or not 0 < len(job_id) <= 200 or "\x00" in job_id:
        raise NotFound(str(job_id)[:200])
    return job_id

