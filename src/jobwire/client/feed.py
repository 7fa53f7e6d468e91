"""One job's live state inside a client: applies its events strictly in seq order and
fans every resulting snapshot out to all of the job's watchers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from jobwire.client.api import Api
from jobwire.client.backoff import Backoff
from jobwire.client.errors import JobwireError, Unavailable
from jobwire.client.snapshot import JSON, Snapshot

# What a watcher's queue carries: a state, the error that ended the feed, or None (end).
Delivery = Snapshot | JobwireError | None


class Link(Protocol):
    """Whatever brings a job's events to its feed (the shared socket, or a poller)."""

    def subscribe(self, feed: Feed) -> None:
        """Start (or restart, replaying after `feed.seq`) delivery to `feed.deliver`."""

    def unsubscribe(self, feed: Feed) -> None:
        """Stop delivery; events already on their way are ignored."""


class Feed:
    """The single subscription of one job, shared by any number of watchers.

    Its state starts from a consistent load (job + items at one seq). An event with
    the next seq is folded in with the model's `apply_event`; older and duplicate seqs
    are dropped; an event beyond the next seq means something was missed: the feed
    reloads its state and asks the link to replay from there. It closes when the job
    is terminal, when its last watcher leaves (unless kept), or on an error.
    """

    def __init__(self, job_id: str, api: Api, link: Link, backoff: Callable[[], Backoff],
                 on_close: Callable[[Feed], None], backlog: int = 256) -> None:
        self.job_id = job_id
        self.backlog = backlog
        self.api = api
        self.link = link
        self.state: Snapshot | None = None
        self.closed = False
        self.kept = False  # watched on the client's behalf (recover) until the job ends
        self.error: JobwireError | None = None
        self._backoff = backoff
        self._on_close = on_close
        self._queues: set[asyncio.Queue[Delivery]] = set()
        self._pending: dict[int, Mapping[str, JSON]] = {}
        self._loading: asyncio.Task[None] | None = None

    @property
    def seq(self) -> int:
        return self.state.seq if self.state is not None else 0

    @property
    def watchers(self) -> int:
        return len(self._queues)

    def start(self) -> None:
        self._loading = asyncio.create_task(self._load())

    def attach(self) -> asyncio.Queue[Delivery]:
        """A new watcher: it gets the current state first, then every later one."""
        queue: asyncio.Queue[Delivery] = asyncio.Queue()
        if self.closed:
            queue.put_nowait(None)
        elif self.state is not None:
            queue.put_nowait(self.state)
        self._queues.add(queue)
        return queue

    def detach(self, queue: asyncio.Queue[Delivery]) -> None:
        self._queues.discard(queue)
        if not self._queues and not self.kept:
            self.close()

    def keep(self) -> None:
        self.kept = True

    def deliver(self, events: Iterable[Mapping[str, JSON]]) -> None:
        """Events of this job as they arrive, in any order, duplicates included."""
        for ev in events:
            seq = ev.get("seq")
            if isinstance(seq, int) and seq > self.seq and ev.get("job") == self.job_id:
                self._pending[seq] = ev
        self._drain()
        if self._pending and self._loading is None and not self.closed:
            self._loading = asyncio.create_task(self._load())  # a gap: resync

    def _drain(self) -> None:
        while self.state is not None and not self.closed:
            ev = self._pending.pop(self.seq + 1, None)
            if ev is None:
                break
            self._publish(self.state.apply(ev))
        self._pending = {s: ev for s, ev in self._pending.items() if s > self.seq}

    def _publish(self, snap: Snapshot) -> None:
        self.state = snap
        for queue in self._queues:
            if queue.qsize() >= self.backlog:
                # A watcher this far behind skips its oldest state rather than hold an
                # unbounded number of them; it still gets the latest and the last.
                queue.get_nowait()
            queue.put_nowait(snap)
        if snap.terminal:
            self.close()

    async def _load(self) -> None:
        backoff = self._backoff()
        try:
            while True:
                try:
                    snap = await self.api.state(self.job_id)
                    break
                except Unavailable:
                    await asyncio.sleep(backoff.next())
        except JobwireError as exc:
            self._loading = None
            self.fail(exc)
            return
        self._loading = None
        if snap.seq > self.seq:
            self._publish(snap)
        self._drain()
        if not self.closed:
            self.link.subscribe(self)  # after a gap, this replays what was missed

    def fail(self, error: JobwireError) -> None:
        """End every watcher with `error` (e.g. the job was not found)."""
        self.error = error
        for queue in self._queues:
            queue.put_nowait(error)
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._loading is not None and self._loading is not asyncio.current_task():
            self._loading.cancel()
        self.link.unsubscribe(self)
        for queue in self._queues:
            queue.put_nowait(None)
        self._on_close(self)

