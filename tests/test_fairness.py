"""One owner cannot starve the others: a cap on each owner's active jobs (429 over it,
holding under concurrent submits from many processes) and claims that start an owner's
first job before another owner's backlog."""

from __future__ import annotations

import asyncio
import multiprocessing
from typing import Any

import pytest

from jobwire.model import ACTIVE
from jobwire.store import TooManyActive, open_store
from tests.conftest import Proc, guest

CAP = 5


@pytest.fixture
def capped(procs: Any, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Proc:
    """A server whose owners may have CAP active jobs each."""
    monkeypatch.setenv("JOBWIRE_MAX_ACTIVE_JOBS", str(CAP))
    proc: Proc = procs("serve", "--db", db_url, "--lease", "2")
    return proc


async def test_cap_refuses_new_jobs_but_never_an_active_key(capped: Proc) -> None:
    a, b = await guest(capped.url), await guest(capped.url)
    keyed, _ = await a.submit("block", {}, key="k")
    held = [keyed] + [(await a.submit("block", {}))[0] for _ in range(CAP - 1)]
    for body in ({"task": "block", "input": {}}, {"task": "echo", "input": 1, "key": "new"}):
        r = await a.http.post("/api/jobs", json=body)
        assert r.status_code == 429, r.text
        assert r.json() == {"detail": f"too many active jobs: at most {CAP} per owner; "
                                      "wait for one to end or cancel one"}
        assert int(r.headers["Retry-After"]) > 0
    # Joining the active job of a key adds no job: never refused.
    again, created = await a.submit("block", {}, key="k")
    assert (again["id"], created) == (keyed["id"], False)
    # Another owner is unaffected.
    _, created = await b.submit("block", {})
    assert created
    # A job that ends frees its place.
    assert (await a.http.post(f"/api/jobs/{held[1]['id']}/cancel")).status_code == 200
    await a.wait_terminal(held[1]["id"])
    _, created = await a.submit("block", {})
    assert created
    active = (await a.http.get("/api/jobs", params={"status": "active"})).json()
    assert len(active) == CAP
    for c in (a, b):
        await c.http.aclose()


def _submit_storm(url: str, cap: int, n: int, barrier: Any, out: Any) -> None:
    async def main() -> None:
        store = open_store(url, max_active_jobs=cap)
        await store.open()
        barrier.wait()
        tag = multiprocessing.current_process().name
        results = await asyncio.gather(*(store.submit("o", "t", {}, f"{tag}-{k}", 1)
                                         for k in range(n)), return_exceptions=True)
        out.put(["created" if isinstance(r, tuple) and r[1] else type(r).__name__
                 for r in results])
        await store.close()
    asyncio.run(main())


async def test_cap_holds_under_concurrent_submits_from_many_processes(db_url: str) -> None:
    """4 processes x 15 concurrent submits of distinct keys by one owner, cap 10."""
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(4), ctx.Queue()
    workers = [ctx.Process(target=_submit_storm, args=(db_url, 10, 15, barrier, out))
               for _ in range(4)]
    for w in workers:
        w.start()
    outcomes = [o for _ in workers for o in await asyncio.to_thread(out.get, timeout=60)]
    for w in workers:
        w.join(30)
    store = open_store(db_url)
    await store.open()
    try:
        active = await store.list_jobs("o", ACTIVE, 100)
    finally:
        await store.close()
    assert len(active) == 10, f"{len(active)} active jobs with a cap of 10"
    assert outcomes.count("created") == 10
    assert outcomes.count(TooManyActive.__name__) == 50, outcomes


CONCURRENCY = 2
BACKLOG = 200


async def test_an_owners_first_job_overtakes_another_owners_backlog(
        procs: Any, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBWIRE_MAX_ACTIVE_JOBS", str(BACKLOG))
    srv: Proc = procs("serve", "--db", db_url, "--lease", "2",
                      "--concurrency", str(CONCURRENCY))
    a, b = await guest(srv.url), await guest(srv.url)
    gate = asyncio.Semaphore(16)

    async def queue_one() -> str:
        async with gate:
            return str((await a.submit("steps", {"n": 1, "delay": 0.05}))[0]["id"])

    backlog = await asyncio.gather(*(queue_one() for _ in range(BACKLOG)))
    mine, _ = await b.submit("steps", {"n": 1, "delay": 0.05})
    assert (await b.wait_terminal(mine["id"]))["status"] == "completed"
    store = open_store(db_url)
    await store.open()
    try:
        [created, started] = [e.at for e in await store.events(mine["id"], 0)
                              if e.type in ("created", "started")]
        starts = [e.at for job in backlog for e in await store.events(job, 0)
                  if e.type == "started"]
    finally:
        await store.close()
    waiting = BACKLOG - sum(at < created for at in starts)
    assert waiting >= 50, f"only {waiting} of A's jobs were queued: no backlog to overtake"
    overtaking = sum(created < at < started for at in starts)
    assert overtaking <= CONCURRENCY, f"{overtaking} of A's jobs started before B's one"
    for c in (a, b):
        await c.http.aclose()


async def test_a_database_of_the_first_schema_is_upgraded(db_url: str) -> None:
    """A job queued before ranks existed is kept, ranked as its owner's first, and claimed."""
    row = ("INSERT INTO jobs (id, task, owner, status, input, max_attempts, seq, created_at, "
           "updated_at) VALUES ('old', 't', 'o', 'queued', 'null', 1, 1, 0, 0)")
    if db_url.startswith("sqlite"):
        import sqlite3

        from jobwire.store.sqlite import MIGRATIONS, _path_of

        with sqlite3.connect(_path_of(db_url)) as conn:
            conn.executescript(MIGRATIONS[0])
            conn.execute(row)
            conn.execute("PRAGMA user_version = 1")
    else:
        import psycopg

        from jobwire.store import pg_schema

        with psycopg.connect(db_url, autocommit=True) as pg:
            pg.execute(pg_schema.MIGRATIONS[0].encode())
            pg.execute("CREATE TABLE jobwire_migrations (version integer PRIMARY KEY, "
                       "applied_at double precision NOT NULL)")
            pg.execute("INSERT INTO jobwire_migrations VALUES (1, 0)")
            pg.execute(row)
    store = open_store(db_url)
    await store.open()
    try:
        new, _ = await store.submit("o", "t", {}, None, 1)
        other, _ = await store.submit("p", "t", {}, None, 1)
        claimed = [j.id for _ in range(3) for j in await store.claim("w", ["t"], 1, 30)]
    finally:
        await store.close()
    assert claimed == ["old", other.id, new.id]
