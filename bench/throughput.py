"""Throughput of no-op jobs: enqueue N (one call per job, and batched where a library
has a batch API), then process them with the library's own worker at concurrency 10.

Every system's processing is timed over the same window: from the moment its worker is
started (Celery's, already running and warm, is pointed at the queue) to the moment the
benchmark learns that the last job's end was stored. The worker's shutdown, and on
PostgreSQL an ANALYZE after enqueueing, fall outside it.

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
    CONCURRENCY,
    PG_BASE,
    PYTHON,
    REDIS_DB,
    REDIS_URL,
    ROOT,
    Http1Pool,
    fmt,
    jobwire_server,
    on_postgres_for_saq,
    on_redis,
    parser,
    pg_analyze,
    pg_database,
    postgres_cpu_seconds,
    procrastinate_app,
    procrastinate_count,
    record,
    redis_flush,
    stats,
    stop_process,
    table,
    thread_cpu_seconds,
)

log = logging.getLogger("bench.throughput")
BATCH = 1000
ARQ_POLL = 0.05  # arq's default 0.5 s caps it near 200 jobs/s here; tuned in its favour
Rates = dict[str, float | None]  # enqueue, enqueue_batch, processed (jobs/s)


def _timeout(n: int) -> float:
    return 60 + n / 20  # no system is slower than 20 jobs/s, even on a loaded machine


async def _timed(n: int, work: Awaitable[Any]) -> float:
    t0 = time.perf_counter()
    await asyncio.wait_for(work, _timeout(n))
    return n / (time.perf_counter() - t0)


async def _each(n: int, call: Callable[[], Awaitable[Any]]) -> None:
    for _ in range(n):
        await call()


class Completions:
    """Counts the completions a library's after-job hook reports; `all` is set at the n-th."""

    def __init__(self, n: int) -> None:
        self.n, self.count, self.all = n, 0, asyncio.Event()

    def add(self) -> None:
        self.count += 1
        if self.count >= self.n:
            self.all.set()


async def _processed(n: int, worker: Awaitable[Any], finished: Awaitable[Any]
                     ) -> tuple[float, asyncio.Future[Any]]:
    """Jobs/s from starting `worker` (the coroutine that runs or starts it) until
    `finished`: the window every system is timed over. Also the worker's task, to stop."""
    t0 = time.perf_counter()
    running = asyncio.ensure_future(worker)
    waiting = asyncio.ensure_future(finished)
    try:
        async with asyncio.timeout(_timeout(n)):
            while not waiting.done():
                await asyncio.wait({running, waiting}, return_when=asyncio.FIRST_COMPLETED)
                if running.done() and not running.cancelled() and running.exception():
                    raise RuntimeError("the worker failed") from running.exception()
                if running.done():  # ended of its own accord: only `finished` is left
                    await waiting
        rate = n / (time.perf_counter() - t0)
    finally:
        waiting.cancel()
    return rate, running


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


async def _enqueue_http(db: str, n: int) -> float:
    """POST /api/jobs to a `jobwire serve` process (no workers) on `db`, one request at a
    time from a light client: validation, the route, and the store's submit."""
    cap = {"JOBWIRE_MAX_ACTIVE_JOBS": str(n)}  # one guest queues all n
    with jobwire_server(db, workers=False, env=cap) as (url, _):
        http = Http1Pool(url, 1)
        try:
            _, session = await http.request(http.post("/api/sessions", "", {}))
            raw = http.post("/api/jobs", session["token"], {"task": "noop", "input": None})

            async def submit() -> None:
                status, answer = await http.request(raw)
                if status != 201:
                    raise RuntimeError(f"submit answered {status}: {answer}")

            return await _timed(n, _each(n, submit))
        finally:
            await http.close()


def _cpu_us(before: tuple[float, float], n: int) -> dict[str, float]:
    """CPU µs per job since `before` (thread_cpu_seconds()): in all, on the main thread
    (the event loop) and on the others (the SQLite store's thread): the profile beside
    each rate."""
    loop, others = (b - a for a, b in zip(before, thread_cpu_seconds(), strict=True))
    return {"all": (loop + others) / n * 1e6, "loop": loop / n * 1e6,
            "other threads": others / n * 1e6}


