"""The worker runtime in one process: what it does with an attempt whose lease ran out
without its noticing."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from pydantic import BaseModel

from jobwire import Context, Jobwire
from jobwire.model import Status
from jobwire.store import Lease, StoreError, open_store
from jobwire.worker import Worker

app = Jobwire()
stopped: list[int] = []  # the attempts of `stall` that were stopped (cancelled)


class Stall(BaseModel):
    first: float  # how long attempt 1 runs
    later: float  # how long later attempts run


@app.task(input=Stall, max_attempts=3)
async def stall(ctx: Context, input: Stall) -> int:
    """Runs without writing anything, so only heartbeats keep its lease."""
    try:
        await asyncio.sleep(input.first if ctx.attempt == 1 else input.later)
    except asyncio.CancelledError:
        stopped.append(ctx.attempt)
        raise
    return ctx.attempt


async def test_reclaimed_job_stops_its_stale_attempt_and_keeps_the_new_one(
        db_url: str) -> None:
    """Attempt 1's heartbeats fail (a stalled, loaded worker), its lease runs out and the
    same worker claims the job again. Attempt 1 must be stopped then; left running, it
    ended later and freed attempt 2's slot, so attempt 2 was no longer heartbeated, its
    lease ran out too, and so on until the job failed with every attempt lost."""
    stopped.clear()
    store = open_store(db_url)
    await store.open()
    heartbeat = store.heartbeat

    async def failing_for_attempt_1(leases: Sequence[Lease], seconds: float
                                    ) -> dict[str, bool]:
        if any(lease.attempt == 1 for lease in leases):
            raise StoreError("heartbeat lost on a loaded machine")
        return await heartbeat(leases, seconds)

    store.heartbeat = failing_for_attempt_1  # type: ignore[method-assign]
    worker = Worker(app, store, lease_seconds=0.4, poll_seconds=0.05)
    try:
        job, _ = await store.submit("o", "stall", {"first": 1.5, "later": 2.0}, None, 3)
        await worker.start()
        for _ in range(200):
            ended = await store.get_job(job.id)
            assert ended is not None
            if not ended.status.active:
                break
            await asyncio.sleep(0.05)
        kinds = [e.type for e in await store.events(job.id, 0)]
        assert ended.status == Status.COMPLETED, (ended.error, kinds)
        assert ended.attempt == 2 and ended.result == 2
        assert kinds == ["created", "started", "retrying", "started", "completed"]
        assert stopped == [1], "the stale attempt was stopped when the job was reclaimed"
    finally:
        await worker.stop()
        await store.close()


@app.task()
async def quick(ctx: Context, input: object) -> object:
    return input


async def test_a_job_committed_while_a_claim_runs_wakes_the_worker(db_url: str) -> None:
    """A claim whose snapshot came before a job's commit finds nothing; the job's hint
    arrived while it ran. That hint must still wake the worker, which claims the job at
    once instead of at its next poll (a minute here). It was cleared after the claim,
    and the job waited for the poll."""
    store = open_store(db_url)
    await store.open()
    claim = store.claim
    in_claim, release = asyncio.Event(), asyncio.Event()

    async def first_claim_sees_nothing(*args: object, **kwargs: object) -> list[object]:
        if not release.is_set():  # the first claim: it "began" before the commit below
            in_claim.set()
            await release.wait()
            return []
        return await claim(*args, **kwargs)  # type: ignore[arg-type]

    store.claim = first_claim_sees_nothing  # type: ignore[assignment]
    worker = Worker(app, store, concurrency=1, poll_seconds=60)
    try:
        await worker.start()
        await asyncio.wait_for(in_claim.wait(), 10)
        job, _ = await store.submit("o", "quick", 7, None, 1)  # its hint wakes the worker
        release.set()
        for _ in range(100):  # 10 s at most, against the minute of a poll
            ended = await store.get_job(job.id)
            assert ended is not None
            if ended.status == Status.COMPLETED:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the job waited for the worker's next poll")
    finally:
        await worker.stop()
        await store.close()
