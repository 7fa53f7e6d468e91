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

from jobwire.store import Store, open_store


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
