"""Priorities and named queues: the order claims take jobs in, who may choose a priority,
and which worker takes which queue (both backends)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from jobwire.app import Jobwire
from jobwire.model import now
from jobwire.store import Placement, Store, open_store
from tests.conftest import PYTHONPATH, Proc, cli, guest


async def _claim_order(store: Store, **kw: Any) -> list[str]:
    """The jobs' ids as claims take them one at a time, until none is left."""
    order = []
    while got := await store.claim("w", ["t"], 1, 30, **kw):
        order.append(got[0].id)
    return order


async def test_higher_priority_first_then_fairness_then_due_time(store: Store) -> None:
    async def submit(owner: str, priority: int = 0, run_at: float | None = None) -> str:
        job, _ = await store.submit(owner, "t", None, None, 1, run_at=run_at,
                                    place=Placement(priority=priority))
        return job.id

    backlog = [await submit("user:a") for _ in range(3)]  # ranks 0, 1, 2
    urgent = await submit("user:a", priority=5)  # rank 3, but urgent
    low = await submit("user:b", priority=-1)
    other = await submit("user:c")  # rank 0: overtakes a's backlog
    # Due an hour ago (a retry's or a delay's run_at): before jobs of its rank created
    # earlier.
    overdue = await submit("user:d", run_at=now() - 3600)
    assert await _claim_order(store) == [urgent, overdue, backlog[0], other, backlog[1],
                                         backlog[2], low]


async def test_workers_claim_only_their_queues(store: Store) -> None:
    media, _ = await store.submit("user:a", "t", None, None, 1, place=Placement(queue="media"))
    plain, _ = await store.submit("user:a", "t", None, None, 1)
    assert await _claim_order(store, queues=["mail"]) == []
    assert await _claim_order(store, queues=["default"]) == [plain.id]
    assert await _claim_order(store, queues=["media", "default"]) == [media.id]
    got = await store.get_job(media.id)
    assert got is not None and got.snapshot()["queue"] == "media"


async def test_submitters_choose_a_priority_only_within_the_tasks_range(server: Proc) -> None:
    c = await guest(server.url)
    job, _ = await c.submit("ranked", 1)
    assert (job["priority"], job["queue"]) == (2, "media")  # the task's own
    job, _ = await c.submit_with("ranked", 2, priority=10)
    assert job["priority"] == 10
    # A guest trying to jump the line: above the range, or any priority of a task that
    # allows none, or not an integer.
    for task, priority in (("ranked", 11), ("ranked", -6), ("echo", 1), ("echo", 10**9),
                           ("ranked", "9"), ("ranked", 2.5)):
        r = await c.http.post("/api/jobs", json={"task": task, "input": 1,
                                                 "priority": priority})
        assert r.status_code == 422, (task, priority, r.text)
        assert r.json()["detail"][0]["loc"] == ["body", "priority"], r.text
    r = await c.http.post("/api/jobs", json={"task": "echo", "input": 1, "priority": 1})
    assert "cannot be chosen for task 'echo': it is 0" in r.text
    # The default queue's workers (this server's serve every queue) ran them.
    assert (await c.wait_terminal(job["id"]))["status"] == "completed"
    await c.http.aclose()


def test_task_registration_bounds_priorities_and_queue_names() -> None:
    jw = Jobwire()
    for bad in ({"priority": 1001}, {"priority": 5, "priority_range": (0, 4)},
                {"priority_range": (3, 1)}, {"queue": "Media"}, {"queue": ""},
                {"queue": "a" * 51}, {"queue": "a b"}, {"concurrency": 0},
                {"concurrency_key": lambda input, owner: owner}):
        with pytest.raises(ValueError):
            jw.task(**bad)


def test_cli_priority_and_worker_queues(server: Proc, tmp_path: Path, db_url: str) -> None:
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "XDG_CONFIG_HOME": str(tmp_path / "cfg"),
           "JOBWIRE_URL": server.url}
    out = cli("submit", "ranked", "--input", "1", "--priority", "11", env=env)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "--priority: must be between -5 and 10" in out.stderr, out.stderr
    out = cli("submit", "ranked", "--input", "1", "--priority", "7", env=env)
    assert out.returncode == 0, out.stderr
    for bad in ("Media", "a/b", ""):
        out = cli("worker", "--db", db_url, "--app", "tests.tasks:jobwire", "--queue", bad,
                  env=env)
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert out.stderr.startswith("jobwire: --queue: a queue name is"), out.stderr


async def test_a_worker_with_queue_takes_only_that_queue(procs: Any, tmp_path: Path) -> None:
    """`jobwire worker --queue media` runs media jobs and leaves the default queue's."""
    db = f"sqlite:///{tmp_path / 'q.db'}"
    api: Proc = procs("serve", "--db", db, "--no-workers")
    c = await guest(api.url)
    media, _ = await c.submit("ranked", 1)
    plain, _ = await c.submit("echo", 2)
    worker: Proc = procs("worker", "--db", db, "--queue", "media")
    assert (await c.wait_terminal(media["id"]))["status"] == "completed"
    worker.stop()
    assert (await c.job(plain["id"]))["status"] == "queued"
    await c.http.aclose()


def test_sqlite_claim_walks_the_index(tmp_path: Path) -> None:
    """EXPLAIN QUERY PLAN of the claim statement itself: its candidates come from the
    claim-order index, limited keys are counted through theirs, no queued job is
    scanned or sorted beyond the batch (PostgreSQL's plan: test_limits)."""
    from jobwire.store.sqlite import claim_sql

    asyncio.run(_migrate(f"sqlite:///{tmp_path / 'plan.db'}"))
    conn = sqlite3.connect(tmp_path / "plan.db")
    plan = [str(r[-1]) for r in conn.execute(
        "EXPLAIN QUERY PLAN " + claim_sql(1, 1), ("w", 1.0, 1.0, "t", "default", 10))]
    text = " | ".join(plan)
    # The queued jobs are walked in the index's order (no sort of them), up to LIMIT.
    scans = [line for line in plan if line.startswith(("SCAN jobs", "SEARCH jobs"))]
    assert "SCAN jobs USING INDEX jobs_queue" in scans, text
    assert all("USING INDEX" in line or "USING COVERING INDEX" in line for line in scans), text
    assert any("SEARCH r USING INDEX jobs_running_limits" in line for line in plan), text
    # What is sorted (the window per limit key) is the batch the LIMIT took: the step
    # after the scan of the candidates' subquery.
    sorts = [i for i, line in enumerate(plan) if "TEMP B-TREE" in line]
    assert all(plan[i - 1].startswith("SCAN (subquery") for i in sorts), text


async def _migrate(url: str) -> None:
    store = open_store(url)
    await store.open()
    await store.close()
