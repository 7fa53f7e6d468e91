"""Cost growth: submit and claim latency as the jobs table grows from 10^3 to 10^6
finished jobs (each with its three events), on both backends. Indexes must keep it flat.

Finished jobs are bulk-inserted with SQL straight into the store's tables (setup speed);
then one call at a time is timed through the store API.

Run: .venv/bin/python -m bench.growth [--max 1000000] [--calls N] [--reps R]
"""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from bench.common import fmt, parser, percentile, pg_database, record, stats, table
from jobwire.model import Status
from jobwire.store import Lease, Store, open_store

# Finished jobs with three events each (created, started, completed), ids old<n>.
SQLITE_FILL = [
    """WITH RECURSIVE c(x) AS (SELECT ? UNION ALL SELECT x + 1 FROM c WHERE x < ?)
    INSERT INTO jobs (id, task, key, owner, status, input, result, attempt, max_attempts, seq,
                      created_at, updated_at, finished_at)
    SELECT 'old' || x, 'noop', 'k' || x, 'owner' || (x % 1000), 'completed', 'null', 'null',
           1, 1, 3, ? + x * 1e-3, ? + x * 1e-3, ? + x * 1e-3 FROM c""",
    """WITH RECURSIVE c(x) AS (SELECT ? UNION ALL SELECT x + 1 FROM c WHERE x < ?)
    INSERT INTO events (job_id, seq, type, data, at)
    SELECT 'old' || x, s.seq, s.type, '{}', ? + x * 1e-3 FROM c,
           (SELECT 1 AS seq, 'created' AS type UNION ALL SELECT 2, 'started'
            UNION ALL SELECT 3, 'completed') AS s""",
]
PG_FILL = [
    """INSERT INTO jobs (id, task, key, owner, status, input, result, attempt, max_attempts, seq,
                         created_at, updated_at, finished_at)
    SELECT 'old' || x, 'noop', 'k' || x, 'owner' || mod(x, 1000), 'completed', 'null', 'null',
           1, 1, 3, {ts}, {ts}, {ts} FROM generate_series(%s::bigint, %s::bigint) AS x""",
    """INSERT INTO events (job_id, seq, type, data, at)
    SELECT 'old' || x, s.seq, s.type, '{{}}', {ts} FROM generate_series(%s::bigint, %s::bigint) x,
           (VALUES (1, 'created'), (2, 'started'), (3, 'completed')) AS s(seq, type)""",
]


def fill_sqlite(db: str, start: int, end: int) -> None:
    conn = sqlite3.connect(db.removeprefix("sqlite:///"), isolation_level=None, timeout=60)
    base = time.time() - 3600
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(SQLITE_FILL[0], (start, end, base, base, base))
    conn.execute(SQLITE_FILL[1], (start, end, base))
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.close()


def _pg_types(conn: psycopg.Connection[Any]) -> dict[str, str]:
    rows = conn.execute("SELECT column_name, data_type FROM information_schema.columns "
                        "WHERE table_name = 'jobs' AND table_schema = current_schema()").fetchall()
    return {r[0]: r[1] for r in rows}


def fill_postgres(db: str, start: int, end: int) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        # Timestamps are whatever type the backend chose (epoch floats or timestamptz).
        ts = ("now() - interval '1 hour'" if "timestamp" in _pg_types(conn)["created_at"]
              else "extract(epoch from now()) - 3600")
        with conn.transaction():
            for sql in PG_FILL:
                conn.execute(sql.format(ts=ts), (start, end))  # type: ignore[arg-type]
        conn.execute("ANALYZE")


async def measure(store: Store, calls: int, tag: str) -> dict[str, float]:
    """Latencies (ms) of `calls` submits, then of `calls` claims of one job each."""
    submit, claim = [], []
    for i in range(calls):
        t0 = time.perf_counter()
        await store.submit("bench", "noop", None, f"{tag}-{i}", 1)
        submit.append((time.perf_counter() - t0) * 1000)
    leases = []
    for _ in range(calls):
        t0 = time.perf_counter()
        jobs = await store.claim("bench-worker", ["noop"], 1, 60)
        claim.append((time.perf_counter() - t0) * 1000)
        leases += [Lease(j.id, "bench-worker", j.attempt) for j in jobs]
    for lease in leases:  # leave no active job behind for the next size
        await store.finish(lease, Status.COMPLETED)
    submit.sort()
    claim.sort()
    return {"submit_p50": percentile(submit, 0.5), "submit_p99": percentile(submit, 0.99),
            "claim_p50": percentile(claim, 0.5), "claim_p99": percentile(claim, 0.99)}


async def grow(db: str, fill: Callable[[str, int, int], None], sizes: list[int], calls: int,
               reps: int) -> list[dict[str, Any]]:
    rows = []
    have = 0
    for size in sizes:
        if have == 0:  # the schema comes from the store itself
            store = open_store(db)
            await store.open()
            await store.close()
        t0 = time.perf_counter()
        await asyncio.to_thread(fill, db, have + 1, size)
        have = size
        print(f"  {size:,} finished jobs (filled in {time.perf_counter() - t0:.1f} s)",
              flush=True)
        # Opened after the fill, so the store does not take the bulk rows for fresh
        # events written by another process and relay them to (absent) listeners.
        store = open_store(db, max_active_jobs=calls)  # `calls` jobs of one owner at once
        await store.open()
        try:
            runs = [await measure(store, calls, f"{size}-{r}") for r in range(reps)]
        finally:
            await store.close()
        rows.append({"finished_jobs": size, **{k: stats([r[k] for r in runs]) for k in runs[0]}})
    return rows


async def sqlite_growth(sizes: list[int], calls: int, reps: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        return await grow(f"sqlite:///{tmp}/bench.db", fill_sqlite, sizes, calls, reps)


async def postgres_growth(sizes: list[int], calls: int, reps: int) -> list[dict[str, Any]]:
    with pg_database("growth") as url:
        return await grow(url, fill_postgres, sizes, calls, reps)


BACKENDS: dict[str, Callable[[list[int], int, int], Awaitable[list[dict[str, Any]]]]] = {
    "SQLite": sqlite_growth,
    "PostgreSQL": postgres_growth,
}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--max", type=int, default=1_000_000)
    p.add_argument("--calls", type=int, default=200, help="timed calls per repetition")
    p.add_argument("--only", default="")
    args = p.parse_args()
    sizes = [10 ** k for k in range(3, 7) if 10 ** k <= args.max]
    rows: list[dict[str, Any]] = []
    for name, run in BACKENDS.items():
        if args.only and args.only.lower() not in name.lower():
            continue
        print(f"{name} ...", flush=True)
        try:
            rows += [{"backend": name, **r} for r in asyncio.run(run(sizes, args.calls, args.reps))]
        except Exception as exc:  # report it and go on with the other backend
            print(f"  failed: {type(exc).__name__}: {exc}", flush=True)
            rows.append({"backend": name, "error": f"{type(exc).__name__}: {exc}"})
    table(f"Latency (ms) of one call as finished jobs accumulate: median (min-max) over "
          f"{args.reps} repetitions of the p50/p99 of {args.calls} calls",
          ["backend", "finished jobs", "submit p50", "submit p99", "claim p50", "claim p99"],
          [[r["backend"], f"{r['finished_jobs']:,}", *(fmt(r[k], 2) for k in (
              "submit_p50", "submit_p99", "claim_p50", "claim_p99"))]
           for r in rows if "error" not in r])
    params = {"sizes": sizes, "calls": args.calls, "reps": args.reps}
    print(f"appended to {record('growth', params, rows)}")


if __name__ == "__main__":
    main()
