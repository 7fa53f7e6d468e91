"""What every benchmark script shares: repetitions and their statistics, the machine
description, result files, tables, and throwaway databases on the shared servers."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import orjson
import psycopg

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
PG_BASE = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
REDIS_DB = int(os.environ.get("BENCH_REDIS_DB", "9"))  # a database number of its own
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
PYTHON = sys.executable
CONCURRENCY = 10  # every worker's, in every benchmark that runs one
T = TypeVar("T")
PEERS = ("jobwire", "procrastinate", "saq", "arq", "celery", "redis", "psycopg", "uvicorn",
         "websockets", "orjson")


def stats(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of the repetitions (what every table shows)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def fmt(s: dict[str, float] | None, digits: int = 0) -> str:
    if s is None:
        return "—"
    return f"{s['median']:,.{digits}f} ({s['min']:,.{digits}f}-{s['max']:,.{digits}f})"


def subscribers(row: dict[str, Any]) -> str:
    """A progress row's subscriber count, and the task's pace if it had one."""
    rate = f" at {row['rate']:,.0f} updates/s" if row.get("rate") else ""
    return f"{row['subscribers']:,}{rate}"


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _cmd(*args: str) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    versions = {}
    for name in PEERS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    with psycopg.connect(f"{PG_BASE}/test") as conn:
        pg = conn.execute("SHOW server_version").fetchone()
        autovacuum = conn.execute("SHOW autovacuum").fetchone()
    redis_info = _cmd("redis-cli", "-h", "127.0.0.1", "INFO", "server")
    redis_version = next((line.split(":", 1)[1] for line in redis_info.splitlines()
                          if line.startswith("redis_version")), "?")
    return {"host": socket.gethostname(), "nproc": os.cpu_count(), "cpu": cpu,
            "memory_gb": round(mem_kb / 1024 / 1024, 1), "kernel": platform.release(),
            "python": platform.python_version(), "sqlite": __import__("sqlite3").sqlite_version,
            "postgres": pg[0] if pg else "?",
            "postgres_autovacuum": autovacuum[0] if autovacuum else "?",
            "redis_server": redis_version.strip(),
            "packages": versions}


def record(name: str, params: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
    """Append one JSON line (this run) to bench/results/<name>.jsonl."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.jsonl"
    line = {"bench": name, "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": machine(), "params": params, "rows": rows}
    with path.open("a") as f:
        f.write(json.dumps(line) + "\n")
    return path


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]],
          left: int = 1) -> None:
    """A table on the terminal: the first `left` columns (names, text) left-justified, the
    rest (figures) right-justified."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i < left else "right")
    for row in rows:
        t.add_row(*(str(c) for c in row))
    Console(width=200).print(t)


def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--reps", type=int, default=3, help="repetitions (default %(default)s)")
    return p


# -- throwaway databases on the shared servers

def _admin() -> psycopg.Connection[Any]:
    return psycopg.connect(f"{PG_BASE}/test", autocommit=True)


@contextlib.contextmanager
def pg_database(prefix: str) -> Iterator[str]:
    """A fresh PostgreSQL database for one measurement, dropped afterwards."""
    name = f"bench_{prefix}_{uuid.uuid4().hex[:8]}"
    with _admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_BASE}/{name}"
    finally:
        with _admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def pg_analyze(url: str) -> None:
    """ANALYZE a database after its jobs were enqueued. The shared server runs with
    autovacuum off, so a fresh table would otherwise keep no statistics, and a planner
    without them can pick a plan that reads the whole queue on every fetch (Procrastinate's
    did: bench/README.md)."""
    async with await psycopg.AsyncConnection.connect(
            url.replace("postgres://", "postgresql://"), autocommit=True) as conn:
        await conn.execute("ANALYZE")


def redis_flush() -> None:
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()


# -- bounded waiting

async def on_redis(run: Callable[[str], Awaitable[T]]) -> T:
    """run(redis url) on our Redis database, flushed before and after."""
    redis_flush()
    try:
        return await run(REDIS_URL)
    finally:
        redis_flush()


async def on_postgres_for_saq(run: Callable[[str], Awaitable[T]]) -> T:
    """run(url) on a throwaway PostgreSQL database, in the URL scheme SAQ expects."""
    with pg_database("saq") as url:
        return await run(url.replace("postgresql://", "postgres://"))


@contextlib.asynccontextmanager
async def procrastinate_app() -> AsyncIterator[tuple[Any, Any]]:
    """A Procrastinate app on a throwaway database with its schema and a no-op task
    `noop` on queue "bench"; yields (app, noop)."""
    import procrastinate

    with pg_database("procrastinate") as url:
        # Its default pool is 4 connections; its worker holds one to fetch and one per
        # job finishing, so it gets what the worker can use, as jobwire's and SAQ's do.
        app = procrastinate.App(connector=procrastinate.PsycopgConnector(
            conninfo=url, max_size=CONCURRENCY + 1))

        @app.task(name="noop", queue="bench")
        async def noop() -> None:
            return None

        async with app.open_async():
            await app.schema_manager.apply_schema_async()
            yield app, noop


async def procrastinate_count(app: Any, where: str = "") -> int:
    async with app.connector.pool.connection() as conn:
        row = await (await conn.execute(f"SELECT count(*) FROM procrastinate_jobs {where}")
                     ).fetchone()
    return int(row[0])


class Http1Pool:
    """The lightest honest HTTP/1.1 client: up to `size` keep-alive connections, opened on
    demand, one request at a time on each (no pipelining), answers read by Content-Length.
    httpx costs ~3 ms of client CPU per request here, which on 2 shared CPUs starved the
    server and made a storm measure httpx; this costs ~0.07 ms."""

    def __init__(self, url: str, size: int) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self._slots = asyncio.Semaphore(size)
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def request(self, raw: bytes) -> tuple[int, Any]:
        """Send one complete request; (status, decoded JSON body)."""
        async with self._slots:
            reader, writer = self._idle.pop() if self._idle else \
                await asyncio.open_connection(self.host, self.port)
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
            headers = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:] if line)
            lengths = [v for k, v in headers.items() if k.lower() == b"content-length"]
            body = await reader.readexactly(int(lengths[0]))
            self._idle.append((reader, writer))
            return int(head[9:12]), orjson.loads(body)

    def post(self, path: str, token: str, body: object) -> bytes:
        """A complete request posting `body` as JSON with a bearer token, for request()."""
        data = orjson.dumps(body)
        return (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n").encode() + data

    async def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for _, w in self._idle), return_exceptions=True)


def stop_process(proc: subprocess.Popen[Any], seconds: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `seconds`."""
    proc.terminate()
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def wait_until(check: Callable[[], Awaitable[bool]], seconds: float,
                     interval: float = 0.02) -> None:
    """Poll `check` until it holds; TimeoutError after `seconds`."""
    deadline = time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {seconds:.0f} s")
        await asyncio.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int, tid: int | None = None, reaped: bool = False) -> float:
    """utime + stime of a process (or of one of its threads), from /proc; with `reaped`,
    also that of its children that ended and were waited for."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(f) for f in fields[11:15 if reaped else 13])
    return ticks / os.sysconf("SC_CLK_TCK")


def server_cpu_seconds(pid: int) -> float:
    """CPU seconds of a `jobwire serve` and, under `--processes`, of its processes (those
    running now; those replaced, once reaped, count in its own)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return cpu_seconds(pid, reaped=True) + sum(cpu_seconds(int(c)) for c in children)


