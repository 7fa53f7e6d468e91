"""Idle subscribers: resident memory of one API server process holding 10,000 idle
WebSocket subscriptions (each to a job of its own), in two layouts: 100 sockets with
100 subscriptions each, and 10,000 sockets with one each.

Run: .venv/bin/python -m bench.idle [--subscriptions N] [--reps R]
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import tempfile
import time
from typing import Any

import httpx
import orjson

from bench.common import fmt, jobwire_server, parser, record, rss_mb, stats, table

PROCESSES = 4
ENV = {"JOBWIRE_MAX_CONNECTIONS": "100000"}  # one owner holds every bench socket


async def _prepare(db: str, jobs: int) -> tuple[str, list[str]]:
    """A session and `jobs` queued jobs of its owner, written before the server starts."""
    from jobwire.api.auth import new_session
    from jobwire.store import open_store

    store = open_store(db, max_active_jobs=jobs)  # one owner queues all of them
    await store.open()
    try:
        token, owner = await new_session(store)
        ids = [(await store.submit(owner, "noop", None, None, 1))[0].id for _ in range(jobs)]
    finally:
        await store.close()
    return token, ids


def holder(url: str, token: str, groups: list[list[str]], out: Any, stop: Any) -> None:
    """One socket per group, subscribed to every job of its group; holds them until `stop`."""
    import websockets

    async def main() -> None:
        socks = []
        for group in groups:
            ws = await websockets.connect(f"{url}/api/ws?token={token}", open_timeout=60)
            socks.append(ws)
            for job in group:
                await ws.send(orjson.dumps({"op": "subscribe", "job": job, "after": 1}).decode())
            for _ in group:
                msg = orjson.loads(await asyncio.wait_for(ws.recv(), 60))
                if msg.get("op") != "subscribed":
                    raise RuntimeError(f"server said {msg}")
        out.put("ready")
        deadline = time.monotonic() + 600
        while not stop.is_set() and time.monotonic() < deadline:  # noqa: ASYNC110 - mp.Event
            await asyncio.sleep(0.1)
        for ws in socks:
            await ws.close()

    asyncio.run(main())


def measure(sockets: int, per_socket: int) -> dict[str, Any]:
    total = sockets * per_socket
    with tempfile.TemporaryDirectory() as tmp:
        db = f"sqlite:///{tmp}/bench.db"
        token, ids = asyncio.run(_prepare(db, total))
        with jobwire_server(db, workers=False, env=ENV) as (base, proc):
            httpx.get(f"{base}/api/jobs", headers={"Authorization": f"Bearer {token}"})
            time.sleep(0.5)
            before = rss_mb(proc.pid)
            groups = [ids[i * per_socket:(i + 1) * per_socket] for i in range(sockets)]
            ctx = mp.get_context("spawn")
            out, stop = ctx.Queue(), ctx.Event()
            procs = min(PROCESSES, sockets)
            workers = [ctx.Process(target=holder, daemon=True, args=(
                base.replace("http://", "ws://"), token, groups[i::procs], out, stop))
                for i in range(procs)]
            t0 = time.perf_counter()
            for w in workers:
                w.start()
            try:
                for _ in workers:
                    out.get(timeout=300)
                setup = time.perf_counter() - t0
                time.sleep(1.0)  # let the server settle before reading its memory
                after = rss_mb(proc.pid)
                metrics = httpx.get(f"{base}/metrics").text
            finally:
                stop.set()
                for w in workers:
                    w.join(30)
                    if w.is_alive():
                        w.kill()
    held = next((float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith("jobwire_subscriptions ")), float("nan"))
    return {"rss_before_mb": before, "rss_after_mb": after, "rss_delta_mb": after - before,
            "subscriptions_held": held, "setup_s": setup}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--subscriptions", type=int, default=10_000)
    args = p.parse_args()
    n = args.subscriptions
    layouts = [(n // 100, 100), (n, 1)]
    rows = []
    for sockets, per in layouts:
        runs = []
        for rep in range(args.reps):
            print(f"{sockets:,} sockets x {per} subscriptions, rep {rep + 1}/{args.reps} ...",
                  flush=True)
            runs.append(measure(sockets, per))
            print(f"  {runs[-1]}", flush=True)
        rows.append({"sockets": sockets, "per_socket": per,
                     "held": [r["subscriptions_held"] for r in runs],
                     **{k: stats([r[k] for r in runs]) for k in
                        ("rss_before_mb", "rss_after_mb", "rss_delta_mb", "setup_s")}})
    table(f"One `jobwire serve` process holding {n:,} idle WebSocket subscriptions, "
          f"median (min-max) of {args.reps}",
          ["layout", "held", "RSS before MB", "RSS with subscribers MB", "delta MB",
           "setup s"],
          [[f"{r['sockets']:,} sockets x {r['per_socket']}", ",".join(
              f"{h:,.0f}" for h in r["held"]), fmt(r["rss_before_mb"], 1),
            fmt(r["rss_after_mb"], 1), fmt(r["rss_delta_mb"], 1), fmt(r["setup_s"], 1)]
           for r in rows])
    print(f"appended to {record('idle', {'subscriptions': n, 'reps': args.reps}, rows)}")


if __name__ == "__main__":
    main()
