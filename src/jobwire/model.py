"""Job and item states, their legal transitions, and the shapes of events and snapshots.

Pure: no I/O. Stores ask this module which transitions are legal and enforce the
answer inside their transactions; clients use `apply_event` to fold events into
snapshots exactly as the server does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import orjson

JSON = Any


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        return self in ACTIVE

    @property
    def terminal(self) -> bool:
        return self not in ACTIVE


ACTIVE: frozenset[Status] = frozenset({Status.QUEUED, Status.RUNNING})
TERMINAL: frozenset[Status] = frozenset(Status) - ACTIVE

# running -> queued is a retry: after an error the task may retry, or after the worker's
# lease expired. The job waits queued until its `run_at`.
JOB_TRANSITIONS: Mapping[Status, frozenset[Status]] = {
    Status.QUEUED: frozenset({Status.RUNNING, Status.CANCELLED, Status.FAILED}),
    Status.RUNNING: frozenset(
        {Status.COMPLETED, Status.FAILED, Status.CANCELLED, Status.QUEUED}
    ),
    Status.COMPLETED: frozenset(),
    Status.FAILED: frozenset(),
    Status.CANCELLED: frozenset(),
}


class ItemStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


# An item finished in an earlier attempt stays finished: a retry never counts it twice.
ITEM_TRANSITIONS: Mapping[ItemStatus, frozenset[ItemStatus]] = {
    ItemStatus.PENDING: frozenset({ItemStatus.RUNNING, ItemStatus.DONE, ItemStatus.FAILED}),
    ItemStatus.RUNNING: frozenset({ItemStatus.DONE, ItemStatus.FAILED, ItemStatus.PENDING}),
    ItemStatus.DONE: frozenset(),
    ItemStatus.FAILED: frozenset(),
}


class IllegalTransition(ValueError):
    """A state change that the model forbids; never silently applied."""


def check_job_transition(old: Status, new: Status) -> None:
    if new not in JOB_TRANSITIONS[old]:
        raise IllegalTransition(f"job cannot go from {old} to {new}")


def check_item_transition(old: ItemStatus, new: ItemStatus) -> None:
    if new not in ITEM_TRANSITIONS[old]:
        raise IllegalTransition(f"item cannot go from {old} to {new}")


def item_sources(new: ItemStatus) -> list[str]:
    """The item statuses from which `new` may be reached (for guarded UPDATEs)."""
    return [old.value for old, targets in ITEM_TRANSITIONS.items() if new in targets]


def counts_delta(old: ItemStatus, new: ItemStatus) -> tuple[int, int]:
    """How an item transition changes the job's (done, failed) counts."""
    done = (new == ItemStatus.DONE) - (old == ItemStatus.DONE)
    failed = (new == ItemStatus.FAILED) - (old == ItemStatus.FAILED)
    return done, failed


class EventType(StrEnum):
    CREATED = "created"
    STARTED = "started"
    ITEMS = "items"
    ITEM = "item"
    PROGRESS = "progress"
    CANCEL_REQUESTED = "cancel_requested"
    RETRYING = "retrying"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_EVENTS = frozenset({EventType.COMPLETED, EventType.FAILED, EventType.CANCELLED})


MAX_OWNER_ID = 200


def valid_owner_id(value: object) -> str | None:
    """`value` if it can be the id part of an owner: a non-empty printable string (no
    control, format or surrogate characters, which no database or log should get) of at
    most MAX_OWNER_ID characters; else None."""
    if isinstance(value, str) and 0 < len(value) <= MAX_OWNER_ID and value.isprintable():
        return value
    return None


def valid_owner(value: str) -> str | None:
    """`value` if it is an owner, `user:<id>` or `guest:<id>`; else None."""
    kind, sep, rest = value.partition(":")
    ok = sep and kind in ("user", "guest") and valid_owner_id(rest) is not None
    return value if ok else None


def now() -> float:
    return datetime.now(UTC).timestamp()


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Progress:
    total: int = 0
    done: int = 0
    failed: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"total": self.total, "done": self.done, "failed": self.failed}


@dataclasses.dataclass(slots=True)
class Event:
    """One change of one job. `data` always carries the job's `status` and `progress`
    after the change, so a snapshot can be rebuilt from any event onwards."""

    job: str
    seq: int
    type: str
    data: dict[str, JSON]
    at: float
    _wire: bytes | None = dataclasses.field(default=None, repr=False, compare=False)
    # `wire` as a WebSocket frame (jobwire.api.frames): built once for every socket.
    frame: bytes | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def wire(self) -> bytes:
        """The JSON sent to clients, encoded once however many subscribers get it."""
        if self._wire is None:
            self._wire = orjson.dumps(
                {"job": self.job, "seq": self.seq, "type": self.type, "data": self.data,
                 "at": iso(self.at)}
            )
        return self._wire

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS


