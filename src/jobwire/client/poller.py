"""Long-polls one job's events into its feed while the WebSocket cannot be used."""

from __future__ import annotations

import asyncio

from jobwire.client.api import Api
from jobwire.client.backoff import Backoff
from jobwire.client.errors import JobwireError, Unavailable
from jobwire.client.feed import Feed


class Poller:
    """`GET /api/jobs/{id}/events?after=<feed's seq>&wait=S` in a loop: one per job, however
    many watchers the job has, since they all share the job's feed."""

    def __init__(self, feed: Feed, api: Api, wait: float, backoff: Backoff) -> None:
        self.feed = feed
        self.api = api
        self.wait = wait
        self.backoff = backoff
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        feed = self.feed
        while not feed.closed:
            try:
                events = await self.api.events(feed.job_id, feed.seq, self.wait)
            except Unavailable:
                await asyncio.sleep(self.backoff.next())
                continue
            except JobwireError as exc:
                feed.fail(exc)
                return
            self.backoff.reset()
            feed.deliver(events)

    def stop(self) -> None:
        if self.task is not asyncio.current_task():
            self.task.cancel()
