"""A job's state at one seq: its snapshot and its items, as one immutable value."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jobwire.model import TERMINAL, Status, apply_event

JSON = Any


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """`job` is the job snapshot (id, status, progress, result, error, seq …) and `items`
    maps each item ref to {ref, status, result, error}; both describe the same seq.
    `event` is the event that produced this state, or None when it was loaded whole.
    Treat it as read-only: watchers of one job share it."""

    job: Mapping[str, JSON]
    items: Mapping[str, Mapping[str, JSON]]
    event: Mapping[str, JSON] | None = None

    @property
    def id(self) -> str:
        return str(self.job["id"])

    @property
    def seq(self) -> int:
        return int(self.job["seq"])

    @property
    def status(self) -> str:
        return str(self.job["status"])

    @property
    def progress(self) -> Mapping[str, int]:
        progress: Mapping[str, int] = self.job["progress"]
        return progress

    @property
    def result(self) -> JSON:
        return self.job.get("result")

    @property
    def error(self) -> str | None:
        error: str | None = self.job.get("error")
        return error

    @property
    def terminal(self) -> bool:
        return Status(self.status) in TERMINAL

    def apply(self, event: Mapping[str, JSON]) -> Snapshot:
        """The state after `event`, which must be the next seq (the model's rule)."""
        job, items = apply_event(self.job, self.items, event)
        return Snapshot(job, items, event)