@dataclasses.dataclass(slots=True)
class Job:
    id: str
    task: str
    key: str | None
    owner: str
    status: Status
    input: JSON
    progress: Progress
    result: JSON
    error: str | None
    info: JSON
    attempt: int
    max_attempts: int
    seq: int
    cancel_requested: bool
    created_at: float
    updated_at: float
    finished_at: float | None
    # Not claimed before this (submitted with a delay, or retrying after one); None: at once.
    run_at: float | None = None
    # Claimed before jobs of lower priority; only by workers that serve its queue.
    priority: int = 0
    queue: str = "default"

    def snapshot(self) -> dict[str, JSON]:
        return {
            "id": self.id,
            "task": self.task,
            "key": self.key,
            "owner": self.owner,
            "status": self.status.value,
            "progress": self.progress.as_dict(),
            "result": self.result,
            "error": self.error,
            "info": self.info,
            "attempt": self.attempt,
            "cancel_requested": self.cancel_requested,
            "seq": self.seq,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "finished_at": iso(self.finished_at),
            "run_at": iso(self.run_at),
            "priority": self.priority,
            "queue": self.queue,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class Item:
    ref: str
    status: ItemStatus
    result: JSON = None
    error: str | None = None

    def as_dict(self) -> dict[str, JSON]:
        return {"ref": self.ref, "status": self.status.value, "result": self.result,
                "error": self.error}


def apply_event(
    snapshot: Mapping[str, JSON], items: Mapping[str, Mapping[str, JSON]], event: Mapping[str, JSON]
) -> tuple[dict[str, JSON], dict[str, Mapping[str, JSON]]]:
    """Fold one event (wire form) into a snapshot and its items, returning new copies.

    The caller guarantees `event["seq"] == snapshot["seq"] + 1`; this is the single
    definition of how events change state, shared by the Python client and mirrored
    by jobwire.js. The snapshot must have been loaded once (GET /api/jobs/{id}): the
    `created` event does not carry the id, owner or timestamps.
    Item mappings are shared between the old and new state and never mutated, so an
    event costs one shallow copy, not a copy of every item.
    """
    data = event["data"]
    snap = dict(snapshot)
    new_items: dict[str, Mapping[str, JSON]] = dict(items)
    snap["seq"] = event["seq"]
    snap["status"] = data["status"]
    snap["progress"] = dict(data["progress"])
    if event.get("at"):
        snap["updated_at"] = event["at"]
    kind = event["type"]
    if kind == EventType.CREATED:
        snap.update({k: v for k, v in data.items() if k in snap or k == "id"})
    elif kind == EventType.STARTED:
        snap["attempt"] = data["attempt"]
    elif kind == EventType.ITEMS:
        for ref in data["refs"]:
            new_items.setdefault(ref, {"ref": ref, "status": "pending", "result": None,
                                       "error": None})
    elif kind == EventType.ITEM:
        new_items[data["ref"]] = {"ref": data["ref"], "status": data["item"],
                                  "result": data.get("result"), "error": data.get("error")}
    elif kind == EventType.PROGRESS:
        snap["info"] = data.get("info")
    elif kind == EventType.CANCEL_REQUESTED:
        snap["cancel_requested"] = True
    elif kind == EventType.RETRYING:
        # The attempts that count: one fewer when a stopping worker handed the job back.
        snap["attempt"] = data["attempt"]
        snap["error"] = data.get("error")
        snap["run_at"] = data.get("run_at")
    elif kind in TERMINAL_EVENTS:
        snap["result"] = data.get("result")
        snap["error"] = data.get("error")
        snap["finished_at"] = event.get("at")
    # Items a stopped attempt left running never finished: they are pending again.
    for ref in data.get("reset", ()):
        if ref in new_items:
            new_items[ref] = {**new_items[ref], "status": ItemStatus.PENDING.value}
    return snap, new_items


def backoff(attempt: int, base: float, cap: float, rand: float) -> float:
    """Seconds before the retry after failed attempt `attempt` (1, 2, ...): exponential
    backoff with full jitter, `rand` drawn uniformly from [0, 1). Full jitter spreads
    the retries of jobs that failed together (one outage) instead of bunching them."""
    return rand * min(cap, base * 2.0 ** min(attempt - 1, 1023))


def counts_of(items: Iterable[Mapping[str, JSON]]) -> dict[str, int]:
    """Aggregate counts as item states say they are (used to check the invariant)."""
    total = done = failed = 0
    for it in items:
        total += 1
        done += it["status"] == ItemStatus.DONE
        failed += it["status"] == ItemStatus.FAILED
    return {"total": total, "done": done, "failed": failed}
