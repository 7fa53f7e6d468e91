"""The storage protocol every backend implements, and the errors it raises.

Every method that changes a job writes the job row, its item rows and exactly one
event per change in one transaction, the event's seq taken from the job row.
After commit the store hands the new events to the listeners registered with
`listen` (in-process directly, across processes through the backend's own channel).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Collection, Sequence
from typing import Protocol

from jobwire.model import JSON, Event, EventType, Item, Job, Status

# Called on the event loop with (job id, seq, the event if the backend has it at hand).
# A hint may repeat or skip seqs; listeners catch up from `events()` by seq.
Hint = Callable[[str, int, Event | None], None]
# The events that change a job's status, and so its owner's list of jobs.
STATUS_EVENTS = frozenset({EventType.CREATED, EventType.STARTED, EventType.RETRYING,
                           EventType.COMPLETED, EventType.FAILED, EventType.CANCELLED})
# The seq of a hint about a job that may have changed when the write's outcome is
# unknown (it failed after its commit, say): listeners read whatever the store has.
UNKNOWN_SEQ = sys.maxsize
# Called on the event loop with an owner whose list of jobs may have changed (a job
# created, changed status, deleted or moved), or None when any owner's may have.
OwnerHint = Callable[[str | None], None]


class StoreError(Exception):
    """A storage failure that callers report as a clear error."""


class LeaseLost(StoreError):
    """The worker no longer holds the job: its lease expired and it was requeued,
    cancelled or taken by another worker. The worker must stop running it."""


class JobActive(StoreError):
    """The job is queued or running and so cannot be deleted."""


class UnknownItem(StoreError):
    """A task named an item it never declared."""


class OwnerConflict(StoreError):
    """Moving jobs to another owner would give it two active jobs with one dedup key."""


class TooManyActive(StoreError):
    """The owner already has the most active (queued or running) jobs a store allows."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"too many active jobs: at most {limit} per owner; "
                         "wait for one to end or cancel one")
        self.limit = limit


@dataclasses.dataclass(frozen=True, slots=True)
class Lease:
    """A worker's claim on one attempt of a job; every write a worker makes is fenced by it."""

    job: str
    worker: str
    attempt: int


@dataclasses.dataclass(frozen=True, slots=True)
class End:
    """The terminal end of an attempt, to record as `Store.finish` would. `limited`: the
    job has a limit key, whose slot the end frees."""

    lease: Lease
    status: Status
    result: JSON = None
    error: str | None = None
    limited: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Written:
    events: list[Event]
    cancel_requested: bool


@dataclasses.dataclass(frozen=True, slots=True)
class OwnerChanges:
    """What changed in an owner's list of jobs since a cursor, read in one snapshot.

    Every creation, status change, deletion and move of a job bumps its owner's change
    seq in the same transaction, stamping the row (or a tombstone, for a job deleted or
    moved away) with it; bumps of one owner commit in seq order. So the rows stamped
    above the cursor are exactly the jobs that changed since it."""

    seq: int  # the owner's change seq this snapshot is at: the next cursor
    reset: bool  # the cursor was unknown or older than the kept tombstones: `jobs` is all
    jobs: list[Job]  # the jobs changed since the cursor (all the owner's when reset), as now
    gone: list[str]  # ids deleted or moved to another owner since the cursor


@dataclasses.dataclass(frozen=True, slots=True)
class Placement:
    """How a new job is claimed, fixed at submit: claims take higher `priority` first,
    workers serving `queue` take it, and at most `limit_max` jobs of one `limit_key`
    (None: no limit) run at once, across every worker."""

    priority: int = 0
    queue: str = "default"
    limit_key: str | None = None
    limit_max: int | None = None


DEFAULT_PLACEMENT = Placement()


# An update states the item's new state, which is exactly an Item.
ItemUpdate = Item