async def jobwire_run(db: str, n: int, via: str) -> Rates:
    """`via`: "store" calls store.submit; "validated" first Jobwire.validate, as the HTTP
    route does; "http" posts to the route of a server process."""
    from bench.tasks import jobwire
    from jobwire.model import EventType
    from jobwire.store import open_store
    from jobwire.worker import Worker

    store = open_store(db, max_active_jobs=n)  # one owner queues all n
    await store.open()
    done = Completions(n)

    def hint(job: str, seq: int, ev: Any) -> None:
        if ev is not None and ev.type == EventType.COMPLETED:
            done.add()

    async def validated() -> None:
        spec, value, key = jobwire.validate("noop", None)
        await store.submit("bench", "noop", value, key, spec.max_attempts)

    store.listen(hint)
    on_pg = db.startswith("postgresql")
    profile: Rates = {}
    try:
        if via == "http":
            enqueue = await _enqueue_http(db, n)
        else:
            submit = validated if via == "validated" else \
                lambda: store.submit("bench", "noop", None, None, 1)
            cpu = thread_cpu_seconds()
            enqueue = await _timed(n, _each(n, submit))
            profile.update({f"enqueue CPU µs/job, {k}": v for k, v in _cpu_us(cpu, n).items()})
        if on_pg:
            await pg_analyze(db)
        worker = Worker(jobwire, store, concurrency=CONCURRENCY)

        async def all_done() -> None:
            # The store's hints give the moment; once a second the table has the final
            # word, should a completion have been committed without its hint.
            while not done.all.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.all.wait(), 1.0)
                if (await store.count_by_status()).get("completed", 0) >= n:
                    return

        try:
            cpu, server = thread_cpu_seconds(), postgres_cpu_seconds() if on_pg else 0.0
            processed, _ = await _processed(n, worker.start(), all_done())
            profile.update({f"processed CPU µs/job, {k}": v for k, v in _cpu_us(cpu, n).items()})
            if on_pg:
                profile["processed CPU µs/job, database server"] = \
                    (postgres_cpu_seconds() - server) / n * 1e6
        finally:
            await _bounded(worker.stop())
        if done.count != n:
            log.warning("jobwire: %d of %d completions were hinted; the table has them all",
                        done.count, n)
        _check("jobwire", n, (await store.count_by_status()).get("completed", 0))
    finally:
        await _bounded(store.close())
    return {"enqueue": enqueue, "enqueue_batch": None, "processed": processed, **profile}


def jobwire_sqlite(via: str) -> Callable[[int], Awaitable[Rates]]:
    async def run(n: int) -> Rates:
        with tempfile.TemporaryDirectory() as tmp:
            return await jobwire_run(f"sqlite:///{tmp}/bench.db", n, via)
    return run


def jobwire_postgres(via: str) -> Callable[[int], Awaitable[Rates]]:
    async def run(n: int) -> Rates:
        with pg_database("jobwire") as url:
            return await jobwire_run(url, n, via)
    return run


# -- peers


async def procrastinate_pg(n: int) -> Rates:
    async with procrastinate_app() as (app, noop):
        enqueue = await _timed(n, _each(n, noop.defer_async))
        await pg_analyze(app.connector.pool.conninfo)
        # Its after-job hook: the job manager's finish_job, which stores the job's end.
        done = Completions(n)
        finish = app.job_manager.finish_job

        async def finish_job(*args: Any, **kwargs: Any) -> None:
            await finish(*args, **kwargs)
            done.add()

        app.job_manager.finish_job = finish_job
        processed, running = await _processed(n, app.run_worker_async(
            queues=["bench"], concurrency=CONCURRENCY, wait=False,
            install_signal_handlers=False), done.all.wait())
        await _bounded(running)  # wait=False: it returns once the queue is empty
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

    done = Completions(n)

    async def count(ctx: Any) -> None:
        done.add()

    queue = Queue.from_url(url, name="bench")
    await queue.connect()
    try:
        enqueue = await _timed(n, _each(n, lambda: queue.enqueue("noop")))
        if url.startswith("postgres"):
            await pg_analyze(url)
        worker = Worker(queue, functions=[("noop", noop)], concurrency=CONCURRENCY,
                        after_process=[count])
        processed, running = await _processed(n, worker.start(), done.all.wait())
        await _bounded(worker.stop())
        running.cancel()
        await _bounded(asyncio.gather(running, return_exceptions=True))
        _check("saq", n, done.count)
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

    done = Completions(n)

    async def count(ctx: Any) -> None:  # arq calls it once the job's result is stored
        done.add()

    redis_flush()
    pool = await create_pool(RedisSettings(host="127.0.0.1", port=6379, database=REDIS_DB))
    try:
        enqueue = await _timed(n, _each(n, lambda: pool.enqueue_job("noop")))
        worker = Worker(functions=[func(noop, name="noop")], redis_pool=pool,
                        max_jobs=CONCURRENCY, burst=True, handle_signals=False,
                        poll_delay=ARQ_POLL, after_job_end=count)
        processed, running = await _processed(n, worker.async_run(), done.all.wait())
        await _bounded(running)  # burst: it returns once the queue is empty
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

        async def point() -> None:
            app.control.add_consumer("bench", reply=False)

        async def drained() -> None:
            while int(r.get(COUNTER) or 0) < n:  # noqa: ASYNC110 - the count is in Redis
                await asyncio.sleep(0.01)

        processed, _ = await _processed(n, point(), drained())
        _check("celery", n, int(r.get(COUNTER) or 0))
    finally:
        stop_process(worker, 20)
        redis_flush()
    return {"enqueue": enqueue, "enqueue_batch": None, "processed": processed}


