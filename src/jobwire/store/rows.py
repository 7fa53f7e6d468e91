"""What both SQL backends share: row decoding, event payloads and lease-expiry wording."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import orjson

from jobwire.model import (
    JSON,
    Event,
    EventType,
    IllegalTransition,
    Item,
    ItemStatus,
    Job,
    Progress,
    Status,
    check_job_transition,
    iso,
)
from jobwire.store.base import End, Lease, LeaseLost

JOB_COLUMNS = (
    "id, task, key, owner, status, input, total, done, failed, result, error, info, "
    "attempt, max_attempts, seq, cancel_requested, created_at, updated_at, finished_at, run_at, "
    "priority, queue"
)


def dumps(value: JSON) -> str:
    return orjson.dumps(value).decode()


def loads(text: str | bytes | None) -> JSON:
    return None if text is None else orjson.loads(text)


def job_from_row(row: Sequence[Any], decode: bool = True) -> Job:
    """A Job from a row in JOB_COLUMNS order. `decode=False` when the driver already
    returns JSON columns as Python values and timestamps as epoch floats."""
    conv = loads if decode else (lambda v: v)
    return Job(
        id=row[0], task=row[1], key=row[2], owner=row[3], status=Status(row[4]),
        input=conv(row[5]), progress=Progress(row[6], row[7], row[8]),
        result=conv(row[9]), error=row[10], info=conv(row[11]), attempt=row[12],
        max_attempts=row[13], seq=row[14], cancel_requested=bool(row[15]),
        created_at=row[16], updated_at=row[17], finished_at=row[18], run_at=row[19],
        priority=row[20], queue=row[21],
    )


def item_from_row(row: Sequence[Any], decode: bool = True) -> Item:
    return Item(ref=row[0], status=ItemStatus(row[1]),
                result=loads(row[2]) if decode else row[2], error=row[3])


def event_data(status: Status | str, total: int, done: int, failed: int,
               **extra: JSON) -> dict[str, JSON]:
    """Every event states the job's status and counts after it, so clients never derive them."""
    return {"status": str(status), "progress": {"total": total, "done": done, "failed": failed},
            **extra}


def retrying_data(total: int, done: int, failed: int, attempt: int, error: str,
                  run_at: str | None, reset: list[str]) -> dict[str, JSON]:
    """The one shape of a `retrying` event, after an error or a lost lease: the attempt
    that ended, its error, when the next may start, and the items put back to pending."""
    return event_data(Status.QUEUED, total, done, failed, attempt=attempt, error=error,
                      run_at=run_at, reset=reset)


def item_change(ref: str, item: ItemStatus, result: JSON, error: str | None
                ) -> dict[str, JSON]:
    """What an `item` event says besides status and progress: a result or an error only
    when the task gave one."""
    change: dict[str, JSON] = {"ref": ref, "item": item.value}
    if result is not None:
        change["result"] = result
    if error is not None:
        change["error"] = error
    return change


def event_data_sql(status: str, total: str, done: str, failed: str, **extra: str) -> str:
    """`event_data` as a PostgreSQL json expression of SQL expressions: for a statement
    that makes a change and writes its event in one round trip."""
    pairs = "".join(f", '{key}', {value}" for key, value in extra.items())
    return (f"json_build_object('status', {status}, 'progress', json_build_object("
            f"'total', {total}, 'done', {done}, 'failed', {failed}){pairs})")


def make_event(job: str, seq: int, type: EventType, data: Mapping[str, JSON], at: float) -> Event:
    return Event(job=job, seq=seq, type=type.value, data=dict(data), at=at)


def guest_clashes_sql(param: str) -> str:
    """Active keyed jobs of a guest (2nd parameter) that an active job of the new owner
    (1st parameter) shares task and key with; `param` is the driver's placeholder."""
    return (f"SELECT g.id FROM jobs g JOIN jobs u ON u.owner = {param} AND u.task = g.task "
            "AND u.key = g.key AND u.status IN ('queued', 'running') "
            f"WHERE g.owner = {param} AND g.key IS NOT NULL "
            "AND g.status IN ('queued', 'running')")


