"""Worker crashes under load: workers SIGKILLed every second or two while hundreds of jobs
with items run. Every job ends completed (or failed after its last attempt, saying so),
no item is counted twice, and no write from an attempt whose lease was taken over is
ever accepted (each done item is stamped with the attempt that ran it)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from tests.chaos.conftest import APP, Serve
from tests.chaos.wire import check_log
from tests.conftest import Client, Proc, guest

pytestmark = pytest.mark.timeout(400)

JOBS = 300
ITEMS = 5
WORKERS = 3
KILLS = 6


def check_job(job: dict[str, Any], items: list[dict[str, Any]],
              events: list[dict[str, Any]]) -> None:
    check_log(events, job["id"])
    assert events[-1]["seq"] == job["seq"]
    if job["status"] == "failed":  # killed in every attempt: the reason says so
        assert "lease expired during attempt 4 of 4" in job["error"], job
    else:
        assert job["status"] == "completed", job
        assert all(it["status"] == "done" for it in items), items
    # Counts agree with the item rows, and each item was finished exactly once.
    done = [it for it in items if it["status"] == "done"]
    assert job["progress"] == {"total": ITEMS, "done": len(done), "failed": 0}
    finished = [e["data"]["ref"] for e in events
                if e["type"] == "item" and e["data"]["item"] == "done"]
    assert sorted(finished) == sorted(it["ref"] for it in done)
    # Every accepted item write came from the attempt holding the job at that point.
    attempt, pids = 0, set()
    for e in events:
        if e["type"] == "started":
            attempt = e["data"]["attempt"]
        elif e["type"] == "retrying":
            attempt = -1  # nothing may be written until the next start
        elif e["type"] == "item" and e["data"]["item"] == "done":
            assert e["data"]["result"]["attempt"] == attempt, (job["id"], e)
            pids.add((attempt, e["data"]["result"]["pid"]))
    assert len(pids) == len({a for a, _ in pids})  # one process per attempt


async def submit_all(c: Client) -> list[str]:
    gate = asyncio.Semaphore(16)

    async def one(k: int) -> str:
        async with gate:
            job, _ = await c.submit("crunch", {"n": ITEMS, "delay": 0.1})
            return str(job["id"])

    return list(await asyncio.gather(*(one(k) for k in range(JOBS))))


async def busy_pids(c: Client) -> set[int]:
    """Workers mid-job: each finished an item, in its current attempt, of a job still
    running (crunch stamps items with the pid and attempt)."""
    running = (await c.http.get("/api/jobs", params={"status": "running"})).json()
    pids: set[int] = set()
    for job in [j for j in running if j["progress"]["done"]][:10]:
        items = (await c.http.get(f"/api/jobs/{job['id']}/items")).json()["items"]
        pids |= {it["result"]["pid"] for it in items
                 if it["status"] == "done" and it["result"]["attempt"] == job["attempt"]}
    return pids


async def mid_job(c: Client, workers: list[Proc], submitting: asyncio.Task[Any],
                  rng: random.Random) -> Proc | None:
    """A worker to kill while it runs jobs, not one still starting or idle (on a loaded
    machine a new worker takes seconds to start); None once no job is left to run."""
    for _ in range(600):
        busy = await busy_pids(c)
        found = [w for w in workers if w.proc is not None and w.proc.pid in busy]
        if found:
            return rng.choice(found)
        if submitting.done() and not busy and not (await c.http.get(
                "/api/jobs", params={"status": "active"})).json():
            return None
        await asyncio.sleep(0.1)
    raise AssertionError("no worker was ever seen mid-job")


async def test_sigkill_workers_under_load(serve: Serve, procs: Any, db_url: str) -> None:
    srv = serve("--no-workers", db=db_url, max_active_jobs=JOBS)  # one guest queues them all
    c = await guest(srv.url)

    def worker() -> Proc:
        p: Proc = procs("worker", "--db", db_url, "--app", APP, "--lease", "2",
                        "--concurrency", "10")
        return p

    workers = [worker() for _ in range(WORKERS)]
    # Kills start while jobs are still being submitted: on a loaded machine the workers
    # can keep up with the submissions, leaving nothing to kill a worker in the middle of.
    submitting = asyncio.create_task(submit_all(c))
    rng = random.Random(11)
    kills = 0
    for _ in range(KILLS):
        await asyncio.sleep(rng.uniform(0.5, 1.5))
        victim = await mid_job(c, workers, submitting, rng)
        if victim is None:
            break
        workers.remove(victim)
        victim.kill()
        kills += 1
        workers.append(worker())
    ids = await submitting

    for _ in range(1200):  # the survivors finish everything, expiring the dead leases
        active = (await c.http.get("/api/jobs", params={"status": "active"})).json()
        if not active:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError(f"{len(active)} jobs still active")

    outcomes: dict[str, int] = {}
    retried = 0
    for job_id in ids:
        found = (await c.http.get(f"/api/jobs/{job_id}/items")).json()
        job = await c.job(job_id)
        assert found["seq"] == job["seq"]
        events = await c.events(job_id)
        check_job(job, found["items"], events)
        outcomes[job["status"]] = outcomes.get(job["status"], 0) + 1
        retried += any(e["type"] == "retrying" for e in events)
    print(f"outcomes {outcomes}, {kills} workers killed mid-job, {retried} jobs retried")
    assert retried > 0, "no worker was killed mid-job: the test proved nothing"
    assert outcomes.get("completed", 0) >= JOBS * 0.9, outcomes
    await c.http.aclose()
