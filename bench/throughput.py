"""Throughput of no-op jobs: enqueue N (one call per job, and batched where a library
has a batch API), then process them with the library's own worker at concurrency 10.

Run: .venv/bin/python -m bench.throughput [--jobs N] [--reps R] [--only NAME,...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.common import (
    PG_BASE,
    PYTHON,
    REDIS_DB,
    REDIS_URL,
    ROOT,
    fmt,
    on_postgres_for_saq,
    on_redis,
    parser,
    pg_database,
    procrastinate_app,
    procrastinate_count,
    record,
    redis_flush,
    stats,
    stop_process,
    table,
)

log = logging.getLogger("bench.throughput")
CONCURRENCY = 10
BATCH = 1000
ARQ_POLL = 0.05  # arq's default 0.5 s caps it near 200 jobs/s here; tuned in its favour
Rates = dict[str, float | None]  # enqueue, enqueue_batch, processed (jobs/s)


def _timeout(n: int) -> float:
    return 60 + n / 50  # no system here is slower than 50 jobs/s; bounds every wait


async def _timed(n: int, work: Awaitable[Any]) -> float:
    t0 = time.perf_counter()
    await asyncio.wait_for(work, _timeout(n))
    return n / (time.perf_counter() - t0)


async def _each(n: int, call: Callable[[], Awaitable[Any]]) -> None:
    for _ in range(n):
        await call()


async def _bounded(cleanup: Awaitable[Any], seconds: float = 30.0) -> None:
    """A library's shutdown, given up on (and left behind) if it hangs: seen once in a
    while with a LISTEN connection being closed. The measurement is taken by then."""
    task = asyncio.ensure_future(cleanup)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        log.warning("shutdown still running after %.0f s; left behind", seconds)


def _check(name: str, expected: int, got: int) -> None:
    if got != expected:
        raise RuntimeError(f"{name}: {got} jobs processed, expected {expected}")


# -- jobwire


async def jobwire_run(db: str, n: int) -> Rates:
    from bench.tasks import jobwire
    from jobwire.model import EventType
    from jobwire.store import open_store
    from jobwire.worker import Worker

    store = open_store(db)
    await store.open()
    finished = asyncio.Event()
    completed = 0

    def hint(job: str, seq: int, ev: Any) -> None:
        nonlocal completed
        if ev is not None and ev.type == EventType.COMPLETED:
            completed += 1
            if completed >= n:
                finished.set()

    store.listen(hint)
    try:
        enqueue = await _timed(n, _each(n, lambda: store.submit("bench", "noop", None, None, 1)))
        worker = Worker(jobwire, store, concurrency=CONCURRENCY)

        async def all_done() -> None:
            # The store's hints give the moment; once a second the table has the final
            # word, should a completion have been committed without its hint.
            while not finished.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(finished.wait(), 1.0)
                if (await store.count_by_status()).get("completed", 0) >= n:
                    return

        t0 = time.perf_counter()
        await worker.start()
        try:
            await asyncio.wait_for(all_done(), _timeout(n))
            processed = n / (time.perf_counter() - t0)
        finally:
            await _bounded(worker.stop())
        if completed != n:
            log.warning("jobwire: %d of %d completions were hinted; the table has them all",
                        completed, n)
        _check("jobwire", n, (await store.count_by_status()).get("completed", 0))
    finally:
        await _bounded(store.close())
    return {"enqueue": enqueue, "enqueue_batch": None, "processed": processed}


async def jobwire_sqlite(n: int) -> Rates:
    with tempfile.TemporaryDirectory() as tmp:
        return await jobwire_run(f"sqlite:///{tmp}/bench.db", n)


async def jobwire_postgres(n: int) -> Rates:
    with pg_database("jobwire") as url:
        return await jobwire_run(url, n)


# -- peers


async def procrastinate_pg(n: int) -> Rates:
    async with procrastinate_app() as (app, noop):
        enqueue = await _timed(n, _each(n, noop.defer_async))
        processed = await _timed(n, app.run_worker_async(
            queues=["bench"], concurrency=CONCURRENCY, wait=False,
            install_signal_handlers=False))
        _check("procrastinate", n, await procrastinate_count(app, "WHERE status = 'succeeded'"))

        async def batches() -> None:
            for start in range(0, n, BATCH):
                await noop.batch_defer_async(*[{}] * min(BATCH, n - start))

        enqueue_batch = await _timed(n, batches())
    return {"enqueue": enqueue, "enqueue_batch": enqueue_batch, "processed": processed}


async def saq_run(url: str, n: int) -> Rates:
    from saq import Queue, Worker

    async def noop(ctx: Any) -> None:
        return None

    done = 0
    finished = asyncio.Event()

    async def count(ctx: Any) -> None:
        nonlocal done
        done += 1
        if done >= n:
            finished.set()

    queue = Queue.from_url(url, name="bench")
    await queue.connect()
    try:
        enqueue = await _timed(n, _each(n, lambda: queue.enqueue("noop")))
        worker = Worker(queue, functions=[("noop", noop)], concurrency=CONCURRENCY,
                        after_process=[count])
        t0 = time.perf_counter()
        running = asyncio.create_task(worker.start())
        try:
            await asyncio.wait_for(finished.wait(), _timeout(n))
            processed = n / (time.perf_counter() - t0)
        finally:
            await _bounded(worker.stop())
            running.cancel()
            await _bounded(asyncio.gather(running, return_exceptions=True))
        _check("saq", n, done)
    finally:
        await _bounded(queue.disconnect())
    return {"enqueue": enqueue, "enqueue_batch": None, "processed": processed}


async def saq_redis(n: int) -> Rates:
    return await on_redis(lambda url: saq_run(url, n))


async def saq_pg(n: int) -> Rates:
    return await on_postgres_for_saq(lambda url: saq_run(url, n))


async def arq_redis(n: int) -> Rates:
    from arq import create_pool
    from arq.connections import RedisSettings
    from arq.worker import Worker, func

    async def noop(ctx: Any) -> None:
        return None

    redis_flush()
    pool = await create_pool(RedisSettings(host="127.0.0.1", port=6379, database=REDIS_DB))
    try:
        enqueue = await _timed(n, _each(n, lambda: pool.enqueue_job("noop")))
        worker = Worker(functions=[func(noop, name="noop")], redis_pool=pool,
                        max_jobs=CONCURRENCY, burst=True, handle_signals=False,
                        poll_delay=ARQ_POLL)
        processed = await _timed(n, worker.async_run())
        _check("arq", n, worker.jobs_complete)
        await worker.close()
    finally:
        await pool.aclose()
        redis_flush()
    return {"enqueue": enqueue, "enqueue_batch": None, "processed": processed}


async def celery_redis(n: int) -> Rates:
    """The worker is Celery's own (`celery worker`, prefork pool, -c 10) in a process of
    its own; it starts on another queue and is pointed at the jobs once it is warm."""
    import redis

    from bench.celery_app import COUNTER, app, noop, warm

    redis_flush()
    r = redis.Redis.from_url(REDIS_URL)
    enqueue = await _timed(n, asyncio.to_thread(lambda: [noop.delay() for _ in range(n)]))
    worker = subprocess.Popen(  # noqa: ASYNC220 - started once, not awaited
        [PYTHON, "-m", "celery", "-A", "bench.celery_app", "worker", "-Q", "warm",
         "-c", str(CONCURRENCY), "-P", "prefork", "-l", "WARNING", "--without-gossip",
         "--without-mingle", "--without-heartbeat"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        warm.apply_async(queue="warm")
        deadline = time.monotonic() + 60
        while int(r.get(COUNTER) or 0) < 1:
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError("celery worker did not start")
            await asyncio.sleep(0.05)
        r.set(COUNTER, 0)

        async def drain() -> None:
            app.control.add_consumer("bench", reply=False)
            while int(r.get(COUNTER) or 0) < n:  # noqa: ASYNC110 - the count is in Redis
                await asyncio.sleep(0.01)

        processed = await _timed(n, drain())
        _check("celery", n, int(r.get(COUNTER) or 0))
    finally:
        stop_process(worker, 20)
        redis_flush()
    return {"enqueue": enqueue, "enqueue_batch": None, "processed": processed}


SYSTEMS: dict[str, Callable[[int], Awaitable[Rates]]] = {
    "jobwire (SQLite)": jobwire_sqlite,
    "jobwire (PostgreSQL)": jobwire_postgres,
    "Procrastinate (PostgreSQL)": procrastinate_pg,
    "SAQ (PostgreSQL)": saq_pg,
    "SAQ (Redis)": saq_redis,
    "arq (Redis)": arq_redis,
    "Celery (Redis)": celery_redis,
}


# -- the limits of the machine


def pgbench_tps(seconds: int) -> float:
    with pg_database("pgbench") as url:
        name = url.rsplit("/", 1)[1]
        conn = ["-h", "127.0.0.1", "-U", "postgres"]
        subprocess.run(["pgbench", "-i", "-q", "-s", "1", *conn, name], check=True,
                       capture_output=True, timeout=120)
        out = subprocess.run(["pgbench", "-N", "-c", str(CONCURRENCY), "-j", "2", "-T",
                              str(seconds), *conn, name], check=True, capture_output=True,
                             text=True, timeout=seconds + 60).stdout
    match = re.search(r"tps = ([\d.]+)", out)
    if match is None:
        raise RuntimeError(f"no tps in pgbench output:\n{out}")
    return float(match.group(1))


def sqlite_commit_rate(seconds: float) -> float:
    """Single-row INSERT, one commit each, with jobwire's PRAGMAs (WAL, synchronous=NORMAL)."""
    with tempfile.TemporaryDirectory() as tmp:
        conn = sqlite3.connect(Path(tmp) / "raw.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t (v) VALUES (?)", ("x" * 32,))
            conn.execute("COMMIT")
            count += 1
        rate = count / (time.perf_counter() - t0)
        conn.close()
    return rate


