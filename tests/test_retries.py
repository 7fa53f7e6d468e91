"""Retries after errors, with backoff, and jobs that wait for their run_at: a real worker
on each backend, its attempts read back from the event log."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import datetime

import orjson
import pytest

from jobwire import Context, Fail, Jobwire, Retry
from jobwire.model import Event, Job, Status, apply_event, backoff
from jobwire.store import Store, open_store
from jobwire.worker import Worker
from tests.conftest import Client

app = Jobwire()
ITEMS = ["a", "b", "c"]


@app.task(max_attempts=3, retry_delay=0.3, retry_max_delay=0.5)
async def flaky(ctx: Context, input: object) -> int:
    """Attempt k finishes item k-1 if not done yet, starts the next, then (k < 3) raises:
    each retry finds the earlier attempts' items done and the one it left running pending."""
    items = await ctx.declare(ITEMS)
    for item in items:
        if item.status == "pending":
            await ctx.done(item.ref, ctx.attempt)
            break
    if ctx.attempt < 3:
        await ctx.running(ITEMS[ctx.attempt])
        raise RuntimeError(f"flaky {ctx.attempt}")
    return ctx.attempt


@app.task(max_attempts=2, retry_delay=0.05)
async def always(ctx: Context, input: object) -> None:
    raise RuntimeError(f"attempt {ctx.attempt}")


@app.task(max_attempts=3)
async def refuse(ctx: Context, input: object) -> None:
    raise Fail("no use trying again")


@app.task(max_attempts=3, retry_delay=0.05, retry_on=(ConnectionError,))
async def picky(ctx: Context, input: str) -> int:
    if ctx.attempt == 1:
        raise ConnectionError("reset") if input == "transient" else ValueError("bad data")
    return ctx.attempt


@app.task(max_attempts=2, retry_delay=300.0, retry_max_delay=300.0)
async def asks(ctx: Context, input: float) -> int:
    """Asks for its own delay; the backoff's (up to 300 s) would fail the test."""
    if ctx.attempt == 1:
        raise Retry("try later", delay=input)
    return ctx.attempt


@app.task(max_attempts=2, timeout=0.3, retry_delay=0.05)
async def slow_once(ctx: Context, input: object) -> int:
    if ctx.attempt == 1:
        await asyncio.sleep(5)
    return ctx.attempt


@app.task(max_attempts=3, retry_delay=0.05)
async def cancel_then_raise(ctx: Context, input: object) -> None:
    """Turns the cancel into another error: still cancelled work, never retried."""
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        raise RuntimeError("cleanup failed") from None


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    s = open_store(db_url)
    await s.open()
    worker = Worker(app, s, poll_seconds=0.05, lease_seconds=5)
    await worker.start()
    try:
        yield s
    finally:
        await worker.stop()
        await s.close()


async def ended(store: Store, job: Job, timeout: float = 15) -> tuple[Job, list[Event]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = await store.get_job(job.id)
        assert found is not None
        if found.status.terminal:
            return found, await store.events(job.id, 0)
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job.id} did not end: {await store.events(job.id, 0)}")


def epoch(text: object) -> float:
    assert isinstance(text, str)
    return datetime.fromisoformat(text).timestamp()


