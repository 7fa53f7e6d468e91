"""Per-owner and per-key concurrency limits (`@jw.task(concurrency=N)`), enforced by the
claim in the database: several worker processes never run more of one key at once, a
full key holds up no other job, and every way a run ends frees its slot (both backends)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from jobwire.app import InputError
from jobwire.model import Status
from jobwire.runtime import Runtime
from jobwire.settings import Settings
from jobwire.store import End, Lease, Placement, Store, open_store
from jobwire.worker import Worker
from tests import limit_tasks

WORKERS = 3


def _most_at_once(lines: list[dict[str, str]]) -> tuple[dict[str, int], int]:
    """From the runs' start/end lines in the order they were written: the most runs of
    each group at once, and the most runs of any groups at once."""
    now: dict[str, int] = {}
    most: dict[str, int] = {}
    total = top = 0
    for line in lines:
        step = 1 if line["what"] == "start" else -1
        now[line["group"]] = now.get(line["group"], 0) + step
        most[line["group"]] = max(most.get(line["group"], 0), now[line["group"]])
        total += step
        top = max(top, total)
    return most, top


async def test_limits_hold_across_worker_processes(
        procs: Any, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three worker processes with 4 slots each, two owners with 10 one-at-a-time jobs
    each, and 12 jobs of one owner's API limited to 3 at once."""
    log = tmp_path / "runs.log"
    monkeypatch.setenv("JOBWIRE_TEST_RUN_LOG", str(log))
    submitted = []
    async with Runtime(limit_tasks.jobwire, Settings(db=db_url, concurrency=0)) as rt:
        for _ in range(10):
            for owner in ("user:a", "user:b"):
                submitted.append((await rt.submit(owner, "one_per_owner", {"s": 0.03}))[0])
        for _ in range(12):
            submitted.append((await rt.submit("user:a", "three_per_api",
                                              {"s": 0.05, "api": "x"}))[0])
        for _ in range(WORKERS):
            procs("worker", "--db", db_url, "--app", "tests.limit_tasks:jobwire",
                  "--concurrency", "4", "--lease", "5")
        for _ in range(600):  # at most 60 s
            if (await rt.store.count_by_status()).get("completed", 0) == len(submitted):
                break
            await asyncio.sleep(0.1)
        counts = await rt.store.count_by_status()
    assert counts == {"completed": len(submitted)}, counts
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert sum(line["what"] == "start" for line in lines) == len(submitted)
    most, _ = _most_at_once(lines)
    assert most["user:a"] == most["user:b"] == 1, most
    assert 2 <= most["user:a x"] <= 3, most
    # The two owners' one-at-a-time jobs did run side by side.
    _, both = _most_at_once([line for line in lines if line["group"] in ("user:a", "user:b")])
    assert both == 2


async def _one(store: Store, limit: int = 10) -> Lease | None:
    """Claim; the lease of the one job claimed, or None."""
    jobs = await store.claim("w", ["t"], limit, 30)
    assert len(jobs) <= 1, jobs
    return Lease(jobs[0].id, "w", jobs[0].attempt) if jobs else None


async def test_every_end_of_a_run_frees_its_slot(store: Store) -> None:
    key = Placement(limit_key="t\x1fuser:a", limit_max=1)
    limited = [(await store.submit("user:a", "t", None, None, 5, place=key))[0].id
               for _ in range(5)]
    first = await _one(store)
    assert first is not None and first.job in limited
    assert await _one(store) is None  # full
    # The error retried: its slot is free at once (the retry waits out its delay).
    await store.retry(first, "boom", 0)
    second = await _one(store)
    assert second is not None
    assert await _one(store) is None
    # The lease ran out (a dead worker): requeued, slot freed.
    await store.heartbeat([second], 0)
    await asyncio.sleep(0.01)
    assert await store.expire_leases() == 1
    third = await _one(store)
    assert third is not None
    # Cancelled while running.
    await store.request_cancel(third.job, "user:a")
    await store.finish(third, Status.CANCELLED)
    fourth = await _one(store)
    assert fourth is not None
    await store.finish(fourth, Status.COMPLETED)
    fifth = await _one(store)
    assert fifth is not None and await _one(store) is None


