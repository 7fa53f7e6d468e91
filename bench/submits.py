"""Submits over HTTP: POST /api/jobs with a distinct key each, from the light client of
bench/dedup.py (`Http1Pool`: keep-alive connections, one request at a time on each) to a
`jobwire serve --no-workers` on SQLite, with the access log on and off. Submits/s, and
the server process's CPU per request (its utime + stime over the timed window, from
/proc: on a shared machine steadier than the rate).

The jobs are spread over 100 guest sessions: a submit counts its owner's active jobs (the
active-job cap), so one owner holding every queued job of the run would time that count.

Run: .venv/bin/python -m bench.submits [--submits N] [--connections C] [--reps R]
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from typing import Any

from bench.common import (
    Http1Pool,
    fmt,
    jobwire_server,
    parser,
    record,
    server_cpu_seconds,
    stats,
    table,
)

OWNERS = 100


async def run(n: int, connections: int, access_log: bool, processes: int
              ) -> tuple[float, float]:
    """(submits/s, server CPU µs per submit) for n submits after n // 4 to warm up."""
    env = {"JOBWIRE_MAX_ACTIVE_JOBS": str(2 * n), "JOBWIRE_SESSION_RATE": "1000/1s,1000",
           "JOBWIRE_ACCESS_LOG": "1" if access_log else "0"}
    with tempfile.TemporaryDirectory() as tmp, \
            jobwire_server(f"sqlite:///{tmp}/bench.db", workers=False, env=env,
                           processes=processes) as (url, proc):
        http = Http1Pool(url, connections)
        try:
            tokens = []
            for _ in range(OWNERS):
                _, session = await http.request(http.post("/api/sessions", "", {}))
                tokens.append(session["token"])

            async def submit_all(prefix: str, count: int) -> None:
                todo = iter([http.post("/api/jobs", tokens[i % OWNERS], {
                    "task": "noop", "input": None, "key": f"{prefix}{i}"}) for i in range(count)])

                async def lane() -> None:
                    for raw in todo:
                        status, answer = await http.request(raw)
                        if status != 201:
                            raise RuntimeError(f"submit answered {status}: {answer}")

                await asyncio.gather(*(lane() for _ in range(connections)))

            await submit_all("warm", n // 4)
            cpu, start = server_cpu_seconds(proc.pid), time.perf_counter()
            await submit_all("k", n)
            wall, cpu = time.perf_counter() - start, server_cpu_seconds(proc.pid) - cpu
            return n / wall, cpu / n * 1e6
        finally:
            await http.close()


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--submits", type=int, default=5000)
    p.add_argument("--connections", default="1,10", help="comma-separated (default %(default)s)")
    p.add_argument("--processes", type=int, default=1,
                   help="jobwire serve --processes (default %(default)s)")
    args = p.parse_args()
    rows: list[dict[str, Any]] = []
    for connections in (int(c) for c in args.connections.split(",")):
        for access_log in (True, False):
            rates, cpus = [], []
            for rep in range(args.reps):
                print(f"{connections} connection(s), access log {'on' if access_log else 'off'}"
                      f", rep {rep + 1}/{args.reps} ...", flush=True)
                rate, cpu = asyncio.run(run(args.submits, connections, access_log,
                                            args.processes))
                rates.append(rate)
                cpus.append(cpu)
            rows.append({"connections": connections, "access_log": access_log,
                         "submits_per_s": stats(rates), "server_cpu_us": stats(cpus)})
    processes = f" --processes {args.processes}" if args.processes > 1 else ""
    table(f"{args.submits:,} HTTP submits with distinct keys to jobwire serve --no-workers"
          f"{processes} (SQLite), median (min-max) of {args.reps}",
          ["connections", "access log", "submits/s", "server CPU µs per submit"],
          [[r["connections"], "on" if r["access_log"] else "off", fmt(r["submits_per_s"]),
            fmt(r["server_cpu_us"])] for r in rows])
    params = {"submits": args.submits, "connections": args.connections, "reps": args.reps,
              "owners": OWNERS, "processes": args.processes}
    print(f"appended to {record('submits', params, rows)}")


if __name__ == "__main__":
    main()
