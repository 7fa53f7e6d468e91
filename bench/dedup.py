"""Dedup storm: 1,000 concurrent submits of one key. Wall time, and how many jobs exist
afterwards (must be 1), for jobwire and for the peers that have unique/dedup keys.

Run: .venv/bin/python -m bench.dedup [--submits N] [--reps R] [--only NAME,...]
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import httpx

from bench.common import (
    REDIS_DB,
    Http1Pool,
    fmt,
    jobwire_server,
    on_postgres_for_saq,
    on_redis,
    parser,
    pg_database,
    procrastinate_app,
    procrastinate_count,
    record,
    redis_flush,
    stats,
    table,
)

KEY = "storm"
Outcome = tuple[float, int, int]  # wall seconds, submits answered "created", jobs that exist


async def _storm(n: int, submit: Callable[[], Awaitable[bool]]) -> tuple[float, int]:
    t0 = time.perf_counter()
    created = await asyncio.wait_for(asyncio.gather(*(submit() for _ in range(n))), 120)
    return time.perf_counter() - t0, sum(created)


# -- jobwire


async def jobwire_store(db: str, n: int) -> Outcome:
    from jobwire.store import open_store

    store = open_store(db)
    await store.open()
    try:
        async def submit() -> bool:
            _, created = await store.submit("bench", "noop", None, KEY, 1)
            return created

        wall, created = await _storm(n, submit)
        jobs = await store.list_jobs("bench", None, 10)
    finally:
        await store.close()
    return wall, created, len(jobs)


async def jobwire_http(db: str, n: int, client: str) -> Outcome:
    """The same storm through the HTTP API of one `jobwire serve` process, from 100
    keep-alive connections (`client`: "asyncio" for Http1Pool, or "httpx")."""
    body = {"task": "noop", "input": None, "key": KEY}
    with jobwire_server(db, workers=False) as (url, _):
        async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=100),
                                     timeout=60) as http:
            token = (await http.post("/api/sessions")).json()["token"]
            headers = {"Authorization": f"Bearer {token}"}
            if client == "httpx":
                async def submit() -> bool:
                    r = await http.post("/api/jobs", headers=headers, json=body)
                    r.raise_for_status()
                    return bool(r.json()["created"])

                wall, created = await _storm(n, submit)
            else:
                pool = Http1Pool(url, 100)
                raw = pool.post("/api/jobs", token, body)

                async def submit() -> bool:
                    status, answer = await pool.request(raw)
                    if status not in (200, 201):
                        raise RuntimeError(f"submit answered {status}: {answer}")
                    return bool(answer["created"])

                try:
                    wall, created = await _storm(n, submit)
                finally:
                    await pool.close()
            jobs = (await http.get("/api/jobs", headers=headers)).json()
    return wall, created, len(jobs)


def _sqlite(run: Callable[[str, int], Awaitable[Outcome]]) -> Callable[[int], Awaitable[Outcome]]:
    async def go(n: int) -> Outcome:
        with tempfile.TemporaryDirectory() as tmp:
            return await run(f"sqlite:///{tmp}/bench.db", n)
    return go


def _postgres(run: Callable[[str, int], Awaitable[Outcome]]) -> Callable[[int], Awaitable[Outcome]]:
    async def go(n: int) -> Outcome:
        with pg_database("dedup") as url:
            return await run(url, n)
    return go


# -- peers


async def procrastinate_pg(n: int) -> Outcome:
    """queueing_lock: a second job with the same lock is refused while one is queued."""
    from procrastinate.exceptions import AlreadyEnqueued

    async with procrastinate_app() as (app, noop):

        async def submit() -> bool:
            try:
                await noop.configure(queueing_lock=KEY).defer_async()
            except AlreadyEnqueued:
                return False
            return True

        wall, created = await _storm(n, submit)
        return wall, created, await procrastinate_count(app)


async def saq_run(url: str, n: int) -> Outcome:
    """Job key: enqueue returns None while a job with the key exists."""
    from saq import Queue

    queue = Queue.from_url(url, name="bench")
    await queue.connect()
    try:
        async def submit() -> bool:
            return await queue.enqueue("noop", key=KEY) is not None

        wall, created = await _storm(n, submit)
        jobs = await queue.count("queued")
    finally:
        await queue.disconnect()
    return wall, created, jobs


async def saq_redis(n: int) -> Outcome:
    return await on_redis(lambda url: saq_run(url, n))


async def saq_pg(n: int) -> Outcome:
    return await on_postgres_for_saq(lambda url: saq_run(url, n))


async def arq_redis(n: int) -> Outcome:
    """_job_id: enqueue_job returns None while a job with that id exists."""
    from arq import create_pool
    from arq.connections import RedisSettings

    redis_flush()
    pool = await create_pool(RedisSettings(host="127.0.0.1", port=6379, database=REDIS_DB,
                                           max_connections=100))
    try:
        async def submit() -> bool:
            return await pool.enqueue_job("noop", _job_id=KEY) is not None

        wall, created = await _storm(n, submit)
        jobs = len(await pool.queued_jobs())
    finally:
        await pool.aclose()
        redis_flush()
    return wall, created, jobs


# Concurrent submits of one key to one server share one store call (the coalescer,
# src/jobwire/api/coalesce.py): the HTTP rows measure that and the HTTP stack, not the
# dedup index, which the store API rows measure with one store.submit per caller.
COALESCED = "HTTP, coalesced in one server"
SYSTEMS: dict[str, Callable[[int], Awaitable[Outcome]]] = {
    "jobwire (SQLite, store API)": _sqlite(jobwire_store),
    f"jobwire (SQLite, {COALESCED}, asyncio client)": _sqlite(
        partial(jobwire_http, client="asyncio")),
    f"jobwire (SQLite, {COALESCED}, httpx client)": _sqlite(
        partial(jobwire_http, client="httpx")),
    "jobwire (PostgreSQL, store API)": _postgres(jobwire_store),
    f"jobwire (PostgreSQL, {COALESCED}, asyncio client)": _postgres(
        partial(jobwire_http, client="asyncio")),
    f"jobwire (PostgreSQL, {COALESCED}, httpx client)": _postgres(
        partial(jobwire_http, client="httpx")),
    "Procrastinate (PostgreSQL, queueing_lock)": procrastinate_pg,
    "SAQ (PostgreSQL, key)": saq_pg,
    "SAQ (Redis, key)": saq_redis,
    "arq (Redis, _job_id)": arq_redis,
}
NONE = {"Celery (Redis)": "no dedup/unique key in Celery itself (only third-party add-ons)"}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--submits", type=int, default=1000)
    p.add_argument("--only", default="")
    args = p.parse_args()
    names = [s for s in SYSTEMS if not args.only or
             any(o.strip().lower() in s.lower() for o in args.only.split(","))]
    rows: list[dict[str, Any]] = []
    for name in names:
        walls: list[float] = []
        created: list[int] = []
        jobs: list[int] = []
        error = None
        for rep in range(args.reps):
            print(f"rep {rep + 1}/{args.reps}: {name} ...", flush=True)
            try:
                w, c, j = asyncio.run(SYSTEMS[name](args.submits))
            except Exception as exc:  # one broken peer must not sink the whole run
                error = f"{type(exc).__name__}: {exc}"
                print(f"  failed: {error}", flush=True)
                break
            walls.append(w * 1000)
            created.append(c)
            jobs.append(j)
        row: dict[str, Any] = {"system": name, "wall_ms": stats(walls) if walls else None,
                               "created": created, "jobs": jobs}
        if error:
            row["error"] = error
        rows.append(row)
    rows += [{"system": k, "note": v} for k, v in NONE.items()]
    table(f"Dedup storm: {args.submits:,} concurrent submits of one key, "
          f"median (min-max) of {args.reps}",
          ["system", "wall ms", "answered created", "jobs that exist (must be 1)"],
          [[r["system"], fmt(r.get("wall_ms"), 1) if "note" not in r else "—",
            ",".join(map(str, r.get("created", []))) or r.get("note", ""),
            ",".join(map(str, r.get("jobs", []))) or r.get("error", "")] for r in rows])
    print(f"'{COALESCED}': the submits of one key that reach one server together share one "
          "store call (src/jobwire/api/coalesce.py); these rows measure that and the HTTP "
          "stack, the store API rows the dedup index itself.")
    print(f"appended to {record('dedup', {'submits': args.submits, 'reps': args.reps}, rows)}")


if __name__ == "__main__":
    main()
