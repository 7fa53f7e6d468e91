"""Owner feeds: a live list of one owner's jobs, resumable from a cursor.

The cursor is the owner's change seq (see `OwnerChanges`). A watch sends the list (or
the changes since the client's cursor), then, whenever the store hints that the owner's
jobs may have changed, reads the changes after the cursor it last sent and sends them.
Why the client's list is then exactly the owner's list at the cursor it holds:

- every creation, status change, move and deletion stamps the job row (or a tombstone)
  with a fresh seq of its owner in the same transaction, and one owner's seqs commit in
  order, so a snapshot at seq S holds every change up to S and none after;
- each message is read from one snapshot: the jobs stamped above the cursor (as they are
  at S) and the tombstones above it. A job not among them has not changed since the
  cursor, so the client's copy of it is right;
- a cursor the store cannot answer (0, another database's, older than the tombstones
  kept) gets the whole list, marked `reset`.

Hints only say when to read: a lost one costs latency, never a change. A watch reads
again only after its last message was taken, so a slow client holds one message, into
which everything that happens meanwhile is folded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection

from jobwire.model import ACTIVE, JSON, Job, Status
from jobwire.store import OwnerChanges, Store, StoreError

RETRY_SECONDS = 0.5  # after a failed read: the database is away, the changes are not lost
STATUSES = ("active", *(s.value for s in Status))
Message = dict[str, JSON]
Deliver = Callable[[Message], Awaitable[object]]


def statuses_of(name: str | None) -> frozenset[Status] | None:
    """The statuses a filter name stands for: None for all; ValueError if unknown."""
    if name is None:
        return None
    return ACTIVE if name == "active" else frozenset({Status(name)})


def message(changes: OwnerChanges, statuses: Collection[Status] | None) -> Message:
    """`{"op": "jobs", "cursor", "reset", "changes": [{"id", "job"}]}`: a client clears its
    list on `reset`, then for each change drops `id` and puts `job` back unless null
    (deleted, moved away, or out of the filter)."""
    def wanted(job: Job) -> bool:
        return statuses is None or job.status in statuses

    gone: list[JSON] = [{"id": job_id, "job": None} for job_id in changes.gone]
    return {"op": "jobs", "cursor": changes.seq, "reset": changes.reset, "changes": gone + [
        {"id": job.id, "job": job.snapshot() if wanted(job) else None}
        for job in changes.jobs if wanted(job) or not changes.reset]}


class Watch:
    """One client's feed of one owner's jobs."""

    __slots__ = ("_deliver", "_dirty", "_reading", "closed", "cursor", "feeds", "owner",
                 "sent", "statuses")

    def __init__(self, feeds: OwnerFeeds, owner: str, statuses: frozenset[Status] | None,
                 after: int, deliver: Deliver) -> None:
        self.feeds = feeds
        self.owner = owner
        self.statuses = statuses
        self.cursor = after
        self.sent = False  # the first message goes even when nothing changed
        self.closed = False
        self._deliver = deliver
        self._dirty = False
        self._reading: asyncio.Task[None] | None = None

    def request(self) -> None:
        self._dirty = True
        if self._reading is None and not self.closed:
            self._reading = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while self._dirty and not self.closed:
                self._dirty = False
                try:
                    changes = await self.feeds.store.owner_changes(self.owner, self.cursor)
                except StoreError:
                    self._dirty = True
                    await asyncio.sleep(RETRY_SECONDS)
                    continue
                if self.sent and not changes.reset and changes.seq == self.cursor:
                    continue
                self.cursor, self.sent = changes.seq, True
                await self._deliver(message(changes, self.statuses))
        finally:
            self._reading = None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._reading is not None:
            self._reading.cancel()
        self.feeds.remove(self)


class OwnerFeeds:
    """This process's watches, by owner, woken by the store's owner hints."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._watches: dict[str, set[Watch]] = {}
        store.listen_owners(self._hint)

    @property
    def watches(self) -> int:
        return sum(len(w) for w in self._watches.values())

    def _hint(self, owner: str | None) -> None:
        if owner is None:
            for watches in self._watches.values():
                for watch in watches:
                    watch.request()
        else:
            for watch in self._watches.get(owner, ()):
                watch.request()

    def watch(self, owner: str, statuses: frozenset[Status] | None, after: int,
              deliver: Deliver) -> Watch:
        """Deliver the owner's list (or its changes since `after`), then its changes, until
        closed. `deliver` is awaited before the next read: a slow one slows the feed."""
        watch = Watch(self, owner, statuses, after, deliver)
        self._watches.setdefault(owner, set()).add(watch)
        watch.request()
        return watch

    def remove(self, watch: Watch) -> None:
        watches = self._watches.get(watch.owner)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del self._watches[watch.owner]
