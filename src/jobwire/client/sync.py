"""A blocking facade over the async Client, which runs on a private event-loop thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

from jobwire.client.core import Client, TokenSource
from jobwire.client.snapshot import JSON, Snapshot

T = TypeVar("T")


async def _next(states: AsyncIterator[Snapshot]) -> Snapshot:
    return await anext(states)


class SyncClient:
    """Same calls as `Client`, blocking; `watch` is a plain iterator. Call `close()` (or use
    it as a context manager) to stop its thread."""

    def __init__(self, url: str, token: str | TokenSource | None = None, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="jobwire-client")
        self._thread.start()
        self.client: Client = self._run(self._make(url, token, options))

    @staticmethod
    async def _make(url: str, token: str | TokenSource | None, options: dict[str, Any]) -> Client:
        return Client(url, token, **options)  # built on its loop: its asyncio objects live there

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def submit(self, task: str, input: JSON = None, key: str | None = None, *,
               delay: float | None = None, run_at: datetime | str | None = None,
               priority: int | None = None) -> tuple[dict[str, JSON], bool]:
        return self._run(self.client.submit(task, input, key, delay=delay, run_at=run_at,
                                            priority=priority))

    def login(self, user_token: str) -> int:
        return self._run(self.client.login(user_token))

    def jobs(self, status: str | None = None, limit: int = 50,
             id_prefix: str | None = None) -> list[dict[str, JSON]]:
        return self._run(self.client.api.jobs(status, limit, id_prefix))

    def job(self, job_id: str) -> dict[str, JSON]:
        return self._run(self.client.job(job_id))

    def cancel(self, job_id: str) -> dict[str, JSON]:
        return self._run(self.client.cancel(job_id))

    def delete(self, job_id: str) -> None:
        self._run(self.client.delete(job_id))

    def wait(self, job_id: str) -> JSON:
        return self._run(self.client.wait(job_id))

    def recover(self) -> list[dict[str, JSON]]:
        return self._run(self.client.recover())

    def watch(self, job_id: str) -> Iterator[Snapshot]:
        states = self.client.watch(job_id)
        try:
            while True:
                try:
                    yield self._run(_next(states))
                except StopAsyncIteration:
                    return
        finally:
            self._run(states.aclose())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self.client.aclose())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