async def test_flaky_task_completes_on_attempt_3_after_backoff(store: Store) -> None:
    job, _ = await store.submit("o", "flaky", None, None, 3)
    done, events = await ended(store, job)
    assert done.status == Status.COMPLETED and done.result == 3 and done.attempt == 3
    kinds = [e.type for e in events]
    assert kinds.count("retrying") == 2 and kinds[-1] == "completed"
    retries = [e for e in events if e.type == "retrying"]
    starts = [e for e in events if e.type == "started"]
    for n, (retry, start) in enumerate(zip(retries, starts[1:], strict=True), start=1):
        assert retry.data["attempt"] == n and retry.data["error"] == f"RuntimeError: flaky {n}"
        assert retry.data["status"] == "queued" and retry.data["reset"] == [ITEMS[n]]
        run_at = epoch(retry.data["run_at"])
        assert retry.at - 0.01 <= run_at <= retry.at + 0.5 + 0.01, "backoff within its cap"
        assert start.at >= run_at - 0.01, "claimed before its run_at"
        assert start.data["attempt"] == n + 1
    # Each item was finished once, by one attempt, and counted once.
    assert done.progress.as_dict() == {"total": 3, "done": 3, "failed": 0}
    found = await store.job_with_items(job.id)
    assert found is not None
    assert [(i.ref, i.status.value, i.result) for i in found[1]] == [
        ("a", "done", 1), ("b", "done", 2), ("c", "done", 3)]
    # The event log folds into exactly what the store says, run_at included.
    snap = {**done.snapshot(), "seq": 0}
    items: dict[str, object] = {}
    for ev in events:
        snap, items = apply_event(snap, items, orjson.loads(ev.wire))  # type: ignore[arg-type]
    assert snap == done.snapshot()


async def test_last_attempt_fails_with_its_error(store: Store) -> None:
    job, _ = await store.submit("o", "always", None, None, 2)
    done, events = await ended(store, job)
    assert done.status == Status.FAILED and done.error == "RuntimeError: attempt 2"
    assert [e.type for e in events] == ["created", "started", "retrying", "started", "failed"]


async def test_fail_fails_at_once(store: Store) -> None:
    job, _ = await store.submit("o", "refuse", None, None, 3)
    done, events = await ended(store, job)
    assert (done.status, done.attempt, done.error) == (Status.FAILED, 1, "no use trying again")
    assert "retrying" not in [e.type for e in events]


async def test_retry_on_names_the_errors_that_retry(store: Store) -> None:
    (bad, _), (transient, _) = [await store.submit("o", "picky", value, None, 3)
                                for value in ("bad", "transient")]
    failed, _ = await ended(store, bad)
    assert (failed.status, failed.attempt, failed.error) == (
        Status.FAILED, 1, "ValueError: bad data")
    done, _ = await ended(store, transient)
    assert (done.status, done.result) == (Status.COMPLETED, 2)


async def test_retry_asks_for_its_delay(store: Store) -> None:
    job, _ = await store.submit("o", "asks", 0.6, None, 2)
    done, events = await ended(store, job)
    assert done.status == Status.COMPLETED and done.result == 2
    retry = next(e for e in events if e.type == "retrying")
    start = [e for e in events if e.type == "started"][1]
    assert retry.data["error"] == "try later"
    assert 0.59 <= epoch(retry.data["run_at"]) - retry.at <= 0.7
    assert start.at >= epoch(retry.data["run_at"]) - 0.01


async def test_timeout_is_retried_like_an_error(store: Store) -> None:
    job, _ = await store.submit("o", "slow_once", None, None, 2)
    done, events = await ended(store, job)
    assert (done.status, done.result) == (Status.COMPLETED, 2)
    retry = next(e for e in events if e.type == "retrying")
    assert retry.data["error"] == "timed out after 0.3 s" and retry.data["attempt"] == 1


async def test_cancelled_work_is_never_retried(store: Store) -> None:
    job, _ = await store.submit("o", "cancel_then_raise", None, None, 3)
    for _ in range(100):
        if (await store.get_job(job.id)).status == Status.RUNNING:  # type: ignore[union-attr]
            break
        await asyncio.sleep(0.02)
    await store.request_cancel(job.id, "o")
    done, events = await ended(store, job)
    assert (done.status, done.attempt, done.error) == (
        Status.FAILED, 1, "RuntimeError: cleanup failed")
    assert "retrying" not in [e.type for e in events]


