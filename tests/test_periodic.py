"""Periodic jobs: one job per tick across worker processes, catch-up after downtime,
the fired-tick record, and the system owner no session can see."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from jobwire import Context, InputError, Jobwire
from jobwire.cron import Every, tick_key
from jobwire.model import Job, Status, now
from jobwire.periodic import OWNER
from jobwire.store import Lease, Store
from tests.conftest import Proc, guest


async def periodic_jobs(store: Store) -> list[Job]:
    return sorted(await store.list_jobs(OWNER, None, 10_000), key=lambda j: j.key or "")


async def run_to_end(store: Store, job: Job) -> None:
    [claimed] = await store.claim("w", [job.task], 1, 30)
    assert claimed.id == job.id
    await store.finish(Lease(job.id, "w", claimed.attempt), Status.COMPLETED)


def test_periodic_declarations_are_checked_at_import() -> None:
    jw = Jobwire()

    class Days(BaseModel):
        days: int

    async def report(ctx: Context, input: Days) -> None: ...

    with pytest.raises(ValueError, match="put @periodic above @task"):
        jw.periodic(every=60)(report)
    jw.task(input=Days)(report)
    for bad in ({}, {"cron": "* * * * *", "every": 60}, {"every": 60, "tz": "Europe/Paris"}):
        with pytest.raises(ValueError, match=r"a cron expression .* or every=SECONDS"):
            jw.periodic(**bad)(report)
    with pytest.raises(InputError, match="Field required"):
        jw.periodic(every=60)(report)
    jw.periodic("0 3 * * *", tz="Europe/Paris", input={"days": 1})(report)
    assert jw.periodics["report"].input == {"days": 1}
    with pytest.raises(ValueError, match="already has a schedule"):
        jw.periodic(every=60, input={"days": 1})(report)


async def test_a_tick_fires_once_even_after_its_job_ended(store: Store) -> None:
    tick = 1_800_000_000.0
    fired = await store.submit_tick(OWNER, "t", {}, 1, tick)
    assert fired is not None and fired[1] and fired[0].key == tick_key(tick)
    await run_to_end(store, fired[0])
    # The dedup index no longer covers the ended job: the tick record refuses it.
    assert await store.submit_tick(OWNER, "t", {}, 1, tick) is None
    assert await store.submit_tick(OWNER, "t", {}, 1, tick - 60) is None  # older: refused too
    assert [j.id for j in await periodic_jobs(store)] == [fired[0].id]


async def test_a_tick_is_skipped_while_the_previous_tick_runs(store: Store) -> None:
    first = await store.submit_tick(OWNER, "t", {}, 1, 1_800_000_000.0)
    assert first is not None
    skipped = await store.submit_tick(OWNER, "t", {}, 1, 1_800_000_060.0)
    assert skipped == (first[0], False)
    # Recorded as fired: the skipped tick does not come back once the first job ended.
    await run_to_end(store, first[0])
    assert await store.submit_tick(OWNER, "t", {}, 1, 1_800_000_060.0) is None
    assert len(await periodic_jobs(store)) == 1


async def test_catch_up_needs_an_earlier_tick(store: Store) -> None:
    assert await store.submit_tick(OWNER, "t", {}, 1, 1_800_000_000.0, catch_up=True) is None
    first = await store.submit_tick(OWNER, "t", {}, 1, 1_800_000_000.0)
    assert first is not None
    await run_to_end(store, first[0])
    caught = await store.submit_tick(OWNER, "t", {}, 1, 1_800_000_300.0, catch_up=True)
    assert caught is not None and caught[1]


async def test_concurrent_fires_of_one_tick_make_one_job(store: Store) -> None:
    fired = await asyncio.gather(*(store.submit_tick(OWNER, "t", {}, 1, 1_800_000_000.0)
                                   for _ in range(20)))
    assert sum(f is not None for f in fired) == 1


async def wait_for(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def started(workers: list[Proc]) -> None:
    """Until each worker logged that it runs (its scheduler starts right before)."""
    async def logged() -> bool:
        return all(w.log.exists() and " running on " in w.log.read_text() for w in workers)
    await wait_for(logged, 30)
    await asyncio.sleep(1)  # the scheduler's first round, on a loaded machine


async def test_three_workers_make_one_job_per_tick(procs: Any, db_url: str,
                                                   store: Store) -> None:
    workers: list[Proc] = [procs("worker", "--db", db_url, "--app",
                                 "tests.periodic_tasks:every_second") for _ in range(3)]
    await started(workers)
    await asyncio.sleep(5)
    for w in workers:
        w.stop()
    jobs = await periodic_jobs(store)
    # A tick whose previous job is still queued or running (a loaded machine) is skipped
    # and logged, not made a job.
    skipped = {key for w in workers for key in re.findall(r"skipped (tick:\S+):",
                                                          w.log.read_text())}
    keys = [j.key or "" for j in jobs]
    # One job per tick (a second job of a tick has its key again), and every tick from
    # the first to the last is a job or a logged skip.
    assert len(keys) >= 3 and len(set(keys)) == len(keys) and not skipped & set(keys), keys
    ticks = sorted(dt.datetime.strptime(key, "tick:%Y-%m-%dT%H:%M:%S%z").timestamp()
                   for key in {*keys, *skipped})
    assert ticks == [ticks[0] + k for k in range(len(ticks))], (keys, skipped)
    assert all(j.status == Status.COMPLETED for j in jobs[:-1])


async def seed_missed_ticks(store: Store) -> float:
    """As if workers fired the daily tick 3 days ago and then none ran: returns the tick
    now due, which they missed."""
    due = Every(86400).latest(now())
    old = await store.submit_tick(OWNER, "tick", {}, 3, due - 3 * 86400)
    assert old is not None
    await store.request_cancel(old[0].id, OWNER)  # its job ended long ago
    return due


async def test_missed_ticks_run_once_on_start(procs: Any, db_url: str, store: Store) -> None:
    due = await seed_missed_ticks(store)
    await started([procs("worker", "--db", db_url, "--app", "tests.periodic_tasks:daily")
                   for _ in range(3)])
    jobs = await periodic_jobs(store)
    assert [j.key for j in jobs] == [tick_key(due - 3 * 86400), tick_key(due)]


async def test_missed_ticks_are_skipped_without_catch_up(procs: Any, db_url: str,
                                                         store: Store) -> None:
    due = await seed_missed_ticks(store)
    await started([procs("worker", "--db", db_url, "--app",
                         "tests.periodic_tasks:daily_no_catch_up")])
    await asyncio.sleep(2)
    assert len(await periodic_jobs(store)) == 1  # the seeded one only
    # The same database with catch-up on does catch up: the test above was not vacuous.
    await started([procs("worker", "--db", db_url, "--app", "tests.periodic_tasks:daily")])
    assert (await periodic_jobs(store))[-1].key == tick_key(due)


async def test_periodic_jobs_are_invisible_to_guests(procs: Any, db_url: str, store: Store,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    service_key = "svc-" + "k" * 40
    monkeypatch.setenv("JOBWIRE_SERVICE_KEY", service_key)
    server: Proc = procs("serve", "--db", db_url, "--app", "tests.periodic_tasks:every_second")

    async def ran() -> bool:
        return any(j.status == Status.COMPLETED for j in await periodic_jobs(store))
    await wait_for(ran, 20)
    job = (await periodic_jobs(store))[0]
    c = await guest(server.url)
    try:
        r = await c.http.get("/api/jobs")
        assert r.status_code == 200 and r.json() == []
        assert (await c.http.get(f"/api/jobs/{job.id}")).status_code == 404
        r = await c.http.post("/api/jobs", json={"task": "tick", "input": {},
                                                 "key": job.key})
        assert r.status_code == 201 and r.json()["job"]["owner"] == c.owner != OWNER
    finally:
        await c.http.aclose()
    # The service key (without X-Jobwire-Owner) reads them, by their owner too.
    async with httpx.AsyncClient(base_url=server.url, timeout=30, headers={
            "Authorization": f"Bearer {service_key}"}) as svc:
        r = await svc.get("/api/jobs", params={"owner": OWNER, "limit": 500})
        assert r.status_code == 200 and job.id in {j["id"] for j in r.json()}
        assert {j["owner"] for j in r.json()} == {OWNER}
