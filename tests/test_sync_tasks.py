"""Sync (`def`) tasks on threads, and timeouts: what runs where, what the event log says,
and what becomes of a thread that will not stop."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from bench.looplag import loop_lag, summary

from jobwire import Jobwire, Status, Worker
from jobwire.model import Event, Job
from jobwire.store import Store
from tests.conftest import Proc, guest
from tests.tasks import jobwire
from tests.test_store import replay

OWNER = "tester"


@pytest.fixture
async def start_worker(store: Store) -> AsyncIterator[Callable[..., Awaitable[Worker]]]:
    """Factory: an in-process worker on the test's store, stopped at teardown."""
    workers: list[Worker] = []

    async def start(**options: Any) -> Worker:
        worker = Worker(jobwire, store, lease_seconds=2, poll_seconds=0.05, **options)
        await worker.start()
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        await worker.stop()


async def until(check: Callable[[], Awaitable[Any]], seconds: float = 10) -> Any:
    """Poll `check` until it returns something true; that value."""
    deadline = time.monotonic() + seconds
    while not (found := await check()):
        assert time.monotonic() < deadline, f"gave up after {seconds} s"
        await asyncio.sleep(0.02)
    return found


async def ended(store: Store, job_id: str, seconds: float = 10) -> Job:
    async def check() -> Job | None:
        job = await store.get_job(job_id)
        return job if job is not None and job.status.terminal else None
    found: Job = await until(check, seconds)
    return found


async def log(store: Store, job_id: str) -> list[Event]:
    return await store.events(job_id, 0)


def started_at(events: list[Event]) -> float:
    return next(ev.at for ev in events if ev.type == "started")


async def test_sync_task_reports_progress_and_items(store: Store, start_worker: Any) -> None:
    await start_worker(concurrency=2)
    job, _ = await store.submit(OWNER, "sync_steps", {"n": 5}, None, 2)
    done = await ended(store, job.id)
    assert done.status == Status.COMPLETED, done.error
    assert done.result["ran"] == 5
    assert done.result["thread"].startswith("jobwire sync_steps")  # not the loop's thread
    assert done.info == {"stage": "items", "thread": done.result["thread"]}
    snap, items = await replay(store, job.id)  # counts agree with items at every seq
    assert snap["status"] == "completed" and snap["progress"]["done"] == 5
    assert {ref: item["status"] for ref, item in items.items()} == {
        f"i{k}": "done" for k in range(5)}
    types = [ev.type for ev in await log(store, job.id)]
    assert types.count("item") == 10  # running, then done, for each item


async def test_sync_task_sees_a_cancel(store: Store, start_worker: Any, tmp_path: Path
                                       ) -> None:
    worker = await start_worker(concurrency=1)
    marker = tmp_path / "saw"
    job, _ = await store.submit(OWNER, "sync_block", {"marker": str(marker)}, None, 1)

    async def blocking() -> bool:
        found = await store.get_job(job.id)
        return found is not None and found.info == {"stage": "blocking"}
    await until(blocking)
    await store.request_cancel(job.id, OWNER)
    assert (await ended(store, job.id)).status == Status.CANCELLED

    async def saw() -> str:
        return marker.read_text() if marker.exists() else ""
    # Cancelled if it looked before the attempt ended, else Closed (a Cancelled too)
    assert await until(saw, 5) in ("Cancelled", "Closed")

    async def thread_returned() -> bool:
        return worker._runner.busy == 0
    await until(thread_returned, 5)


async def test_async_task_past_its_timeout_fails_and_frees_its_slot(
        store: Store, start_worker: Any, tmp_path: Path) -> None:
    await start_worker(concurrency=1)
    nap, _ = await store.submit(OWNER, "nap", {"marker": "-", "seconds": 30}, None, 1)
    nxt, _ = await store.submit(OWNER, "echo", "next", None, 1)
    failed = await ended(store, nap.id, 5)
    assert (failed.status, failed.error) == (Status.FAILED, "timed out after 0.5 s")
    events = await log(store, nap.id)
    assert events[-1].type == "failed" and events[-1].data["error"] == "timed out after 0.5 s"
    assert 0.5 <= events[-1].at - started_at(events) < 2.5
    assert (await ended(store, nxt.id, 5)).result == "next"  # the one slot was free again


