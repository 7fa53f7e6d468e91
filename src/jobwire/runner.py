"""How a task's function runs: `async def` tasks on the worker's event loop, plain `def`
tasks each on a thread of their own (at most `threads` at once), both under the task's
timeout. A sync task's thread cannot be interrupted: when its attempt ends early (timed
out, cancelled, lease lost, worker stopping) the job's slot is freed at once, the thread
runs on as an orphan whose context refuses every call, and its return value is dropped.
Orphans keep their threads, so they can't multiply past `threads`."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, cast

from jobwire.app import AsyncTaskFn, Fail, Retry, SyncTaskFn, TaskSpec
from jobwire.context import Context, SyncContext
from jobwire.model import JSON

log = logging.getLogger("jobwire.worker")


class TimedOut(Exception):
    """The attempt ran past its task's timeout. It ends the attempt as any exception the
    task raised would (the job fails with this error), so retries treat it alike."""


def error_text(exc: Exception) -> str:
    """The error a failed job records for the exception that ended its attempt: the
    message alone for jobwire's own (their type says nothing to the job's owner)."""
    if type(exc) in (TimedOut, Fail, Retry):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class Runner:
    """Starts one worker's tasks and counts the threads its sync tasks hold."""

    def __init__(self, threads: int, default_timeout: float | None,
                 on_thread_free: Callable[[], None]) -> None:
        if threads < 1:
            raise ValueError(f"sync task threads must be at least 1, not {threads}")
        if default_timeout is not None and not default_timeout > 0:
            raise ValueError(f"the task timeout must be more than 0 s, not {default_timeout}")
        self.threads = threads
        self.default_timeout = default_timeout
        self._on_thread_free = on_thread_free
        self.busy = 0  # threads held by sync tasks, orphans included (counted on the loop)

    def claimable(self, tasks: dict[str, TaskSpec], free: int) -> tuple[list[str], int]:
        """Which tasks to claim, and how many jobs, given `free` job slots. A sync job is
        claimed only with a thread ready for it, so none waits for one while its lease
        and timeout run; with every thread held (by orphans, say) only async tasks are."""
        idle = self.threads - self.busy
        if idle >= free:
            return list(tasks), free
        if idle > 0:
            return list(tasks), idle
        return [name for name, spec in tasks.items() if not spec.sync], free

    def start(self, spec: TaskSpec, ctx: Context) -> asyncio.Task[JSON]:
        timeout = spec.timeout if spec.timeout is not None else self.default_timeout
        if not spec.sync:
            run = self._async(spec, ctx)
            # Without a timeout, no timer and no coroutine around the task's own.
            return asyncio.create_task(run if timeout is None else self._timed(timeout, run))
        # The thread is counted from now, not from when the task first runs, so that the
        # claim loop's next count (made before this task runs) sees it taken.
        self.busy += 1
        outcome: concurrent.futures.Future[JSON] = concurrent.futures.Future()
        task = asyncio.create_task(self._timed(timeout, self._sync(spec, ctx, outcome)))
        task.add_done_callback(lambda _: self._release_unless_started(outcome))
        return task

    async def _async(self, spec: TaskSpec, ctx: Context) -> JSON:
        return await cast(AsyncTaskFn, spec.fn)(ctx, spec.parse(ctx.job.input))

    async def _sync(self, spec: TaskSpec, ctx: Context,
                    outcome: concurrent.futures.Future[JSON]) -> JSON:
        fn = cast(SyncTaskFn, spec.fn)
        value = spec.parse(ctx.job.input)
        loop = asyncio.get_running_loop()
        sync = SyncContext(ctx, loop)

        def body() -> None:
            try:
                outcome.set_result(fn(sync, value))
            except BaseException as exc:  # handed to the awaiting task, if still there
                outcome.set_exception(exc)
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is gone, the count too
                    loop.call_soon_threadsafe(self._release)

        outcome.set_running_or_notify_cancel()  # so cutting our wait short leaves it be
        try:
            # A daemon: an orphan must not hold up the process's exit.
            threading.Thread(target=body, name=f"jobwire {spec.name} {ctx.job.id}",
                             daemon=True).start()
        except BaseException:  # no thread to give it back (out of threads, say)
            self._release()
            raise
        try:
            return await asyncio.wrap_future(outcome)
        finally:
            sync.closed = True
            if not outcome.done():
                log.warning("job %s: the attempt ended while its thread runs on; its "
                            "context is closed (%d of %d threads held)", ctx.job.id,
                            self.busy, self.threads)

    @staticmethod
    async def _timed(seconds: float | None, run: Coroutine[Any, Any, JSON]) -> JSON:
        try:
            async with asyncio.timeout(seconds) as limit:
                return await run
        except TimeoutError:
            if limit.expired():
                raise TimedOut(f"timed out after {seconds:g} s") from None
            raise  # the task's own TimeoutError: an error like any other

    def _release_unless_started(self, outcome: concurrent.futures.Future[JSON]) -> None:
        # A task that ended before starting its thread (bad input, cancelled at once)
        # gives the thread back here; a started thread gives it back when it returns.
        if not (outcome.running() or outcome.done()):
            self._release()

    def _release(self) -> None:
        self.busy -= 1
        self._on_thread_free()