def postgres_cpu_seconds() -> float:
    """CPU seconds of the local PostgreSQL server: every postgres process's, with the
    backends that ended meanwhile (reaped by the postmaster). Over a window, the database
    server's share of a benchmark's work."""
    total = 0.0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().startswith("postgres"):
                total += cpu_seconds(int(proc.name), reaped=True)
        except (FileNotFoundError, ProcessLookupError):  # ended while we looked
            continue
    return total


def thread_cpu_seconds() -> tuple[float, float]:
    """CPU seconds of this process: (its main thread, whose event loop runs a benchmark;
    all its other threads: the SQLite store's, the task runner's): where a run's CPU went.
    (Python 3.11 gives its threads no OS name to tell them apart by.)"""
    main = cpu_seconds(os.getpid(), os.getpid())
    return main, cpu_seconds(os.getpid()) - main


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.contextmanager
def jobwire_process(command: str, db: str, *args: str, env: dict[str, str] | None = None
                    ) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`jobwire <command>` in its own process with the bench tasks; yields (process, the
    path of its log), and stops it at the end."""
    cmd = [PYTHON, "-m", "jobwire", command, "--db", db, "--app", "bench.tasks:jobwire", *args]
    log = tempfile.NamedTemporaryFile(prefix=f"jobwire-bench-{command}-", suffix=".log",
                                      delete=False)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    try:
        yield proc, log.name
    finally:
        stop_process(proc)
        log.close()


@contextlib.contextmanager
def jobwire_server(db: str, *, workers: bool, port: int | None = None,
                   env: dict[str, str] | None = None, processes: int = 1
                   ) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`jobwire serve` in its own process (`processes` > 1: a supervisor and its processes)
    with the bench tasks; yields (base url, process)."""
    import httpx

    port = port or free_port()
    args = ["--port", str(port), "--processes", str(processes),
            *([] if workers else ["--no-workers"])]
    with jobwire_process("serve", db, *args, env=env) as (proc, log):
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start")
            time.sleep(0.1)
        yield url, proc


