"""The SQLite store alone: batched reads (reads queued together share one hop to the
store thread, yet each is answered alone, from after it was asked), processes that open a
new file together, and the doorbell that has other processes read a commit at once."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from jobwire.model import Event, Job, Status
from jobwire.store import Lease, Store, open_store
from jobwire.store.sqlite import SQLiteStore


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


# -- other processes on the file: the doorbell (store/doorbell.py)

WAIT = 10.0  # seconds for a rung store to read a commit (it takes about a millisecond)


@contextlib.asynccontextmanager
async def opened(path: Path, poll: float = 3600.0) -> AsyncIterator[SQLiteStore]:
    """A store on `path` that polls only every `poll` seconds: what reaches it sooner came
    by the doorbell."""
    store = SQLiteStore(f"sqlite:///{path}", poll_interval=poll)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def heard(store: Store) -> tuple[list[Event], asyncio.Event]:
    """The events a store publishes, and an asyncio.Event set at each."""
    got: list[Event] = []
    arrived = asyncio.Event()

    def hint(job: str, seq: int, event: Event | None) -> None:
        if event is not None:
            got.append(event)
        arrived.set()
    store.listen(hint)
    return got, arrived


async def until_heard(got: list[Event], arrived: asyncio.Event, job: str, type: str) -> None:
    async with asyncio.timeout(WAIT):
        while not any(e.job == job and e.type == type for e in got):
            arrived.clear()
            await arrived.wait()


async def first_heard(writer: Store, got: list[Event], arrived: asyncio.Event) -> Job:
    """A job the writer submitted whose creation the reader heard of. The writer learns of
    a reader that opened after it from the reader's hello, which may come just after a
    first commit: so a few tries, each given a quarter of a second."""
    for _ in range(20):
        job, _ = await writer.submit("guest:a", "t", None, None, 1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.25):
                await until_heard(got, arrived, job.id, "created")
                return job
    raise AssertionError("no commit of the writer reached the reader")


async def test_a_commit_rings_the_other_stores_on_the_file(tmp_path: Path) -> None:
    """Another store on the file, even one opened after the writer, reads a commit when
    it is made, not at its next poll (here an hour away): its events, and its owners'
    changes, deletions included."""
    path = tmp_path / "jobwire.db"
    async with opened(path) as writer, opened(path) as reader:
        got, arrived = heard(reader)
        owners = asyncio.Event()
        reader.listen_owners(lambda owner: owners.set())
        job = await first_heard(writer, got, arrived)
        assert await writer.request_cancel(job.id, "guest:a") is not None
        await until_heard(got, arrived, job.id, "cancelled")
        owners.clear()
        assert await writer.delete_job(job.id, "guest:a")
        async with asyncio.timeout(WAIT):  # a deletion writes no event, yet it is read
            await owners.wait()
    assert not (tmp_path / "jobwire.db-wake").exists(), "the last store out removes it"


async def test_a_path_too_long_for_a_socket_address_is_rung_through_its_directory(
        tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    async with opened(deep / "jobwire.db") as writer, opened(deep / "jobwire.db") as reader:
        await first_heard(writer, *heard(reader))


async def test_where_no_socket_can_be_bound_the_store_polls(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A path too long for a socket's address, and no /proc to shorten it: no doorbell,
    and other processes' commits still arrive, by the poll."""
    monkeypatch.setattr("jobwire.store.doorbell.PROC_FD", str(tmp_path / "no-proc"))
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    async with opened(deep / "jobwire.db") as writer, \
            opened(deep / "jobwire.db", poll=0.05) as reader:
        assert not (deep / "jobwire.db-wake").exists()
        got, arrived = heard(reader)
        job, _ = await writer.submit("guest:a", "t", None, None, 1)
        await until_heard(got, arrived, job.id, "created")


KILLED_STORE = """
import asyncio, sys
from jobwire.store import open_store

async def main():
    await open_store(sys.argv[1]).open()
    print("open", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_the_socket_of_a_killed_process_is_cleared_and_the_rest_still_ring(
        tmp_path: Path) -> None:
    path = tmp_path / "jobwire.db"
    async with opened(path) as reader:
        killed = await asyncio.create_subprocess_exec(
            sys.executable, "-c", KILLED_STORE, f"sqlite:///{path}", stdout=subprocess.PIPE)
        try:
            assert killed.stdout is not None
            assert await killed.stdout.readline() == b"open\n"
        finally:
            killed.kill()  # SIGKILL: its socket stays behind
            await killed.wait()
        left = [p for p in (tmp_path / "jobwire.db-wake").iterdir() if p.name.startswith(
            f"{killed.pid}-")]
        assert len(left) == 1
        async with opened(path) as writer:
            got, arrived = heard(reader)
            job, _ = await writer.submit("guest:a", "t", None, None, 1)
            await until_heard(got, arrived, job.id, "created")
            assert not left[0].exists(), "the dead peer's socket is removed when rung"


async def test_a_stranger_ringing_or_squatting_changes_nothing_but_a_look(
        tmp_path: Path) -> None:
    """Whatever is sent to a store's socket (nothing, junk, a flood) is only a wake-up;
    a file that is not a socket in the directory is cleared when rung."""
    path, wake = tmp_path / "jobwire.db", tmp_path / "jobwire.db-wake"
    async with opened(path) as reader:
        assert wake.stat().st_mode & 0o077 == 0, "only the owner may ring or squat"
        squatter = wake / "1-squat"
        squatter.write_bytes(b"not a socket")
        stranger = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        stranger.setblocking(False)
        wake_fd = os.open(wake, os.O_RDONLY)  # through /proc: tmp_path may be too long
        target = f"/proc/self/fd/{wake_fd}/{next(wake.glob('[0-9]*-[0-9a-f]*')).name}"
        for junk in (b"", b"h", b"\xff" * 60_000, *[b"r"] * 1000):
            with contextlib.suppress(BlockingIOError):
                stranger.sendto(junk, target)
        stranger.close()
        os.close(wake_fd)
        async with opened(path) as writer:
            got, arrived = heard(reader)
            job, _ = await writer.submit("guest:a", "t", {"k": 1}, None, 1)
            await until_heard(got, arrived, job.id, "created")
            assert not squatter.exists()
            assert (await reader.get_job(job.id)).input == {"k": 1}  # type: ignore[union-attr]


async def test_a_busy_peers_commits_are_read_in_batches(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rings that come while a read is recent wait for the gap and share one read."""
    monkeypatch.setattr("jobwire.store.sqlite.RUNG_GAP", 1.0)
    path = tmp_path / "jobwire.db"
    async with opened(path) as reader, opened(path) as writer:
        reads = 0
        poll = reader._poll_foreign_events

        def counted() -> list[Event] | None:
            nonlocal reads
            reads += 1
            return poll()
        monkeypatch.setattr(reader, "_poll_foreign_events", counted)
        got, arrived = heard(reader)
        began = time.monotonic()
        jobs = [(await writer.submit("guest:a", "t", k, None, 1))[0] for k in range(50)]
        for job in jobs:
            await until_heard(got, arrived, job.id, "created")
        assert reads <= 2 + (time.monotonic() - began) / 1.0, reads
