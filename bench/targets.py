"""The speed targets of issue 15, each met or not, from the latest result of each benchmark
(bench/results/*.jsonl), with the figures that decide it and the profile beside them: where
a target is not met, the profile says what limits it. `make bench` prints this last.

Run: .venv/bin/python -m bench.targets
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from bench.charts import latest
from bench.common import table

Row = list[str]
FLAT = 2.0  # a curve is flat while its value at the largest table is within this of the smallest


def _median(row: dict[str, Any] | None, key: str) -> float | None:
    value = (row or {}).get(key)
    return value["median"] if isinstance(value, dict) else None


def _row(d: dict[str, Any] | None, **match: Any) -> dict[str, Any] | None:
    for r in (d or {}).get("rows", []):
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else "met" if ok else "NOT met"


def _cpu(row: dict[str, Any] | None, phase: str) -> str:
    parts = [_median(row, f"{phase} CPU µs/job, {p}") for p in ("all", "loop", "other threads")]
    if parts[0] is None:
        return ""
    server = _median(row, f"{phase} CPU µs/job, database server")
    if server is None:  # SQLite: the store's thread is the database
        return (f"; CPU {parts[0]:,.0f} µs/job: {parts[1]:,.0f} on the event loop, "
                f"{parts[2]:,.0f} on the store's thread and the WAL copier")
    return (f"; CPU µs/job: {parts[0]:,.0f} in the worker's process, {server:,.0f} in the "
            "database server")


def processed(backend: str, limit: str, factor: float, label: str) -> Callable[[], Row]:
    def check() -> Row:
        d = latest("throughput")
        row = _row(d, system=f"jobwire ({backend}, store API)")
        rate, raw = _median(row, "processed"), _median(_row(d, system=limit), "limit")
        if rate is None or raw is None:
            return [label, _verdict(None), "run bench.throughput"]
        per_tx = _median(_row(d, system=f"{limit.split(' tps')[0]}: database server CPU "
                                          "µs per transaction"), "limit")
        beside = "" if per_tx is None else f" (pgbench: {per_tx:,.0f} per transaction)"
        return [label, _verdict(rate >= factor * raw),
                f"{rate:,.0f} jobs/s = {rate / raw:.2f}x {raw:,.0f} ({d and d['at']})"
                + _cpu(row, "processed") + beside]
    return check


def enqueue() -> Row:
    label = "2. enqueue ≥ 2x SAQ (Redis), 1 awaited call/job, SQLite store API"
    d = latest("throughput")
    row = _row(d, system="jobwire (SQLite, store API)")
    ours, saq = _median(row, "enqueue"), _median(_row(d, system="SAQ (Redis)"), "enqueue")
    if ours is None or saq is None:
        return [label, _verdict(None), "run bench.throughput"]
    return [label, _verdict(ours >= 2 * saq),
            f"{ours:,.0f}/s = {ours / saq:.2f}x SAQ's {saq:,.0f}/s ({d and d['at']})"
            + _cpu(row, "enqueue")]


def http_submits() -> Row:
    label = "2. submits over HTTP ≥ 5,000/s (10 connections, access log off)"
    d = latest("submits")
    rows = [r for r in (d or {}).get("rows", []) if not r["access_log"]]
    best = max(rows, key=lambda r: r["connections"], default=None)
    rate = _median(best, "submits_per_s")
    if best is None or rate is None:
        return [label, _verdict(None), "run bench.submits"]
    saq = _median(_row(latest("throughput"), system="SAQ (Redis)"), "enqueue")
    beside = "" if saq is None else f"; SAQ (Redis) enqueues {saq:,.0f}/s in process"
    return [label, _verdict(rate >= 5000),
            f"{rate:,.0f}/s over {best['connections']} connections, "
            f"{_median(best, 'server_cpu_us'):,.0f} µs of server CPU per submit "
            f"({d and d['at']}){beside}"]


def fan_out() -> list[Row]:
    d = latest("progress")
    out = []
    for backend, rate in itertools.product(("SQLite", "PostgreSQL"), (None, "paced")):
        pace = "as fast as the task can" if rate is None else "the task paced"
        label = f"4. fan-out p99 < 20 ms, 1,000 subscribers, all delivered ({backend}, {pace})"
        row = next((r for r in (d or {}).get("rows", []) if r.get("system") ==
                    f"jobwire ({backend})" and r.get("subscribers") == 1000
                    and bool(r.get("rate")) == bool(rate)), None)
        p99 = _median(row, "p99_ms")
        if row is None or p99 is None:
            out.append([label, _verdict(None), "run bench.progress"])
            continue
        delivered = min(row["delivered"])
        cpu = ""
        if row.get("server_cpu_s"):
            cpu = (f"; CPU s over the {_median(row, 'window_s'):.0f} s run: server "
                   f"{_median(row, 'server_cpu_s'):.0f}, subscriber processes "
                   f"{_median(row, 'subscriber_cpu_s'):.0f}")
        out.append([label, _verdict(p99 < 20 and row["complete"]),
                    f"p99 {p99:,.1f} ms, {delivered:,} of {row['items'] * 1000:,} delivered, "
                    f"{_median(row, 'events_per_s'):,.0f} events/s to all "
                    f"({d and d['at']}){cpu}"])
    return out


def idle() -> Row:
    label = "4. 10,000 idle subscribers < 500 MB"
    d = latest("idle")
    row = _row(d, sockets=10_000)
    rss = _median(row, "rss_after_mb")
    if rss is None:
        return [label, _verdict(None), "run bench.idle"]
    return [label, _verdict(rss < 500), f"{rss:,.0f} MB RSS, 10,000 sockets x 1 ({d and d['at']})"]


def growth() -> list[Row]:
    d = latest("growth")
    out = []
    for backend, q in itertools.product(("SQLite", "PostgreSQL"), ("p50", "p99")):
        label = (f"5. submit and claim {q} flat from 10³ to 10⁶ jobs done, queued or delayed "
                 f"({backend})")
        rows = [r for r in (d or {}).get("rows", []) if r.get("backend") == backend
                and "error" not in r]
        if not rows:
            out.append([label, _verdict(None), "run bench.growth"])
            continue
        worst, notes = 1.0, []
        for kind in dict.fromkeys(r["kind"] for r in rows):
            sized = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["jobs"])
            small, large = sized[0], sized[-1]
            for op in ("submit", "claim"):
                a, b = _median(small, f"{op}_{q}"), _median(large, f"{op}_{q}")
                if a and b:
                    worst = max(worst, b / a)
                    notes.append(f"{kind} {op} {a:.2f}→{b:.2f}")
        out.append([label, _verdict(worst <= FLAT),
                    f"ms at {min(r['jobs'] for r in rows):,}→{max(r['jobs'] for r in rows):,}"
                    ": " + ", ".join(notes) + f" (worst x{worst:.1f}; flat: ≤ x{FLAT:g}; "
                    f"{d and d['at']})"])
    return out


def main() -> None:
    rows = [
        processed("SQLite", "SQLite single-insert commits/s", 0.3,
                  "1. SQLite processed ≥ 0.3x raw single-insert commits/s")(),
        enqueue(),
        http_submits(),
        processed("PostgreSQL", "pgbench -N tps (10 clients)", 1.0,
                  "3. PostgreSQL processed ≥ pgbench -N tps")(),
        *fan_out(),
        idle(),
        *growth(),
    ]
    table("Issue 15's targets, from the latest result of each benchmark",
          ["target", "verdict", "figures (when measured) and where the CPU went"], rows,
          left=3)


if __name__ == "__main__":
    main()