# -- subscribers in client processes (bench/progress.py, bench/progress_peers.py)

SUBSCRIBER_PROCESSES = 4
SUBSCRIBER_DEADLINE = 120.0  # seconds one measurement may take before its subscribers give up


def follow_in_processes(target: Callable[..., None], args: tuple[Any, ...],
                        subscribers: int, start: Callable[[], object], items: int
                        ) -> dict[str, Any]:
    """Spread `subscribers` over client processes running target(*args, count, out); once
    each has put ("ready", its CPU seconds then) on `out`, call `start` and gather each
    one's ("done", latencies in s as float64 bytes, drops, errors, time finished, its CPU
    seconds then): the subscribers' CPU over the run says how much of the machine they took."""
    import multiprocessing as mp

    import numpy as np

    procs = min(SUBSCRIBER_PROCESSES, subscribers)
    shares = [subscribers // procs + (i < subscribers % procs) for i in range(procs)]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    workers = [ctx.Process(target=target, args=(*args, share, out), daemon=True)
               for share in shares]
    for w in workers:
        w.start()
    try:
        cpu = 0.0
        for _ in workers:
            kind, ready_cpu = out.get(timeout=150)
            assert kind == "ready"
            cpu -= ready_cpu
        t0 = time.time()
        start()
        lat: list[Any] = []
        drops, errors, last = 0, [], t0
        for _ in workers:
            _, raw, d, errs, finished, done_cpu = out.get(timeout=SUBSCRIBER_DEADLINE + 60)
            lat.append(np.frombuffer(raw, dtype=np.float64))
            drops += d
            errors += errs
            last = max(last, finished)
            cpu += done_cpu
    finally:
        for w in workers:
            w.join(10)
            if w.is_alive():
                w.kill()
    all_lat = np.concatenate(lat) * 1000 if lat else np.zeros(0)
    delivered = len(all_lat)
    return {"subscribers": subscribers, "items": items, "delivered": delivered,
            "expected": items * subscribers,
            "events_per_s": delivered / max(1e-9, last - t0),
            "p50_ms": float(np.percentile(all_lat, 50)) if delivered else None,
            "p99_ms": float(np.percentile(all_lat, 99)) if delivered else None,
            "max_ms": float(all_lat.max()) if delivered else None,
            "drops": drops, "errors": errors, "window_s": last - t0,
            "subscriber_cpu_s": cpu}