async def test_a_waiting_job_is_not_claimed_before_its_run_at(db_url: str) -> None:
    """The store alone: a job with a delay is left to later claims; a ready job of a
    later submit (and a worse rank) is claimed before it."""
    s = open_store(db_url)
    await s.open()
    try:
        later, _ = await s.submit("o", "echo", 1, None, 1, delay=0.5)
        now, _ = await s.submit("o", "echo", 2, None, 1)
        assert later.run_at is not None and abs(later.run_at - later.created_at - 0.5) < 0.1
        assert later.snapshot()["run_at"] is not None and now.snapshot()["run_at"] is None
        # The created event says it as the snapshot does, to the character.
        assert (await s.events(later.id, 0))[0].data["run_at"] == later.snapshot()["run_at"]
        assert [j.id for j in await s.claim("w", ["echo"], 10, 30)] == [now.id]
        assert await s.claim("w", ["echo"], 10, 30) == []
        await asyncio.sleep(later.run_at - time.time() + 0.05)
        claimed = await s.claim("w", ["echo"], 10, 30)
        assert [j.id for j in claimed] == [later.id]
        assert claimed[0].run_at == later.run_at  # the snapshot keeps when it was due
    finally:
        await s.close()


async def test_a_delayed_job_starts_at_its_run_at(client: Client) -> None:
    """Through the API and a server's worker (polling each second): not before run_at,
    and within 1.5 s after it."""
    job, created = await client.submit_with("echo", "later", delay=2)
    assert created and job["status"] == "queued"
    run_at = epoch(job["run_at"])
    assert abs(run_at - epoch(job["created_at"]) - 2) < 0.5  # the database's clock
    done = await client.wait_terminal(job["id"])
    assert done["status"] == "completed" and done["run_at"] == job["run_at"]
    started = next(e for e in await client.events(job["id"]) if e["type"] == "started")
    assert run_at - 0.01 <= epoch(started["at"]) <= run_at + 1.5


async def test_a_run_at_in_the_past_runs_now(client: Client) -> None:
    past = "2020-01-01T00:00:00+02:00"
    job, _ = await client.submit_with("echo", "now", run_at=past)
    assert job["run_at"] == "2019-12-31T22:00:00.000Z"  # normalised to UTC
    done = await client.wait_terminal(job["id"])
    started = next(e for e in await client.events(job["id"]) if e["type"] == "started")
    assert done["status"] == "completed"
    assert epoch(started["at"]) - epoch(job["created_at"]) < 1.5


@pytest.mark.parametrize(("extra", "field"), [
    ({"delay": -1}, "delay"),
    ({"delay": "soon"}, "delay"),
    ({"delay": 31 * 24 * 3600}, "delay"),
    ({"run_at": "2030-01-01T00:00:00"}, "run_at"),  # no time zone
    ({"run_at": "tomorrow"}, "run_at"),
    ({"run_at": 1893456000}, "run_at"),  # seconds or milliseconds? text only
    ({"run_at": "0001-01-01T00:00:00+01:00"}, "run_at"),  # year 0 in UTC (was a 500)
    ({"run_at": "9999-12-31T23:00:00-05:00"}, "run_at"),  # year 10000 in UTC
    ({"run_at": "2999-01-01T00:00:00Z"}, "run_at"),  # past the 30 days
    ({"delay": 5, "run_at": "2020-01-01T00:00:00Z"}, "run_at"),  # not both
])
async def test_bad_delay_or_run_at_is_422_naming_it(
        client: Client, extra: dict[str, object], field: str) -> None:
    r = await client.http.post("/api/jobs", json={"task": "echo", "input": 1, **extra})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", field]
    assert (await client.http.get("/api/jobs")).json() == []  # nothing stored


async def test_a_delayed_job_is_deduplicated_like_any_active_job(client: Client) -> None:
    job, created = await client.submit_with("echo", 1, key="k", delay=600)
    again, created_again = await client.submit_with("echo", 2, key="k")
    assert created and not created_again and again["id"] == job["id"]
    assert again["run_at"] == job["run_at"] and again["status"] == "queued"
    r = await client.http.post(f"/api/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"


def test_backoff_is_exponential_with_full_jitter_and_capped() -> None:
    assert [backoff(n, 1.0, 300.0, 0.5) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert backoff(3, 1.0, 300.0, 0.0) == 0.0  # full jitter: anywhere from 0
    assert backoff(20, 1.0, 300.0, 0.5) == 150.0  # the cap, then the jitter
    assert backoff(10**6, 1.0, 300.0, 0.5) == 150.0  # no overflow, however many attempts
