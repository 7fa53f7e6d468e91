"""Single flight: concurrent callers of one operation share one run and its result."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """Calls made while a run is in progress await that run instead of starting one;
    the first call after it finished starts a fresh run."""

    def __init__(self, fn: Callable[[], Awaitable[T]]) -> None:
        self.fn = fn
        self._task: asyncio.Future[T] | None = None

    async def __call__(self) -> T:
        if self._task is None:
            task = self._task = asyncio.ensure_future(self.fn())
            task.add_done_callback(self._landed)
        # One caller giving up (cancelled) must not cancel the run the others await.
        return await asyncio.shield(self._task)

    def _landed(self, task: asyncio.Future[T]) -> None:
        if self._task is task:
            self._task = None
        if not task.cancelled():
            task.exception()  # retrieved here too, in case every caller gave up