async def test_an_end_frees_its_slot_for_the_claim_in_the_same_call(store: Store) -> None:
    """A worker writes its ends together with its next claim: that claim already sees
    the slots the ends freed."""
    key = Placement(limit_key="t\x1fuser:a", limit_max=1)
    for _ in range(2):
        await store.submit("user:a", "t", None, None, 1, place=key)
    first = await _one(store)
    assert first is not None and await _one(store) is None  # full
    [written], jobs = await store.finish_and_claim([End(first, Status.COMPLETED)], "w", ["t"],
                                                   10, 30)
    assert not isinstance(written, Exception)
    assert len(jobs) == 1 and jobs[0].id != first.job
    assert await _one(store) is None  # full again: the next one holds the slot


async def test_a_full_key_holds_up_no_job_behind_it(store: Store) -> None:
    key = Placement(limit_key="t\x1fuser:a", limit_max=1)
    for _ in range(3):  # a's jobs, first in the claim order (ranks 0, 1, 2; b's is 0)
        await store.submit("user:a", "t", None, None, 1, place=Placement(
            priority=1, limit_key=key.limit_key, limit_max=1))
    free, _ = await store.submit("user:b", "t", None, None, 1)
    assert len(await store.claim("w", ["t"], 1, 30)) == 1  # a's first
    got = await store.claim("w", ["t"], 1, 30)  # room for one: the free job, not a's next
    assert [j.id for j in got] == [free.id]


async def test_one_claim_takes_no_more_of_a_key_than_it_has_room_for(store: Store) -> None:
    key = Placement(limit_key="t\x1fuser:a x", limit_max=3)
    for _ in range(5):
        await store.submit("user:a", "t", None, None, 1, place=key)
    assert len(await store.claim("w", ["t"], 10, 30)) == 3
    assert await store.claim("w", ["t"], 10, 30) == []


async def test_postgres_claim_walks_the_index(pg_url: str) -> None:
    """EXPLAIN of the claim statement on 20,000 queued jobs: the candidates come from the
    claim-order index, no scan or sort of the queued jobs."""
    from jobwire.store.postgres import PostgresStore

    store = open_store(pg_url)
    assert isinstance(store, PostgresStore)
    await store.open()
    try:
        async with store.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO jobs (id, task, owner, status, input, max_attempts, seq, rank, "
                "created_at, updated_at, priority, limit_key, limit_max) "
                "SELECT 'q' || x, 't', 'user:' || (x % 100), 'queued', 'null', 1, 1, x / 100, "
                "x, x, x % 3, CASE WHEN x % 2 = 0 THEN 'k' || (x % 10) END, 2 "
                "FROM generate_series(1, 20000) AS x")
            await conn.execute("ANALYZE jobs")
            cur = await conn.execute("EXPLAIN " + store._claim_sql, (
                ["t"], None, None, 10, "w", 30.0, 1.0, "jobwire:explain"))
            plan = "\n".join(str(r[0]) for r in await cur.fetchall())
    finally:
        await store.close()
    assert "Index Scan using jobs_queue on jobs" in plan, plan
    assert "Seq Scan on jobs" not in plan, plan


async def test_a_keys_next_job_starts_when_the_last_ends_without_a_poll(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker claims again once it has written the end of a limited job (its slot
    is free only then), instead of waiting for its next poll (an hour here)."""
    monkeypatch.setenv("JOBWIRE_TEST_RUN_LOG", str(tmp_path / "runs.log"))
    jw = limit_tasks.jobwire
    ids = []
    for _ in range(3):
        spec, value, key, place = jw.prepare("one_per_owner", {"s": 0.0}, None, "user:a")
        ids.append((await store.submit("user:a", spec.name, value, key, 1, place=place))[0].id)
    worker = Worker(jw, store, concurrency=2, poll_seconds=3600)
    await worker.start()
    try:
        for _ in range(300):  # at most 30 s
            if (await store.count_by_status()).get("completed", 0) == len(ids):
                break
            await asyncio.sleep(0.1)
    finally:
        await worker.stop()
    assert await store.count_by_status() == {"completed": len(ids)}


def test_an_input_the_key_function_cannot_read_is_a_422_not_a_500() -> None:
    """A guest sends an untyped task's input without the field its concurrency_key reads:
    the submit is refused naming the input, as an invalid input is, instead of a 500 with
    a traceback in the server's log for every such request."""
    with pytest.raises(InputError) as refused:
        limit_tasks.jobwire.prepare("three_per_api", {"s": 0.1}, None, "guest:g")
    assert refused.value.loc == ("input",) and "KeyError" in str(refused.value)
    *_, place = limit_tasks.jobwire.prepare("three_per_api", {"api": "x"}, None, "guest:g")
    assert place.limit_key == "three_per_api\x1fguest:g x"
