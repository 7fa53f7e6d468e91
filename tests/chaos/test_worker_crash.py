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

JOBS = 500
ITEMS = 5
WORKERS = 3
KILLS = 10


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


async def test_sigkill_workers_under_load(serve: Serve, procs: Any, db_url: str) -> None:
    srv = serve("--no-workers", db=db_url, max_active_jobs=JOBS)  # one guest queues them all
    c = await guest(srv.url)

    def worker() -> Proc:
        p: Proc = procs("worker", "--db", db_url, "--app", APP, "--lease", "2",
                        "--concurrency", "10")
        return p

    workers = [worker() for _ in range(WORKERS)]
    ids = await submit_all(c)
    rng = random.Random(11)
    for _ in range(KILLS):
        await asyncio.sleep(rng.uniform(0.5, 1.5))
        victim = workers.pop(rng.randrange(len(workers)))
        victim.kill()
        workers.append(worker())

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
    print(f"outcomes {outcomes}, {retried} jobs retried")
    assert retried > 0, "no worker was killed mid-job: the test proved nothing"
    assert outcomes.get("completed", 0) >= JOBS * 0.9, outcomes
    await c.http.aclose()