def run_isolated(name: str, n: int) -> Rates:
    """One measurement in a process of its own, killed if it outlives its time bound."""
    out = subprocess.run([PYTHON, "-m", "bench.throughput", "--one", name, "--jobs", str(n)],
                         cwd=ROOT, stdout=subprocess.PIPE, text=True,
                         timeout=3 * _timeout(n) + 120)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"exit status {out.returncode}")
    rates: Rates = json.loads(lines[-1])
    return rates


def one(name: str, n: int) -> None:
    """The child's side: measure, print the rates, and leave without waiting for any
    shutdown a library left hanging."""
    logging.basicConfig(level=logging.WARNING)
    loop = asyncio.new_event_loop()
    try:
        rates = loop.run_until_complete(SYSTEMS[name](n))
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        os._exit(1)
    print(json.dumps(rates), flush=True)
    os._exit(0)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--jobs", type=int, default=20_000, help="jobs per run (default %(default)s)")
    p.add_argument("--only", default="", help="comma-separated substrings of system names")
    p.add_argument("--limit-seconds", type=int, default=5, help="pgbench / SQLite run length")
    args = p.parse_args()
    if args.one:
        one(args.one, args.jobs)
    logging.basicConfig(level=logging.WARNING)
    names = [s for s in SYSTEMS if not args.only or
             any(o.strip().lower() in s.lower() for o in args.only.split(","))]
    samples: dict[str, dict[str, list[float]]] = {s: {} for s in names}
    errors: dict[str, str] = {}
    for rep in range(args.reps):
        for name in names:
            if name in errors:
                continue
            print(f"rep {rep + 1}/{args.reps}: {name} ...", flush=True)
            try:
                rates = run_isolated(name, args.jobs)
            except Exception as exc:  # one broken peer must not sink the whole run
                errors[name] = f"{type(exc).__name__}: {exc}"
                print(f"  failed: {errors[name]}", flush=True)
                continue
            for k, v in rates.items():
                if v is not None:
                    samples[name].setdefault(k, []).append(v)
    limits = {
        "pgbench -N tps (10 clients)": [pgbench_tps(args.limit_seconds) for _ in range(args.reps)],
        "SQLite single-insert commits/s": [sqlite_commit_rate(args.limit_seconds)
                                           for _ in range(args.reps)],
    }
    rows = []
    for name in names:
        got = {k: stats(v) for k, v in samples[name].items()}
        rows.append({"system": name, **got, **({"error": errors[name]} if name in errors else {})})
    rows += [{"system": k, "limit": stats(v)} for k, v in limits.items()]
    table(f"No-op jobs, {args.jobs:,} per run, worker concurrency {CONCURRENCY}, "
          f"median (min-max) of {args.reps}, jobs/s",
          ["system", "enqueue (1 call/job)", f"enqueue (batches of {BATCH})", "processed"],
          [[r["system"], fmt(r.get("enqueue")), fmt(r.get("enqueue_batch")),
            fmt(r.get("processed")) if "error" not in r else r["error"][:60]]
           for r in rows if "limit" not in r])
    table("Limits of this machine", ["measure", "per second"],
          [[r["system"], fmt(r["limit"])] for r in rows if "limit" in r])
    params = {"jobs": args.jobs, "reps": args.reps, "concurrency": CONCURRENCY, "batch": BATCH,
              "arq_poll_delay": ARQ_POLL, "pg": PG_BASE, "redis": REDIS_URL}
    print(f"appended to {record('throughput', params, rows)}")


if __name__ == "__main__":
    main()
