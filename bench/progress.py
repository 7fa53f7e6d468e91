"""Progress to the client: one job reports 10,000 item updates while N live WebSocket
subscribers (spread over client processes) watch it. Events/s delivered to all, and the
latency from the task's progress call (its wall clock, stamped into the item result)
to receipt by each subscriber. Then the same with the peers that can report progress,
followed the way a UI would with each (bench/progress_peers.py), up to 100 subscribers.

Run: .venv/bin/python -m bench.progress [--items N] [--subscribers 1,100,1000] [--reps R]
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from bench import progress_peers, wsreader
from bench.common import (
    SUBSCRIBER_DEADLINE,
    SUBSCRIBER_PROCESSES,
    fmt,
    follow_in_processes,
    jobwire_process,
    jobwire_server,
    parser,
    pg_database,
    record,
    server_cpu_seconds,
    stats,
    subscribers,
    table,
)

# From this many subscribers on, one run cannot deliver everything within the deadline on a
# small machine (10,000 x 1,000 = 10 M messages), so it runs --large-reps times.
LARGE = 1000
# The paced run: a task reporting as fast as it can keeps a small machine saturated (the
# subscribers' parsing included), which measures a backlog, not the latency a UI sees at
# a rate the machine sustains. 200 updates/s to 1,000 sockets is 200,000 events/s, all
# 10 M within 50 s, well inside the deadline.
PACED = 200.0
# The task in a worker process of its own, the subscribers on `serve --no-workers`: each
# event crosses processes through the SQLite file (store/doorbell.py).
SPLIT = "SQLite, task in a worker process"


async def _subscriber(url: str, token: str, job: str, after: int, ready: asyncio.Event,
                      lat: list[float], deadline: float) -> tuple[int, int]:
    """One live subscriber: resumes after a drop like a UI would. Returns (events, drops)."""
    try:
        return await _follow(url, token, job, after, ready, lat, deadline)
    finally:
        ready.set()  # a subscriber that failed must not hold the others at the gate


async def _follow(url: str, token: str, job: str, after: int, ready: asyncio.Event,
                  lat: list[float], deadline: float) -> tuple[int, int]:
    from jobwire.client.connection import messages

    seen, drops = after, 0

    def on_text(frame: bytes) -> bool:
        nonlocal seen
        now = time.time()
        for msg in messages(frame):  # one frame may carry several events
            if msg.get("op") == "subscribed":
                ready.set()
                continue
            if "op" in msg:
                raise RuntimeError(f"server said {msg}")
            seen = msg["seq"]
            if msg["type"] == "item":
                lat.append(now - msg["data"]["result"]["t"])
            elif msg["type"] in ("completed", "failed", "cancelled"):
                return True
        return False

    while time.time() < deadline:
        subscribe = orjson.dumps({"op": "subscribe", "job": job, "after": seen})
        try:
            # One timeout for the whole connection: the subscribers share the server's
            # CPUs and must stay cheap (bench/wsreader.py).
            async with asyncio.timeout(max(0.1, deadline - time.time())):
                if await wsreader.follow(f"{url}/api/ws?token={token}", subscribe, on_text):
                    return seen - after, drops
        except TimeoutError:
            break
        except OSError:
            pass
        drops += 1  # resumes from its last seq, like a UI
    return seen - after, drops


def client_process(url: str, token: str, job: str, after: int, count: int,
                   out: Any) -> None:
    """`count` subscribers in one process; reports their latencies (s) through `out`."""
    async def main() -> None:
        deadline = time.time() + SUBSCRIBER_DEADLINE
        lat: list[float] = []
        readies = [asyncio.Event() for _ in range(count)]
        tasks = [asyncio.create_task(_subscriber(url, token, job, after, r, lat, deadline))
                 for r in readies]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 120)
        out.put(("ready", time.process_time()))
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [repr(r) for r in results if isinstance(r, BaseException)]
        drops = sum(r[1] for r in results if isinstance(r, tuple))
        out.put(("done", np.asarray(lat, dtype=np.float64).tobytes(), drops, errors[:3],
                 time.time(), time.process_time()))

    asyncio.run(main())


def measure(base: str, server: int, items: int, subscribers: int, rate: float | None
            ) -> dict[str, Any]:
    """One run against the server at `base` (process `server`), with its CPU over the run;
    the task makes at most `rate` updates/s (None: as many as it can)."""
    with tempfile.TemporaryDirectory() as tmp:
        gate = Path(tmp) / "go"
        client = httpx.Client(base_url=base, timeout=30)
        token = client.post("/api/sessions").json()["token"]
        headers = {"Authorization": f"Bearer {token}"}
        job = client.post("/api/jobs", headers=headers, json={
            "task": "progress", "input": {"items": items, "gate": str(gate), "rate": rate},
        }).json()["job"]
        deadline = time.monotonic() + 60
        while job["progress"]["total"] < items:  # declared and waiting at the gate
            if time.monotonic() > deadline:
                raise TimeoutError(f"job never declared its items: {job}")
            time.sleep(0.05)
            job = client.get(f"/api/jobs/{job['id']}", headers=headers).json()
        ws_url = base.replace("http://", "ws://")
        cpu = [0.0]

        def start() -> None:
            cpu[0] = server_cpu_seconds(server)
            gate.touch()

        got = follow_in_processes(client_process, (ws_url, token, job["id"], job["seq"]),
                                  subscribers, start, items)
        return {**got, "server_cpu_s": server_cpu_seconds(server) - cpu[0]}

ENV = {"JOBWIRE_MAX_CONNECTIONS": "100000"}  # one owner holds every bench socket


def run_backend(db: str, items: int, counts: list[int], reps: int, large_reps: int,
                paced: float, processes: int, worker_process: bool = False
                ) -> list[dict[str, Any]]:
    """A row per subscriber count, the task reporting as fast as it can; then, with
    `paced`, a row at LARGE subscribers with the task making `paced` updates/s. With
    `worker_process`, the task runs in a `jobwire worker` beside a `serve --no-workers`:
    its events reach the server's subscribers through the database."""
    def one(n: int, rate: float | None = None) -> dict[str, Any]:
        with jobwire_server(db, workers=not worker_process, env=ENV,
                            processes=processes) as (base, proc), \
                (jobwire_process("worker", db) if worker_process else contextlib.nullcontext()):
            return measure(base, proc.pid, items, n, rate)
    rows = repeat(one, items, counts, reps, large_reps)
    if paced:
        print(f"  paced at {paced:g} updates/s:", flush=True)
        rows += [{**r, "rate": paced} for r in repeat(
            lambda n: one(n, paced), items, [LARGE], reps, large_reps)]
    return rows