async def test_worker_default_timeout_applies_to_tasks_without_one(
        store: Store, start_worker: Any) -> None:
    await start_worker(concurrency=1, task_timeout=0.3)
    job, _ = await store.submit(OWNER, "block", {"cooperative": False}, None, 1)
    failed = await ended(store, job.id, 5)
    assert (failed.status, failed.error) == (Status.FAILED, "timed out after 0.3 s")


async def test_sync_task_blocking_past_its_timeout_is_orphaned(
        store: Store, start_worker: Any, tmp_path: Path) -> None:
    worker = await start_worker(concurrency=1, threads=2)
    marker = tmp_path / "orphan"
    nap, _ = await store.submit(OWNER, "sync_nap", {"marker": str(marker), "seconds": 3},
                                None, 1)
    nxt, _ = await store.submit(OWNER, "sync_steps", {"n": 1}, None, 1)
    failed = await ended(store, nap.id, 5)
    assert (failed.status, failed.error) == (Status.FAILED, "timed out after 0.5 s")
    assert (await ended(store, nxt.id, 5)).status == Status.COMPLETED
    assert not marker.exists(), "the orphan returned before the next job ran"

    async def returned() -> dict[str, Any] | None:
        return json.loads(marker.read_text()) if marker.exists() else None
    orphan = await until(returned, 10)
    assert started_at(await log(store, nxt.id)) < orphan["at"]
    assert orphan["outcome"].startswith("refused: Closed: ")
    await asyncio.sleep(0.2)  # were anything written after all, it would be by now
    events = await log(store, nap.id)
    assert [ev.type for ev in events][-2:] == ["items", "failed"]  # nothing after the end
    found = await store.job_with_items(nap.id)
    assert found is not None and [i.status.value for i in found[1]] == ["pending"]
    assert worker._runner.busy == 0


async def test_orphans_hold_their_threads_and_async_tasks_still_run(
        store: Store, start_worker: Any, tmp_path: Path) -> None:
    """With its one thread held by an orphan, a worker claims no sync job (it would wait
    for a thread while its lease and timeout ran) but still runs async ones."""
    await start_worker(concurrency=1, threads=1)
    marker = tmp_path / "orphan"
    nap, _ = await store.submit(OWNER, "sync_nap", {"marker": str(marker), "seconds": 2},
                                None, 1)
    sync_job, _ = await store.submit(OWNER, "sync_steps", {"n": 1}, None, 1)
    async_job, _ = await store.submit(OWNER, "echo", "async", None, 1)
    assert (await ended(store, nap.id, 5)).error == "timed out after 0.5 s"
    assert (await ended(store, async_job.id, 5)).result == "async"
    assert not marker.exists()
    assert (await ended(store, sync_job.id, 10)).status == Status.COMPLETED
    orphan_returned = json.loads(marker.read_text())["at"]
    assert started_at(await log(store, sync_job.id)) >= orphan_returned


async def test_a_timeout_through_a_real_server(procs: Any, db_url: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """JOBWIRE_TASK_TIMEOUT reaches `jobwire serve`'s worker; the UI's failed event says
    why."""
    monkeypatch.setenv("JOBWIRE_TASK_TIMEOUT", "0.4")
    server: Proc = procs("serve", "--db", db_url, "--lease", "2")
    client = await guest(server.url)
    try:
        job, _ = await client.submit("block", {"cooperative": False})
        assert (await client.wait_terminal(job["id"], 10))["error"] == "timed out after 0.4 s"
        last = (await client.events(job["id"]))[-1]
        assert (last["type"], last["data"]["error"]) == ("failed", "timed out after 0.4 s")
    finally:
        await client.http.aclose()


async def test_loop_lag_under_busy_sync_tasks(tmp_path: Path) -> None:
    """The loop that serves the API keeps ticking while 10 sync tasks run. Figures are
    printed (-s); the bound only tells threads from the loop: a task run on the loop
    would stall it for the whole window and more."""
    rows = {}
    for task in (None, "snooze", "spin"):
        db = f"sqlite:///{tmp_path / f'{task}.db'}"
        rows[task] = summary(await loop_lag(db, task, seconds=1.5))
        print(f"loop lag (ms) with 10 {task or 'no'} sync tasks: "
              + ", ".join(f"{k} {v:.1f}" for k, v in rows[task].items()))
    assert rows["snooze"]["max"] < 1000 and rows["spin"]["max"] < 1000


def test_timeout_must_be_positive() -> None:
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="timeout must be more than 0"):
            Jobwire().task(timeout=bad)
