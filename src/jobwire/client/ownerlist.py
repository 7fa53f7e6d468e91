"""The owner's list of jobs, kept live from the server's owner feed (`watch_jobs`): one
feed per connection however many readers, resumed from its cursor after a reconnect."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from typing import Any

from jobwire.client.snapshot import JSON

Job = dict[str, JSON]
ACTIVE = ("queued", "running")


def listed(jobs: dict[str, Job], status: str | None) -> list[Job]:
    """The jobs of a status ("active", one status, or all), newest first as GET /api/jobs."""
    wanted = [j for j in jobs.values() if status is None or j["status"] == status
              or (status == "active" and j["status"] in ACTIVE)]
    wanted.sort(key=lambda j: (str(j["created_at"]), str(j["id"])), reverse=True)
    return wanted


class OwnerList:
    """The folded feed: jobs by id, the cursor to resume from, and readers to wake."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.cursor = 0
        self.version = 0  # how many messages were folded: 0 until the first
        self.readers = 0
        self._changed = asyncio.Event()

    def fold(self, msg: dict[str, Any]) -> None:
        if msg.get("reset"):
            self.jobs = {}
        for change in msg.get("changes", ()):
            self.jobs.pop(change["id"], None)
            if change["job"] is not None:
                self.jobs[change["id"]] = change["job"]
        self.cursor = int(msg["cursor"])
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def lists(self, status: str | None) -> AsyncIterator[list[Job]]:
        """The list now (once the first message came) and after every change; a slow
        reader skips to the latest list."""
        seen = 0
        while True:
            if self.version != seen:
                seen = self.version
                yield listed(self.jobs, status)
            else:
                await self._changed.wait()


class JobList:
    """`await client.jobs(...)`: one read of the list. `async for jobs in client.jobs(...)`:
    the list now and after every creation, status change or deletion, live."""

    def __init__(self, read: Callable[[], Awaitable[list[Job]]],
                 live: Callable[[], AsyncIterator[list[Job]]]) -> None:
        self._read = read
        self._live = live

    def __await__(self) -> Generator[Any, None, list[Job]]:
        return self._read().__await__()

    def __aiter__(self) -> AsyncIterator[list[Job]]:
        return self._live()