class Store(Protocol):
    async def open(self) -> None:
        """Connect and apply pending migrations (safe to race with other processes)."""

    async def close(self) -> None: ...

    def listen(self, hint: Hint) -> None:
        """Register a listener for committed events of any job."""

    def listen_owners(self, hint: OwnerHint) -> None:
        """Register a listener for owners whose list of jobs changed, in any process."""

    async def owner_changes(self, owner: str, after: int) -> OwnerChanges:
        """The owner's jobs changed since change seq `after`; all of them when `after` is 0,
        from another database, or older than the tombstones `prune` keeps."""

    # -- sessions
    async def add_session(self, token_hash: str, owner: str, expires_at: float | None) -> None: ...

    async def session_owner(self, token_hash: str) -> str | None:
        """The owner of an unexpired session, or None."""

    async def live_sessions(self, token_hashes: Collection[str]) -> set[str]:
        """Those of the given token hashes whose session exists and has not expired."""

    async def sessions_of(self, owner: str) -> list[tuple[str, float, float | None]]:
        """The owner's sessions as (token hash, created_at, expires_at), oldest first."""

    async def revoke_sessions(self, owner: str) -> int:
        """End all of the owner's sessions; how many there were."""

    async def add_ticket(self, ticket_hash: str, token_hash: str, expires_at: float) -> None:
        """A ticket standing for the session of `token_hash` until `expires_at`."""

    async def use_ticket(self, ticket_hash: str) -> tuple[str, str] | None:
        """End an unexpired ticket (once: concurrent uses, one wins) and return its
        session's (owner, token hash), or None if either is gone."""

    async def claim_session(self, token_hash: str, owner: str) -> int | None:
        """Give an unexpired guest session's jobs to `owner` and end the session, in one
        transaction; the number of jobs moved, or None if there is no such guest session.
        OwnerConflict, changing nothing, if an active job of the guest and one of `owner`
        share task and key."""

    # -- the API's side
    async def submit(
        self, owner: str, task: str, input: JSON, key: str | None, max_attempts: int,
        delay: float = 0.0, run_at: float | None = None,
        place: Placement = DEFAULT_PLACEMENT,
    ) -> tuple[Job, bool]:
        """Create a job, or return the active job of (owner, task, key) with created=False.
        A job given `run_at` (epoch seconds), or a `delay` (seconds from the database's
        clock; on SQLite the writing process's), is not claimed before then.
        TooManyActive, creating nothing, if the owner has `max_active_jobs` active jobs
        (joining an active job by its key is never refused). A new job's fairness rank is
        the owner's number of active jobs: claims take low ranks first."""

    async def submit_tick(self, owner: str, task: str, input: JSON, max_attempts: int,
                          tick: float, catch_up: bool = False,
                          place: Placement = DEFAULT_PLACEMENT) -> tuple[Job, bool] | None:
        """Fire one tick (epoch seconds) of the periodic job of `task`, in one transaction:
        record it as the task's last fired tick if it is later than the recorded one
        (with `catch_up`, only if one is recorded), then create a job keyed
        `cron.tick_key(tick)` unless a job of (owner, task) is still active. None if the
        tick was not recorded (this or a later tick fired already, in any process);
        (that active job, False) if the tick was skipped for it; (the new job, True).
        Never refused by the per-owner cap: ticks are bounded by their schedule."""

    async def get_job(self, job_id: str, owner: str | None = None) -> Job | None: ...

    async def list_jobs(
        self, owner: str | None, statuses: Collection[Status] | None, limit: int,
        id_prefix: str | None = None, *, task: str | None = None,
        since: float | None = None, until: float | None = None,
        before: tuple[float, str] | None = None,
    ) -> list[Job]:
        """The owner's jobs (every owner's when None), newest first: by (created_at, id)
        descending, so `before` (a page's last row) resumes exactly after it whatever was
        inserted meanwhile. With `id_prefix`, only ids starting with it; `task`, created
        in [since, until) when given."""

    async def job_with_items(self, job_id: str, owner: str | None = None
                             ) -> tuple[Job, list[Item]] | None:
        """The job and its items read in one transaction, so they agree at `job.seq`."""

    async def events(self, job_id: str, after: int, limit: int = 1000) -> list[Event]:
        """Events with seq > after, in seq order."""

    async def request_cancel(self, job_id: str, owner: str) -> Job | None:
        """Cancel a queued job at once; mark a running one cancel_requested."""

    async def delete_job(self, job_id: str, owner: str) -> bool:
        """Delete a terminal job; False if not found, JobActive if still active."""

    # -- the worker's side
    async def claim(
        self, worker: str, tasks: Collection[str], limit: int, lease_seconds: float,
        queues: Collection[str] | None = None,
    ) -> list[Job]:
        """Start up to `limit` queued jobs of `tasks` (in `queues`; None: any) whose run_at
        has come: highest priority first, then lowest fairness rank (an owner's first
        active job overtakes another owner's backlog), then the longest due (run_at, else
        created_at). A job whose limit key has `limit_max` jobs running is skipped (jobs
        behind it are not), and one claim never starts more of a key than it has room
        for, however many processes claim at once."""

    async def heartbeat(self, leases: Sequence[Lease], lease_seconds: float) -> dict[str, bool]:
        """Extend the leases still held; returns {job id: cancel_requested} for those."""

    async def declare_items(self, lease: Lease, refs: Sequence[str]) -> tuple[Written, list[Item]]:
        """Add items not declared yet; returns all items, finished ones from earlier attempts
        included, so a retried task can skip them."""

    async def update_items(self, lease: Lease, updates: Sequence[ItemUpdate]) -> Written:
        """Apply item transitions, one event each, in one transaction."""

    async def report(self, lease: Lease, info: JSON) -> Written: ...

    async def finish(
        self, lease: Lease, status: Status, result: JSON = None, error: str | None = None
    ) -> Written: ...

    async def finish_and_claim(
        self, ends: Sequence[End], worker: str, tasks: Collection[str], limit: int,
        lease_seconds: float, queues: Collection[str] | None = None,
    ) -> tuple[list[Written | Exception], list[Job]]:
        """Record `ends` as `finish` would (each failing alone: its exception in its
        place, e.g. LeaseLost), then claim as `claim` would (limit 0: not at all), in one
        hand-over to the database: a worker's finished jobs and the next ones for their
        slots in one trip. The claim sees the ends (their limit keys' slots are free)."""

    async def hand_back(self, leases: Sequence[Lease]) -> int:
        """Requeue at once the jobs a stopping worker still holds by these leases (and
        with no cancel requested, which expire as cancelled), its attempt not counted:
        attempt goes back by one, the items it left running back to pending, and a
        `retrying` event says so (error HANDED_BACK, attempt the one before). How many."""

    async def retry(self, lease: Lease, error: str, delay: float) -> Written:
        """Requeue the job after its attempt failed with `error`, not to be claimed for
        `delay` seconds (from the database's clock); items the attempt left running go
        back to pending. Writes a `retrying` event with the attempt, error and run_at."""

    # -- maintenance
    async def count_by_status(self, owner: str | None = None) -> dict[str, int]:
        """Jobs by status: every owner's, or `owner`'s."""

    async def expire_leases(self) -> int:
        """Requeue (or fail after max_attempts, or cancel if asked) jobs whose lease ran out."""

    async def prune(self, finished_before: float) -> int:
        """Delete terminal jobs finished before the given time, with items and events,
        sessions that have expired and tombstones older than that time; the number of
        jobs deleted."""
