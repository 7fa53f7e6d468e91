"""Group commit for asyncio: calls that arrive while one batch is being written wait and
go together in the next, so a burst of N calls costs one transaction, not N."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

R = TypeVar("R")
T = TypeVar("T")

# Writes the requests and returns, in their order, each one's result or the exception
# that request alone must raise; an exception raised by the writer fails them all.
Writer = Callable[[list[R]], Awaitable[Sequence[T | BaseException]]]


class Batcher(Generic[R, T]):
    """One writer task at a time: no lock, no timer. The first call of an idle batcher
    starts the writer on the next loop turn, so calls made in the same turn join it."""

    def __init__(self, write: Writer[R, T]) -> None:
        self._write = write
        self._pending: list[tuple[R, asyncio.Future[T]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def __call__(self, request: R) -> T:
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((request, fut))
        if self._writer is None:
            self._writer = asyncio.create_task(self._drain())
        # A caller that is cancelled only stops waiting: its request is written all the same.
        return await asyncio.shield(fut)

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    outcomes = await self._write([request for request, _ in batch])
                except Exception as exc:
                    outcomes = [exc] * len(batch)
                except BaseException:  # cancelled (the loop is closing): nobody waits on
                    for _, fut in batch + self._pending:
                        fut.cancel()
                    self._pending = []
                    raise
                _settle(batch, outcomes)
        finally:
            self._writer = None


def _settle(batch: Sequence[tuple[object, asyncio.Future[T]]],
            outcomes: Sequence[T | BaseException]) -> None:
    for (_, fut), outcome in zip(batch, outcomes, strict=True):
        if fut.done():
            continue
        if isinstance(outcome, BaseException):
            fut.set_exception(outcome)
        else:
            fut.set_result(outcome)
