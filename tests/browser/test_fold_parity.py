"""jobwire.js folds a real server's events exactly as jobwire.model.apply_event does."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from typing import Any

import httpx
import pytest

from jobwire.model import JSON, ItemStatus, apply_event
from jobwire.store import ItemUpdate, Lease, open_store
from tests.conftest import ROOT, Proc

NODE = shutil.which("node")
JOBWIRE_JS = ROOT / "src" / "jobwire" / "web" / "static" / "jobwire.js"

# Reads {"base", "events"} on stdin and prints the state after each event.
FOLD_JS = f"""
import {{ applyEvent }} from {json.dumps(JOBWIRE_JS.as_uri())};
let input = "";
for await (const chunk of process.stdin) input += chunk;
const {{ base, events }} = JSON.parse(input);
let snapshot = base, items = new Map();
const states = [];
for (const ev of events) {{
  ({{ snapshot, items }} = applyEvent(snapshot, items, ev));
  states.push([snapshot, [...items.values()]]);
}}
console.log(JSON.stringify(states));
"""

BASE = {"id": None, "task": None, "key": None, "owner": None, "status": "queued",
        "progress": {"total": 0, "done": 0, "failed": 0}, "result": None, "error": None,
        "info": None, "attempt": 0, "cancel_requested": False, "seq": 0, "created_at": None,
        "updated_at": None, "finished_at": None}


def fold_py(base: dict[str, JSON], events: list[dict[str, JSON]]) -> list[Any]:
    snapshot, items = base, {}
    states = []
    for ev in events:
        snapshot, items = apply_event(snapshot, items, ev)
        states.append([snapshot, list(items.values())])
    return states


def fold_js(base: dict[str, JSON], events: list[dict[str, JSON]]) -> list[Any]:
    assert NODE is not None
    out = subprocess.run([NODE, "--input-type=module", "-e", FOLD_JS], check=True,
                         input=json.dumps({"base": base, "events": events}),
                         capture_output=True, text=True, timeout=60)
    return list(json.loads(out.stdout))


def finish(http: httpx.Client, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job: dict[str, Any] = http.get(f"/api/jobs/{job_id}").json()
        if job["status"] in ("completed", "failed", "cancelled"):
            return job
        http.get(f"/api/jobs/{job_id}/events", params={"after": job["seq"], "wait": 1})
    raise AssertionError(f"job {job_id} did not finish")


async def lose_leases(db: str, owner: str) -> str:
    """A job whose workers both lose their lease with an item running, acted out on the
    store by hand (its task is not one the server's worker runs): items done, then
    `retrying` resetting one, then a `failed` (attempts used up) resetting another."""
    store = open_store(db)
    await store.open()
    try:
        job, _ = await store.submit(owner, "by-hand", {}, None, 2)
        for attempt, (done, running) in enumerate([("a", "b"), ("b", "c")], start=1):
            [claimed] = await store.claim(f"w{attempt}", ["by-hand"], 1, 0.05)
            lease = Lease(job.id, f"w{attempt}", claimed.attempt)
            await store.declare_items(lease, ["a", "b", "c"])
            await store.update_items(lease, [ItemUpdate(done, ItemStatus.RUNNING)])
            await store.update_items(lease, [ItemUpdate(done, ItemStatus.DONE, {"by": attempt}),
                                             ItemUpdate(running, ItemStatus.RUNNING)])
            await asyncio.sleep(0.1)
            await store.expire_leases()  # or the server's housekeeping got there first
        return job.id
    finally:
        await store.close()


@pytest.mark.skipif(NODE is None, reason="needs Node.js to run jobwire.js")
def test_js_and_python_fold_every_event_alike(procs: Any, tmp_path: Any) -> None:
    db = f"sqlite:///{tmp_path / 'jobwire.db'}"
    server: Proc = procs("serve", "--db", db)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        session = http.post("/api/sessions").json()
        http.headers["Authorization"] = f"Bearer {session['token']}"
        ids = [http.post("/api/jobs", json=body).json()["job"]["id"] for body in (
            {"task": "steps", "input": {"n": 4, "fail_at": 2}},
            {"task": "boom", "input": None},
            {"task": "block", "input": {}},
        )]
        ids.append(asyncio.run(lose_leases(db, session["owner"])))
        blocked = ids[2]
        http.get(f"/api/jobs/{blocked}/events", params={"after": 2, "wait": 10})  # reported
        http.post(f"/api/jobs/{blocked}/cancel")

        seen: set[tuple[str, bool]] = set()
        for job_id in ids:
            job = finish(http, job_id)
            events = http.get(f"/api/jobs/{job_id}/events").json()["events"]
            base = {**BASE, "id": job_id}
            py, js = fold_py(base, events), fold_js(base, events)
            assert js == py
            snapshot, items = py[-1]
            for field in ("status", "progress", "result", "error", "info", "attempt",
                          "cancel_requested", "seq", "finished_at", "task", "key"):
                assert snapshot[field] == job[field], field
            assert items == http.get(f"/api/jobs/{job_id}/items").json()["items"]
            seen.update((e["type"], bool(e["data"].get("reset"))) for e in events)
        # Every kind of event, and both that reset items, were folded by both.
        assert seen >= {("progress", False), ("cancel_requested", False),
                        ("cancelled", False), ("retrying", True), ("failed", True)}, seen
