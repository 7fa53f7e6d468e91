"""The hub when the database fails under it: a subscriber whose catch-up read or whose
channel's fill fails keeps retrying, and still gets every event once, in order."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from jobwire.hub import Hub
from jobwire.model import Event
from jobwire.store import Hint, StoreError


class FlakyStore:
    """Just what the hub reads; `fail` makes the next reads fail as a dropped database
    connection does."""

    def __init__(self, count: int) -> None:
        self.log = [self.event(seq) for seq in range(1, count + 1)]
        self.fail = 0
        self.hints: list[Hint] = []

    @staticmethod
    def event(seq: int) -> Event:
        return Event(job="j", seq=seq, type="progress", data={"n": seq}, at=0.0)

    def listen(self, hint: Hint) -> None:
        self.hints.append(hint)

    async def get_job(self, job_id: str, owner: str | None = None) -> Any:
        return SimpleNamespace(seq=len(self.log))

    async def events(self, job_id: str, after: int, limit: int = 1000) -> list[Event]:
        if self.fail:
            self.fail -= 1
            raise StoreError("database error: server closed the connection unexpectedly")
        return [e for e in self.log if e.seq > after][:limit]

    def append(self) -> None:
        """A new event whose notification carries no event: the hub must read it."""
        self.log.append(self.event(len(self.log) + 1))
        for hint in self.hints:
            hint("j", len(self.log), None)


async def until(got: list[int], n: int) -> None:
    while len(got) < n:
        await asyncio.sleep(0.02)


async def test_failed_catch_up_and_fill_are_retried() -> None:
    store = FlakyStore(5)
    hub = Hub(store)  # type: ignore[arg-type]
    got: list[int] = []
    store.fail = 3  # the replay from seq 0 fails three times
    sub = await hub.subscribe("j", 0, lambda ev: got.append(ev.seq))
    await asyncio.wait_for(until(got, 5), 10)
    store.fail = 2  # then the channel's read of a new event fails twice
    store.append()
    store.append()
    await asyncio.wait_for(until(got, 7), 10)
    assert got == [1, 2, 3, 4, 5, 6, 7]
    sub.close()
