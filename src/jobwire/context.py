"""What a running task sees of its job: `Context` for `async def` tasks, `SyncContext`
(the same calls, blocking) for plain `def` tasks running on threads."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from jobwire.app import Fail
from jobwire.model import JSON, Item, ItemStatus, Job
from jobwire.store import ItemUpdate, Lease, Store, Written

T = TypeVar("T")


class Cancelled(Exception):
    """Raised by `Context.raise_if_cancelled` when the job's owner asked to cancel."""


class TooManyItems(Fail):
    """A task declared more items than the server's per-job limit; the job fails (at
    once: a retry would declare as many)."""


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

    @property
    def final_attempt(self) -> bool:
        """No attempt follows this one, whatever it raises."""
        return self.attempt >= self.job.max_attempts

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


class Closed(Cancelled):
    """A sync task called its context after its attempt had ended (timed out, cancelled,
    lease lost, worker stopping): nothing is recorded. A `Cancelled`, so a task that
    stops on cancellation stops on this too."""


class SyncContext:
    """What a plain `def` task sees: `Context`'s calls, blocking, safe to make from the
    task's thread. Each runs on the worker's event loop and returns what `Context`'s
    returns; once the attempt has ended each raises `Closed` and records nothing."""

    def __init__(self, ctx: Context, loop: asyncio.AbstractEventLoop) -> None:
        self._ctx = ctx
        self._loop = loop
        self.closed = False  # set on the loop when the attempt ends

    @property
    def job(self) -> Job:
        return self._ctx.job

    @property
    def lease(self) -> Lease:
        return self._ctx.lease

    @property
    def attempt(self) -> int:
        return self._ctx.attempt

    @property
    def final_attempt(self) -> bool:
        return self._ctx.final_attempt

    @property
    def cancelled(self) -> bool:
        return self._ctx.cancelled or self.closed

    def _call(self, call: Callable[[], Coroutine[Any, Any, T]]) -> T:
        self._raise_if_closed()
        return asyncio.run_coroutine_threadsafe(self._on_loop(call), self._loop).result()

    async def _on_loop(self, call: Callable[[], Coroutine[Any, Any, T]]) -> T:
        # Checked again on the loop, where the attempt ends: a call that was on its way
        # when the attempt ended is refused too.
        self._raise_if_closed()
        return await call()

    def _raise_if_closed(self) -> None:
        if self.closed:
            raise Closed(f"job {self._ctx.job.id}: this attempt has ended; "
                         "its context is closed")

    def declare(self, refs: Sequence[str]) -> list[Item]:
        return self._call(lambda: self._ctx.declare(refs))

    def running(self, ref: str) -> None:
        self._call(lambda: self._ctx.running(ref))

    def done(self, ref: str, result: JSON = None) -> None:
        self._call(lambda: self._ctx.done(ref, result))

    def failed(self, ref: str, error: str) -> None:
        self._call(lambda: self._ctx.failed(ref, error))

    def update(self, updates: Sequence[ItemUpdate]) -> None:
        """Several item changes in one transaction (one event each)."""
        self._call(lambda: self._ctx.update(updates))

    def report(self, info: JSON) -> None:
        """Free-form progress (a stage name, a message) shown as the job's `info`."""
        self._call(lambda: self._ctx.report(info))

    def raise_if_cancelled(self) -> None:
        self._raise_if_closed()
        self._ctx.raise_if_cancelled()