def repeat(one: Callable[[int], dict[str, Any]], items: int, counts: list[int], reps: int,
           large_reps: int) -> list[dict[str, Any]]:
    """A row per subscriber count: `one(n)` repeated, as median (min-max)."""
    rows = []
    for n in counts:
        runs = []
        n_reps = reps if n < LARGE else large_reps
        for rep in range(n_reps):
            print(f"  {n} subscribers, rep {rep + 1}/{n_reps} ...", flush=True)
            runs.append(one(n))
            r = runs[-1]
            print(f"    {r['delivered']:,}/{r['expected']:,} events, "
                  f"{r['events_per_s']:,.0f}/s, p99 {r['p99_ms']} ms, drops {r['drops']}"
                  + (f", errors {r['errors']}" if r["errors"] else ""), flush=True)
        ok = [r for r in runs if r["delivered"]]
        rows.append({
            "subscribers": n, "items": items, "reps": n_reps,
            "complete": all(r["delivered"] == r["expected"] for r in runs),
            "delivered": [r["delivered"] for r in runs],
            "drops": [r["drops"] for r in runs],
            **{k: stats([r[k] for r in ok]) if ok else None
               for k in ("events_per_s", "p50_ms", "p99_ms", "max_ms", "window_s",
                         "subscriber_cpu_s", "server_cpu_s") if all(k in r for r in runs)}})
    return rows


