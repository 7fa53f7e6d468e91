"""Cost growth: submit and claim latency as the jobs table grows from 10^3 to 10^6
jobs, on both backends: finished jobs (each with its three events), queued jobs waiting
for a worker, and delayed jobs waiting for their run_at. Indexes must keep it flat.

The jobs are bulk-inserted with SQL straight into the store's tables (setup speed), and
the bulk write is checkpointed before timing (a million rows' WAL being copied back
while it runs is the fill's cost, not the table's); then one call at a time is timed
through the store API.

Run: .venv/bin/python -m bench.growth [--max 1000000] [--kinds finished,queued,delayed]
     [--calls N] [--reps R]
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

# What accumulates, by kind: finished jobs with their three events (created, started,
# completed), or jobs waiting to run with their one event (created): queued ones ready to
# be claimed, or delayed ones whose run_at is a day away. Ids old<n>.
KINDS: dict[str, dict[str, Any]] = {
    "finished": {"status": "completed", "result": "'null'", "attempt": 1, "seq": 3,
                 "finished": True, "delay": None},
    "queued": {"status": "queued", "result": "NULL", "attempt": 0, "seq": 1,
               "finished": False, "delay": None},
    "delayed": {"status": "queued", "result": "NULL", "attempt": 0, "seq": 1,
                "finished": False, "delay": 86400},
}
EVENTS = ["created", "started", "completed"]


def _jobs_sql(kind: dict[str, Any], xs: str, owner: str, ts: str, epoch: str,
              true: str, false: str) -> str:
    finished = ts if kind["finished"] else "NULL"
    run_at = "NULL" if kind["delay"] is None else f"{epoch} + {kind['delay']}"
    waiting = false if kind["delay"] is None else true
    return f"""INSERT INTO jobs (id, task, key, owner, status, input, result, attempt,
                     max_attempts, seq, created_at, updated_at, finished_at, run_at, waiting)
    SELECT 'old' || x, 'noop', 'k' || x, {owner}, '{kind["status"]}', 'null', {kind["result"]},
           {kind["attempt"]}, 1, {kind["seq"]}, {ts}, {ts}, {finished}, {run_at}, {waiting}
    FROM {xs}"""


def _events_sql(kind: dict[str, Any], xs: str, ts: str) -> str:
    types = " UNION ALL ".join(f"SELECT {n} AS seq, '{t}' AS type"
                               for n, t in enumerate(EVENTS[:kind["seq"]], 1))
    return f"""INSERT INTO events (job_id, seq, type, data, at)
    SELECT 'old' || x, s.seq, s.type, '{{}}', {ts} FROM {xs}, ({types}) AS s"""


def fill_sqlite(db: str, kind: str, start: int, end: int) -> None:
    conn = sqlite3.connect(db.removeprefix("sqlite:///"), isolation_level=None, timeout=60)
    base = time.time() - 3600
    xs = "c"
    rec = "WITH RECURSIVE c(x) AS (SELECT ? UNION ALL SELECT x + 1 FROM c WHERE x < ?) "
    ts = f"{base} + x * 1e-3"
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(rec + _jobs_sql(KINDS[kind], xs, "'owner' || (x % 1000)", ts, f"{base}",
                                 "1", "0"), (start, end))
    conn.execute(rec + _events_sql(KINDS[kind], xs, ts), (start, end))
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the fill's own copying, done now
    conn.close()


def _pg_types(conn: psycopg.Connection[Any]) -> dict[str, str]:
    rows = conn.execute("SELECT column_name, data_type FROM information_schema.columns "
                        "WHERE table_name = 'jobs' AND table_schema = current_schema()").fetchall()
    return {r[0]: r[1] for r in rows}


def fill_postgres(db: str, kind: str, start: int, end: int) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        # Timestamps are whatever type the backend chose (epoch floats or timestamptz).
        stamped = "timestamp" in _pg_types(conn)["created_at"]
        ts = "now() - interval '1 hour'" if stamped else "extract(epoch from now()) - 3600"
        xs = "generate_series(%s::bigint, %s::bigint) AS x"
        with conn.transaction():
            conn.execute(_jobs_sql(KINDS[kind], xs, "'owner' || mod(x, 1000)", ts,  # type: ignore[arg-type]
                                   "extract(epoch from now())", "true", "false"), (start, end))
            conn.execute(_events_sql(KINDS[kind], xs, ts), (start, end))  # type: ignore[arg-type]
        # What autovacuum would do next (this server runs without it): the fill leaves a
        # dead row version per job in job_feed (stamped at its commit), and the
        # stamp's scan of pending rows would read them all on every commit until then.
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")  # the fill's own writing out, done now


async def measure(store: Store, calls: int, tag: str) -> dict[str, float]:
    """Latencies (ms) of `calls` submits, then of `calls` claims of one job each.

    Each measurement submits as an owner of its own: with queued jobs waiting, claims
    take those, so the submitted jobs stay active, and one owner's active jobs would pile
    up from size to size. A submit counts its owner's active jobs (up to the per-owner
    cap, default 100), so that pile, not the table, would be what grew."""
    submit, claim = [], []
    owner = f"bench-{tag}"
    for i in range(calls):
        t0 = time.perf_counter()
        await store.submit(owner, "noop", None, f"{tag}-{i}", 1)
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


async def grow(db: str, fill: Callable[[str, str, int, int], None], kind: str,
               sizes: list[int], calls: int, reps: int) -> list[dict[str, Any]]:
    rows = []
    have = 0
    for size in sizes:
        if have == 0:  # the schema comes from the store itself
            store = open_store(db)
            await store.open()
            await store.close()
        t0 = time.perf_counter()
        await asyncio.to_thread(fill, db, kind, have + 1, size)
        have = size
        print(f"  {size:,} {kind} jobs (filled in {time.perf_counter() - t0:.1f} s)",
              flush=True)
        # Opened after the fill, so the store does not take the bulk rows for fresh
        # events written by another process and relay them to (absent) listeners.
        # Room for every job a measurement submits (they stay active: see `measure`).
        store = open_store(db, max_active_jobs=calls)
        await store.open()
        try:
            runs = [await measure(store, calls, f"{size}-{r}") for r in range(reps)]
        finally:
            await store.close()
        rows.append({"kind": kind, "jobs": size,
                     **{k: stats([r[k] for r in runs]) for k in runs[0]}})
    return rows


async def sqlite_growth(kind: str, sizes: list[int], calls: int,
                        reps: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        return await grow(f"sqlite:///{tmp}/bench.db", fill_sqlite, kind, sizes, calls, reps)


async def postgres_growth(kind: str, sizes: list[int], calls: int,
                          reps: int) -> list[dict[str, Any]]:
    with pg_database("growth") as url:
        return await grow(url, fill_postgres, kind, sizes, calls, reps)


BACKENDS: dict[str, Callable[[str, list[int], int, int], Awaitable[list[dict[str, Any]]]]] = {
    "SQLite": sqlite_growth,
    "PostgreSQL": postgres_growth,
}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--max", type=int, default=1_000_000)
    p.add_argument("--kinds", default=",".join(KINDS), help="of %(default)s")
    p.add_argument("--calls", type=int, default=1000,
                   help="timed calls per repetition (a p99 of 200 is their second worst)")
    p.add_argument("--only", default="")
    args = p.parse_args()
    sizes = [10 ** k for k in range(3, 7) if 10 ** k <= args.max]
    kinds = [k for k in args.kinds.split(",") if k]
    if unknown := set(kinds) - set(KINDS):
        p.error(f"--kinds: unknown {', '.join(sorted(unknown))}; of {', '.join(KINDS)}")
    rows: list[dict[str, Any]] = []
    for name, run in BACKENDS.items():
        if args.only and args.only.lower() not in name.lower():
            continue
        for kind in kinds:
            print(f"{name}, {kind} jobs ...", flush=True)
            try:
                rows += [{"backend": name, **r}
                         for r in asyncio.run(run(kind, sizes, args.calls, args.reps))]
            except Exception as exc:  # report it and go on with the others
                print(f"  failed: {type(exc).__name__}: {exc}", flush=True)
                rows.append({"backend": name, "kind": kind,
                             "error": f"{type(exc).__name__}: {exc}"})
    table(f"Latency (ms) of one call as jobs accumulate: median (min-max) over "
          f"{args.reps} repetitions of the p50/p99 of {args.calls} calls", *growth_table(rows))
    params = {"sizes": sizes, "kinds": kinds, "calls": args.calls, "reps": args.reps}
    print(f"appended to {record('growth', params, rows)}")


def growth_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The table's header and rows (also `bench.report`'s)."""
    return (["backend", "jobs in the table", "submit p50", "submit p99", "claim p50",
             "claim p99"],
            [[r["backend"], f"{r['jobs']:,} {r['kind']}", *(fmt(r[k], 2) for k in (
                "submit_p50", "submit_p99", "claim_p50", "claim_p99"))]
             for r in rows if "error" not in r])


if __name__ == "__main__":
    main()