SYSTEMS: dict[str, Callable[[int], Awaitable[Rates]]] = {
    "jobwire (SQLite, store API)": jobwire_sqlite("store"),
    "jobwire (SQLite, public submit: validated)": jobwire_sqlite("validated"),
    "jobwire (SQLite, public submit: HTTP POST /api/jobs)": jobwire_sqlite("http"),
    "jobwire (PostgreSQL, store API)": jobwire_postgres("store"),
    "jobwire (PostgreSQL, public submit: validated)": jobwire_postgres("validated"),
    "jobwire (PostgreSQL, public submit: HTTP POST /api/jobs)": jobwire_postgres("http"),
    "Procrastinate (PostgreSQL)": procrastinate_pg,
    "SAQ (PostgreSQL)": saq_pg,
    "SAQ (Redis)": saq_redis,
    "arq (Redis)": arq_redis,
    "Celery (Redis)": celery_redis,
}


# -- the limits of the machine


def pgbench_tps(seconds: int) -> tuple[float, float]:
    """(transactions/s, the database server's CPU µs per transaction) of `pgbench -N`."""
    with pg_database("pgbench") as url:
        name = url.rsplit("/", 1)[1]
        conn = ["-h", "127.0.0.1", "-U", "postgres"]
        subprocess.run(["pgbench", "-i", "-q", "-s", "1", *conn, name], check=True,
                       capture_output=True, timeout=120)
        server = postgres_cpu_seconds()
        out = subprocess.run(["pgbench", "-N", "-c", str(CONCURRENCY), "-j", "2", "-T",
                              str(seconds), *conn, name], check=True, capture_output=True,
                             text=True, timeout=seconds + 60).stdout
        server = postgres_cpu_seconds() - server
    match = re.search(r"tps = ([\d.]+)", out)
    done = re.search(r"number of transactions actually processed: (\d+)", out)
    if match is None or done is None:
        raise RuntimeError(f"no tps in pgbench output:\n{out}")
    return float(match.group(1)), server / int(done.group(1)) * 1e6


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
    pgbench = [pgbench_tps(args.limit_seconds) for _ in range(args.reps)]
    limits = {
        "pgbench -N tps (10 clients)": [tps for tps, _ in pgbench],
        "pgbench -N: database server CPU µs per transaction": [cpu for _, cpu in pgbench],
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
    phases = [f"{phase} CPU µs/job, {part}" for phase in ("enqueue", "processed")
              for part in ("all", "loop", "other threads")]
    phases.append("processed CPU µs/job, database server")
    table("Where jobwire's CPU went: µs per job over each phase, in all, on the event loop's "
          "thread and on the others (on SQLite, its store's thread); on PostgreSQL also the "
          "database server's while processing",
          ["system", *(p.replace(" CPU µs/job,", ":") for p in phases)],
          [[r["system"], *(fmt(r.get(p)) for p in phases)]
           for r in rows if "processed CPU µs/job, all" in r])
    table("Limits of this machine", ["measure", "value"],
          [[r["system"], fmt(r["limit"])] for r in rows if "limit" in r])
    params = {"jobs": args.jobs, "reps": args.reps, "concurrency": CONCURRENCY, "batch": BATCH,
              "arq_poll_delay": ARQ_POLL, "pg": PG_BASE, "redis": REDIS_URL}
    print(f"appended to {record('throughput', params, rows)}")


if __name__ == "__main__":
    main()