def cpu_share(row: dict[str, Any]) -> str:
    """Where the machine's CPU went in a run (medians): the server's and the subscriber
    processes' CPU seconds beside the run's length; on 2 CPUs a sum near twice the length
    means the run was bound by CPU, the subscribers' share by the harness's own."""
    if row.get("window_s") is None:
        return "—"
    server = f"{row['server_cpu_s']['median']:.1f} + " if row.get("server_cpu_s") else ""
    return (f"{server}{row['subscriber_cpu_s']['median']:.1f} / "
            f"{row['window_s']['median']:.1f}")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--subscribers", default="1,100,1000")
    p.add_argument("--large-reps", type=int, default=1,
                   help=f"repetitions with >= {LARGE} subscribers (default %(default)s)")
    p.add_argument("--only", default="", help="sqlite or postgres (jobwire only)")
    p.add_argument("--processes", type=int, default=1,
                   help="jobwire serve --processes (default %(default)s)")
    p.add_argument("--paced", type=float, default=PACED,
                   help=f"updates/s of an extra run at {LARGE} subscribers with the task "
                        "paced (0: none; default %(default)s)")
    args = p.parse_args()
    counts = [int(c) for c in args.subscribers.split(",")]
    rows: list[dict[str, Any]] = []
    for backend in ("SQLite", "PostgreSQL", SPLIT):
        if args.only and args.only.lower() not in backend.lower():
            continue
        print(f"jobwire ({backend}) ...", flush=True)
        try:
            if backend == "PostgreSQL":
                with pg_database("progress") as url:
                    got = run_backend(url, args.items, counts, args.reps, args.large_reps,
                                      args.paced, args.processes)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    got = run_backend(f"sqlite:///{tmp}/bench.db", args.items, counts,
                                      args.reps, args.large_reps, args.paced,
                                      args.processes, worker_process=backend == SPLIT)
        except Exception as exc:  # report it and go on with the other backend
            print(f"  failed: {type(exc).__name__}: {exc}", flush=True)
            rows.append({"system": f"jobwire ({backend})", "error": repr(exc)})
            continue
        rows += [{"system": f"jobwire ({backend})", **r} for r in got]
    peer_counts = [n for n in counts if n <= PEER_MAX]
    for name, run in progress_peers.PEERS.items():
        if args.only or not peer_counts:
            continue
        print(f"{name} ...", flush=True)
        try:
            got = repeat(functools.partial(run, args.items), args.items, peer_counts,
                         args.reps, args.large_reps)
        except Exception as exc:  # report it and go on
            print(f"  failed: {type(exc).__name__}: {exc}", flush=True)
            rows.append({"system": name, "error": repr(exc)})
            continue
        rows += [{"system": name, **r} for r in got]
    rows += [{"system": name, "note": note} for name, note in PEERS.items()]
    processes = f", jobwire serve --processes {args.processes}" if args.processes > 1 else ""
    table(f"{args.items:,} item updates of one job to N WebSocket subscribers{processes}, "
          f"median (min-max) of {args.reps} ({args.large_reps} from {LARGE:,} subscribers)",
          ["system", "subscribers", "events/s to all", "p50 ms", "p99 ms", "max ms",
           "all delivered", "CPU s: server + subscribers / run s"],
          [[r["system"], subscribers(r), fmt(r["events_per_s"]), fmt(r["p50_ms"], 1),
            fmt(r["p99_ms"], 1), fmt(r["max_ms"], 1), "yes" if r["complete"] else
            f"no: {r['delivered']}", cpu_share(r)] for r in rows if "subscribers" in r])
    for r in rows:
        if "note" in r:
            print(f"{r['system']}: {r['note']}")
    params = {"items": args.items, "subscribers": counts, "reps": args.reps,
              "large_reps": args.large_reps, "client_processes": SUBSCRIBER_PROCESSES,
              "deadline_s": SUBSCRIBER_DEADLINE, "processes": args.processes}
    print(f"appended to {record('progress', params, rows)}")


# Peers' subscribers each re-read (SAQ) or poll (Celery) the job: at 1,000 of them that
# is millions of reads of one key, which says nothing more than 100 do.
PEER_MAX = 100
# The peers with no progress to measure (SAQ and Celery: bench/progress_peers.py).
PEERS = {
    "Procrastinate": "no progress reporting and no push at all: a UI polls its own table.",
    "arq": "no progress reporting: job.info()/status() polling only.",
}


if __name__ == "__main__":
    main()
