"""Database trouble: SQLite locked by another process, a full disk, a server killed in
the middle of writes; PostgreSQL connections terminated mid-transaction. jobwire answers
with a clear 503 while the cause lasts, recovers on its own when it goes, and the data
stays consistent (`PRAGMA integrity_check`, counts equal item states)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from jobwire.store.sqlite import BUSY_SECONDS
from tests.chaos.conftest import APP, Serve
from tests.chaos.wire import check_log, ws_watch
from tests.conftest import Client, guest

pytestmark = pytest.mark.timeout(240)

HOLD_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
"""


async def consistent(c: Client, job_id: str) -> dict[str, Any]:
    """A finished job's log is gap-free and its counts equal its item states."""
    job = await c.job(job_id)
    assert job["status"] in ("completed", "failed", "cancelled")
    events = await c.events(job_id)
    check_log(events, job_id)
    assert events[-1]["seq"] == job["seq"]
    found = (await c.http.get(f"/api/jobs/{job_id}/items")).json()
    assert found["seq"] == job["seq"]
    states = [it["status"] for it in found["items"]]
    assert job["progress"] == {"total": len(states), "done": states.count("done"),
                               "failed": states.count("failed")}
    return job


def integrity(path: Path) -> str:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


@contextlib.asynccontextmanager
async def locked(db: Path) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Another process holds the file's write lock (BEGIN EXCLUSIVE) until the yielded
    function releases it (or the block ends)."""
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLD_LOCK, str(db),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdin is not None and holder.stdout is not None
    stdin = holder.stdin

    async def release() -> None:
        if not stdin.is_closing():
            stdin.write(b"go\n")
            stdin.close()
        await holder.wait()

    try:
        assert (await holder.stdout.readline()).strip() == b"locked"
        yield release
    finally:
        await release()


async def test_sqlite_locked_by_another_process(serve: Serve, tmp_path: Path) -> None:
    db = tmp_path / "locked.db"
    srv = serve(db=f"sqlite:///{db}")
    c = await guest(srv.url)
    before, _ = await c.submit("steps", {"n": 3})
    await c.wait_terminal(before["id"])
    async with locked(db):
        started = time.monotonic()
        r = await c.http.post("/api/jobs", json={"task": "steps", "input": {"n": 3}})
        waited = time.monotonic() - started
        assert r.status_code == 503, r.text
        assert "database is locked" in r.json()["detail"]
        # It gave up after the busy timeout, not at once (nor never: the test is bounded).
        assert waited >= BUSY_SECONDS * 0.9, waited
        # Reads still work (WAL), so the owner can see what exists; slowly, as they
        # queue behind the writes waiting for the lock on the store's one thread.
        r = await c.http.get(f"/api/jobs/{before['id']}", timeout=120)
        assert r.status_code == 200 and r.json()["status"] == "completed"
    after, created = await c.submit("steps", {"n": 3})
    assert created
    assert (await c.wait_terminal(after["id"]))["status"] == "completed"
    await consistent(c, after["id"])
    assert integrity(db) == "ok"
    await c.http.aclose()


async def test_sqlite_write_waits_for_a_lock_held_briefly(serve: Serve, tmp_path: Path) -> None:
    """A lock held for well under BUSY_SECONDS delays a write; it does not fail it."""
    db = tmp_path / "briefly.db"
    srv = serve(db=f"sqlite:///{db}")
    c = await guest(srv.url)
    async with locked(db) as release:
        submit = asyncio.create_task(
            c.http.post("/api/jobs", json={"task": "steps", "input": {"n": 2}}))
        await asyncio.sleep(1.5)
        assert not submit.done(), submit.result().text  # waiting for the lock
        await release()
        r = await submit
    assert r.status_code == 201, r.text
    job = await c.wait_terminal(r.json()["job"]["id"])
    assert job["status"] == "completed"
    await consistent(c, job["id"])
    await c.http.aclose()


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


async def test_sqlite_disk_full(serve: Serve, tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "4m") as disk:
        db = disk / "full.db"
        srv = serve(db=f"sqlite:///{db}")
        c = await guest(srv.url)
        first, _ = await c.submit("steps", {"n": 5})
        await c.wait_terminal(first["id"])
        filler = disk / "filler"
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        filler.write_bytes(b"\0" * max(free - 256 * 1024, 0))
        refused = None
        for k in range(200):  # fill what is left with job inputs
            r = await c.http.post("/api/jobs", json={"task": "echo", "input": "x" * 20_000,
                                                     "key": f"fill-{k}"})
            if r.status_code == 503:
                refused = r.json()["detail"]
                break
            assert r.status_code == 201, r.text
        assert refused is not None and "full" in refused, refused
        # Reads need no space: the health check (a read) still answers.
        assert (await c.http.get("/healthz")).status_code == 200
        filler.unlink()  # space comes back: so does jobwire, without a restart
        job, created = await c.submit("steps", {"n": 5})
        assert created
        assert (await c.wait_terminal(job["id"]))["status"] == "completed"
        await consistent(c, job["id"])
        assert (await c.http.get("/healthz")).status_code == 200
        await c.http.aclose()
        srv.stop()
        assert integrity(db) == "ok"


async def writing(c: Client, job_ids: list[str]) -> None:
    """Until every job has finished an item and none has ended: all are mid-write."""
    while True:
        jobs = [await c.job(j) for j in job_ids]
        assert all(j["status"] in ("queued", "running") for j in jobs), jobs
        if all(j["progress"]["done"] >= 1 for j in jobs):
            return
        await asyncio.sleep(0.05)


async def test_sqlite_server_killed_mid_write(serve: Serve, tmp_path: Path) -> None:
    """SIGKILL at a random moment while five jobs write an item every few ms each."""
    db = tmp_path / "killed.db"
    srv = serve(db=f"sqlite:///{db}")
    c = await guest(srv.url)
    jobs: list[str] = []
    for _ in range(2):
        # 150 items, each a `running` and a `done` write 10 ms apart: >= 1.5 s of writes.
        batch = [(await c.submit("crunch", {"n": 150, "delay": 0.01}))[0]["id"]
                 for _ in range(5)]
        jobs += batch
        await writing(c, batch)
        await asyncio.sleep(random.uniform(0, 0.5))
        srv.kill()
        assert integrity(db) == "ok"
        await asyncio.to_thread(srv.start)
    for job_id in jobs:
        job = await c.wait_terminal(job_id, timeout=90)
        assert job["status"] == "completed", job
        await consistent(c, job_id)
        # The kill landed mid-run: the attempt that was writing lost its lease, and both
        # it and the retry recorded items (each item once: `consistent`).
        events = await c.events(job_id)
        retries = [e for e in events if e["type"] == "retrying"]
        assert retries and "lease expired during attempt 1" in retries[0]["data"]["error"]
        items = (await c.http.get(f"/api/jobs/{job_id}/items")).json()["items"]
        assert {it["result"]["attempt"] for it in items} >= {1, 2}, job
    srv.stop()
    assert integrity(db) == "ok"
    await c.http.aclose()


def terminate_backends(url: str) -> int:
    """pg_terminate_backend on every connection jobwire holds for this test's schema
    (they are all named after it), in the middle of whatever they are doing."""
    import psycopg

    name = dict(parse_qsl(urlsplit(url).query))["application_name"]
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name LIKE %s AND pid <> pg_backend_pid()",
            (name + "%",)).fetchall()
    return len(rows)


async def test_postgres_connections_terminated(serve: Serve, procs: Any, pg_url: str) -> None:
    srv = serve(db=pg_url)  # API with in-process workers
    procs("worker", "--db", pg_url, "--app", APP, "--lease", "2", "--concurrency", "10")
    c = await guest(srv.url)
    jobs = [(await c.submit("crunch", {"n": 10, "delay": 0.05}))[0]["id"] for _ in range(40)]
    watcher = asyncio.create_task(ws_watch(srv.url, c.token, jobs[:8]))
    terminated = 0
    for _ in range(4):
        await asyncio.sleep(0.7)
        terminated += await asyncio.to_thread(terminate_backends, pg_url)
    assert terminated > 0
    for job_id in jobs:  # the API and the workers reconnected and carried on
        job = await c.wait_terminal(job_id, timeout=90)
        assert job["status"] == "completed", (job["error"], job)
        await consistent(c, job_id)
    logs = await asyncio.wait_for(watcher, 60)
    for job_id, log in logs.items():
        assert [e["seq"] for e in log] == [e["seq"] for e in await c.events(job_id)]
    job, created = await c.submit("steps", {"n": 2})
    assert created and (await c.wait_terminal(job["id"]))["status"] == "completed"
    await c.http.aclose()