def clash_error(job_ids: Sequence[str]) -> str:
    return (f"active jobs with the same task and key on both sides: {', '.join(job_ids)}; "
            "wait for them to finish or cancel them, then claim again")


def lease_lost(lease: Lease) -> LeaseLost:
    return LeaseLost(f"job {lease.job} is no longer held by worker {lease.worker}")


# Why a job a stopping worker handed back is queued again: nothing failed, and the
# attempt it was on does not count.
HANDED_BACK = "worker stopped; requeued"


def lease_expired_error(attempt: int, max_attempts: int, requeued: bool = False) -> str:
    lost = f"lease expired during attempt {attempt} of {max_attempts}"
    return f"worker lost; requeued ({lost})" if requeued else f"worker lost: {lost}"


# The order claims take queued jobs in, and the columns of the index (jobs_queue) that
# serves it: priority, then fairness rank, then due time (a delayed or retried job's
# run_at, else its creation).
CLAIM_ORDER = "priority DESC, rank, (coalesce(run_at, created_at))"

# At most this many jobs whose run_at has come are made claimable by one claim: a claim
# stays short however many come due at once; the rest follow with the next claims.
PROMOTE_BATCH = 1000


def expiry_outcome(attempt: int, max_attempts: int, cancel_requested: bool) -> Status:
    """What a job whose lease ran out becomes."""
    if cancel_requested:
        return Status.CANCELLED
    return Status.FAILED if attempt >= max_attempts else Status.QUEUED


def expiry_event(outcome: Status, total: int, done: int, failed: int, attempt: int,
                 error: str, at: float, reset: list[str]) -> tuple[EventType, dict[str, JSON]]:
    """The event of a job whose lease ran out, as `expiry_outcome` decided: `retrying`
    (requeued at `at`), else its terminal event."""
    if outcome == Status.QUEUED:
        return EventType.RETRYING, retrying_data(total, done, failed, attempt, error,
                                                 iso(at), reset)
    return EventType(outcome.value), event_data(outcome, total, done, failed, error=error,
                                                attempt=attempt, reset=reset)


def fire_tick_sql(param: str, catch_up: bool) -> str:
    """Records `tick` (2nd parameter) as the last fired tick of the periodic job of `task`
    (1st) if it is later than the one recorded: a compare-and-set, so of any number of
    processes firing one tick exactly one gets the row back. A catch-up (`catch_up`) only
    replaces a recorded tick, so a periodic's first tick is never one: a newly deployed
    nightly job waits for the night."""
    p = param
    if catch_up:
        return ("UPDATE periodic_ticks SET tick = new.tick FROM (SELECT "
                f"CAST({p} AS TEXT) AS task, CAST({p} AS DOUBLE PRECISION) AS tick) AS new "
                "WHERE periodic_ticks.task = new.task AND periodic_ticks.tick < new.tick "
                "RETURNING periodic_ticks.tick")
    return (f"INSERT INTO periodic_ticks (task, tick) VALUES ({p}, {p}) ON CONFLICT (task) "
            "DO UPDATE SET tick = excluded.tick WHERE periodic_ticks.tick < excluded.tick "
            "RETURNING tick")


def active_job_sql(param: str) -> str:
    """An active job of (owner, task), if there is one: a periodic's previous tick's job."""
    return (f"SELECT {JOB_COLUMNS} FROM jobs WHERE owner = {param} AND task = {param} "
            "AND status IN ('queued', 'running') LIMIT 1")


def claims(tasks: Collection[str], limit: int, queues: Collection[str] | None) -> bool:
    """Whether a claim of `limit` jobs of `tasks` in `queues` could take any."""
    return bool(tasks) and limit > 0 and (queues is None or bool(queues))


def check_end(status: Status) -> None:
    check_job_transition(Status.RUNNING, status)
    if status.active:
        raise IllegalTransition("finish() takes a terminal status")


def encoded_end(end: End) -> str | Exception:
    """The end's result as JSON text, or why that end cannot be recorded (it alone)."""
    try:
        check_end(end.status)
        return dumps(end.result)
    except (IllegalTransition, TypeError, ValueError) as exc:
        return exc
