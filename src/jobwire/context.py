"""What a running task sees of its job: its input, its items, and cancellation."""

from __future__ import annotations

from collections.abc import Sequence

from jobwire.model import JSON, Item, ItemStatus, Job
from jobwire.store import ItemUpdate, Lease, Store, Written


class Cancelled(Exception):
    """Raised by `Context.raise_if_cancelled` when the job's owner asked to cancel."""


class TooManyItems(Exception):
    """A task declared more items than the server's per-job limit; the job fails."""


class Context:
    """What a running task sees of its job: its input, its items, and cancellation."""

    def __init__(self, job: Job, lease: Lease, store: Store, max_items: int = 100_000) -> None:
        self.job = job
        self.lease = lease
        self._store = store
        self._max_items = max_items
        self.cancelled = job.cancel_requested
        self.lost = False  # set when the lease is gone: the task is stopped, nothing recorded

    @property
    def attempt(self) -> int:
        return self.lease.attempt

    def _note(self, written: Written) -> None:
        self.cancelled = self.cancelled or written.cancel_requested

    async def declare(self, refs: Sequence[str]) -> list[Item]:
        """Declare the job's items (the progress total). Returns every item with its
        state: on a retry, items finished by an earlier attempt come back done/failed."""
        refs = list(dict.fromkeys(str(r) for r in refs))
        self._check_items(len(refs))
        written, items = await self._store.declare_items(self.lease, refs)
        self._note(written)
        self._check_items(len(items))  # earlier declare() calls add up
        return items

    def _check_items(self, count: int) -> None:
        if count > self._max_items:
            raise TooManyItems(f"the task declared {count} items; the limit is "
                               f"{self._max_items} per job")

    async def _set(self, ref: str, status: ItemStatus, result: JSON = None,
                   error: str | None = None) -> None:
        self._note(await self._store.update_items(
            self.lease, [ItemUpdate(str(ref), status, result, error)]))

    async def running(self, ref: str) -> None:
        await self._set(ref, ItemStatus.RUNNING)

    async def done(self, ref: str, result: JSON = None) -> None:
        await self._set(ref, ItemStatus.DONE, result=result)

    async def failed(self, ref: str, error: str) -> None:
        await self._set(ref, ItemStatus.FAILED, error=error)

    async def update(self, updates: Sequence[ItemUpdate]) -> None:
        """Several item changes in one transaction (one event each)."""
        self._note(await self._store.update_items(self.lease, updates))

    async def report(self, info: JSON) -> None:
        """Free-form progress (a stage name, a message) shown as the job's `info`."""
        self._note(await self._store.report(self.lease, info))

    def raise_if_cancelled(self) -> None:
        if self.cancelled:
            raise Cancelled()
