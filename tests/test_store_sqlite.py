"""The SQLite store alone: batched reads (reads queued together share one hop to the
store thread, yet each is answered alone, from after it was asked), and processes that
open a new file together."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from jobwire.model import Status
from jobwire.store import Lease, Store, open_store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = open_store(f"sqlite:///{tmp_path / 'jobwire.db'}")
    await s.open()
    yield s
    await s.close()


async def test_concurrent_reads_each_get_their_own_answer(store: Store) -> None:
    jobs = [(await store.submit(f"o{k % 3}", "t", {"k": k}, None, 1))[0] for k in range(30)]
    found, lists, logs = await asyncio.gather(
        asyncio.gather(*(store.get_job(j.id) for j in jobs)),
        asyncio.gather(*(store.list_jobs(f"o{k}", None, 100) for k in range(3))),
        asyncio.gather(*(store.events(j.id, 0) for j in jobs)))
    assert [j and j.input for j in found] == [{"k": k} for k in range(30)]
    assert [{j.owner for j in mine} for mine in lists] == [{"o0"}, {"o1"}, {"o2"}]
    assert [[e.job for e in log] for log in logs] == [[j.id] for j in jobs]


async def test_a_failing_read_fails_alone(store: Store) -> None:
    job, _ = await store.submit("o", "t", None, None, 1)
    ok, bad, also_ok = await asyncio.gather(
        store.get_job(job.id), store.get_job("\ud800"), store.session_owner("nope"),
        return_exceptions=True)
    assert getattr(ok, "id", None) == job.id
    assert isinstance(bad, UnicodeEncodeError)
    assert also_ok is None


async def test_a_read_sees_every_write_that_finished_before_it(store: Store) -> None:
    async def submit_then_read(k: int) -> bool:
        job, _ = await store.submit("o", "t", k, f"key{k}", 1)
        return await store.get_job(job.id, "o") is not None

    assert all(await asyncio.gather(*(submit_then_read(k) for k in range(100))))
    await store.add_session("h", "guest:g", None)
    assert await store.session_owner("h") == "guest:g"
    assert await store.claim_session("h", "user:u") == 0
    assert await store.session_owner("h") is None, "a claimed session is gone at once"


def _open(path: str, barrier: Any, out: Any) -> None:
    async def main() -> None:
        store = open_store(f"sqlite:///{path}")
        barrier.wait()
        try:
            await store.open()
            out.put("ok")
        except Exception as exc:
            out.put(repr(exc))
        await store.close()
    asyncio.run(main())


def test_processes_opening_a_new_file_together_all_start(tmp_path: Path) -> None:
    """A server and its workers started at once on a fresh file (this once answered
    "database is locked" to some of them: WAL mode is set without the busy timeout)."""
    ctx = multiprocessing.get_context("fork")
    for attempt in range(10):
        barrier, out = ctx.Barrier(8), ctx.Queue()
        procs = [ctx.Process(target=_open, args=(str(tmp_path / f"{attempt}.db"), barrier, out))
                 for _ in range(8)]
        for p in procs:
            p.start()
        answers = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(30)
        assert answers == ["ok"] * 8


def test_session_lookups_by_owner_and_expiry_use_indexes(tmp_path: Path) -> None:
    """A guest-session flood leaves many rows: the prune (by expiry) and a claim, revoke
    or token listing (by owner) must find theirs through an index, not scan them all."""
    async def migrate() -> None:
        store = open_store(f"sqlite:///{tmp_path / 's.db'}")
        await store.open()
        await store.close()

    asyncio.run(migrate())
    conn = sqlite3.connect(tmp_path / "s.db")
    for sql, args in (("DELETE FROM sessions WHERE expires_at <= ?", (1.0,)),
                      ("DELETE FROM sessions WHERE owner = ?", ("guest:g",)),
                      ("SELECT token_hash FROM sessions WHERE owner = ?", ("user:u",))):
        plan = " | ".join(str(r[-1]) for r in conn.execute("EXPLAIN QUERY PLAN " + sql, args))
        assert "USING INDEX sessions_" in plan, (sql, plan)


async def test_owners_active_counts_follow_every_write_path(tmp_path: Path) -> None:
    """The per-owner count of active jobs a submit reads for its rank and the cap is kept
    by triggers: after submits, claims, ends, retries, cancels, deletes, a hand-back and a
    guest's jobs moving to a user, it equals the count of the jobs themselves."""
    db = tmp_path / "active.db"
    store = open_store(f"sqlite:///{db}")
    await store.open()
    try:
        for k in range(12):
            await store.submit(f"guest:g{k % 3}", "t", k, None, 3)
        await store.add_session("hash", "guest:g0", None)
        leases = [Lease(j.id, "w", j.attempt) for j in await store.claim("w", ["t"], 8, 60)]
        await store.finish(leases[0], Status.COMPLETED)
        await store.finish(leases[1], Status.FAILED, error="no")
        await store.retry(leases[2], "again", 60)
        await store.hand_back(leases[3:5])
        queued = [j for j in await store.list_jobs("guest:g1", None, 50)
                  if j.status == Status.QUEUED]
        await store.request_cancel(queued[0].id, "guest:g1")
        await store.request_cancel(leases[5].job, (await store.get_job(leases[5].job)).owner)
        assert await store.delete_job(leases[0].job, (await store.get_job(leases[0].job)).owner)
        assert await store.claim_session("hash", "user:u") is not None
        await store.heartbeat(leases[6:], 0)
        await store.expire_leases()
    finally:
        await store.close()
    conn = sqlite3.connect(db)
    counted = dict(conn.execute("SELECT owner, n FROM owner_active WHERE n > 0"))
    actual = dict(conn.execute("SELECT owner, count(*) FROM jobs WHERE status IN "
                               "('queued', 'running') GROUP BY owner"))
    assert counted == actual and sum(actual.values()) > 0, (counted, actual)
    assert "user:u" in actual and "guest:g0" not in counted


async def test_the_wal_is_copied_back_by_a_thread_of_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Commits do not wait for SQLite's checkpoint at 1000 WAL pages: the store's copier
    copies the WAL into the database file, here after a single job."""
    monkeypatch.setattr("jobwire.store.sqlite.CHECKPOINT_CHANGES", 1)
    monkeypatch.setattr("jobwire.store.sqlite.CHECKPOINT_SECONDS", 3600.0)
    path = tmp_path / "jobwire.db"
    store = open_store(f"sqlite:///{path}")
    await store.open()
    try:
        job, _ = await store.submit("o", "t", None, None, 1)

        def in_file_alone() -> bool:
            """Whether the database file, read without its WAL, has the job."""
            copy = tmp_path / "copy.db"
            copy.write_bytes(path.read_bytes())
            conn = sqlite3.connect(copy)
            try:
                return conn.execute("SELECT count(*) FROM jobs WHERE id = ?",
                                    (job.id,)).fetchone()[0] == 1
            except sqlite3.DatabaseError:  # caught mid-copy, or the table not copied yet
                return False
            finally:
                conn.close()

        while not await asyncio.to_thread(in_file_alone):
            await asyncio.sleep(0.01)
    finally:
        await store.close()
