"""Concurrent identical store calls share one, without ever answering from an older one.

A burst of requests that ask the store the same question (a thousand submits of one dedup
key, each also looking up the same session token) would otherwise each pay a database
round trip. Callers with one key queue up; each round runs ONE call for everyone queued
when it starts, and those who arrive while it runs wait for the next round. So every
answer comes from a call that started after its caller arrived: nothing is cached, and a
session claimed or expired a moment ago, or a job that just finished, is seen exactly as
by a call of one's own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_Waiter = tuple[Callable[[], Awaitable[V]], "asyncio.Future[tuple[V, bool]]"]


class Coalescer(Generic[K, V]):
    def __init__(self) -> None:
        self._queued: dict[K, list[_Waiter[V]]] = {}
        # Keys with a round running: its task (a strong reference while it runs), or None
        # while a caller runs its own call alone.
        self._rounds: dict[K, asyncio.Task[None] | None] = {}

    async def run(self, key: K, call: Callable[[], Awaitable[V]]) -> tuple[V, bool]:
        """The value of a call of the round this caller joins, and whether it was this
        caller's own `call` (the first caller of a round; the others' are not made).
        An exception of the call is raised to every caller of its round."""
        if key not in self._rounds:
            # Nothing queued or running for `key`: this caller's call is a round of its
            # own, run here rather than by a task (the common case of distinct keys).
            return await self._alone(key, call), True
        done: asyncio.Future[tuple[V, bool]] = asyncio.get_running_loop().create_future()
        self._queued.setdefault(key, []).append((call, done))
        return await done

    async def _alone(self, key: K, call: Callable[[], Awaitable[V]]) -> V:
        self._rounds[key] = None
        try:
            return await call()
        finally:
            # Whatever became of this call (answered, raised, cancelled), those who
            # arrived during it get the next round.
            del self._rounds[key]
            if key in self._queued:
                self._rounds[key] = asyncio.create_task(self._drain(key))

    async def _drain(self, key: K) -> None:
        waiters: list[_Waiter[V]] = []
        try:
            while queued := self._queued.pop(key, None):
                waiters = [(call, done) for call, done in queued if not done.done()]
                if not waiters:
                    continue  # all of this round hung up
                try:
                    value = await waiters[0][0]()
                except Exception as exc:
                    for _, done in waiters:
                        if not done.done():
                            done.set_exception(exc)
                else:
                    for i, (_, done) in enumerate(waiters):
                        if not done.done():
                            done.set_result((value, i == 0))
                waiters = []
        finally:
            del self._rounds[key]
            # Only when cancelled (the loop is closing): nobody is left to answer these.
            for _, done in waiters + self._queued.pop(key, []):
                done.cancel()
