"""jobwire.js folds a real server's events exactly as jobwire.model.apply_event does."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from typing import Any

import httpx
import pytest

from jobwire.model import JSON, apply_event
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


@pytest.mark.skipif(NODE is None, reason="needs Node.js to run jobwire.js")
def test_js_and_python_fold_every_event_alike(procs: Any, tmp_path: Any) -> None:
    server: Proc = procs("serve", "--db", f"sqlite:///{tmp_path / 'jobwire.db'}")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        token = http.post("/api/sessions").json()["token"]
        http.headers["Authorization"] = f"Bearer {token}"
        ids = [http.post("/api/jobs", json=body).json()["job"]["id"] for body in (
            {"task": "steps", "input": {"n": 4, "fail_at": 2}},
            {"task": "boom", "input": None},
            {"task": "block", "input": {}},
        )]
        blocked = ids[2]
        http.get(f"/api/jobs/{blocked}/events", params={"after": 2, "wait": 10})  # reported
        http.post(f"/api/jobs/{blocked}/cancel")

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
        assert {e["type"] for e in events} >= {"progress", "cancel_requested", "cancelled"}
