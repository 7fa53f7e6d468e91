"""Prints the latest results as Markdown tables (what bench/README.md shows).

Run: .venv/bin/python -m bench.report
"""

from __future__ import annotations

from typing import Any

from bench.charts import latest
from bench.common import fmt, subscribers
from bench.growth import growth_table
from bench.progress import cpu_share


def md(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def throughput(d: dict[str, Any]) -> str:
    rows = [r for r in d["rows"] if "limit" not in r]
    limits = [r for r in d["rows"] if "limit" in r]
    return md(["system", "enqueue, 1 call/job", f"enqueue, batches of {d['params']['batch']}",
               "processed, concurrency 10"],
              [[r["system"], fmt(r.get("enqueue")), fmt(r.get("enqueue_batch")),
                fmt(r.get("processed")) if "error" not in r else r["error"]] for r in rows]
              ) + "\n\n" + md(["limit of this machine", "value"],
                              [[r["system"], fmt(r["limit"])] for r in limits])


def progress(d: dict[str, Any]) -> str:
    return md(["system", "subscribers", "events/s to all", "p50 ms", "p99 ms", "max ms",
               "delivered / expected", "reconnects", "CPU s: server + subscribers / run s"],
              [[r["system"], subscribers(r), fmt(r["events_per_s"]),
                fmt(r["p50_ms"], 1), fmt(r["p99_ms"], 1), fmt(r["max_ms"], 1),
                " ".join(f"{x:,}" for x in r["delivered"])
                + f" / {r['items'] * r['subscribers']:,}",
                " ".join(map(str, r["drops"])), cpu_share(r)]
               for r in d["rows"] if "subscribers" in r])


def dedup(d: dict[str, Any]) -> str:
    return md(["system", "wall ms", "answered created", "jobs that exist"],
              [[r["system"], fmt(r.get("wall_ms"), 1),
                " ".join(map(str, r.get("created", []))) or r.get("note", ""),
                " ".join(map(str, r.get("jobs", []))) or r.get("error", "")]
               for r in d["rows"]])


def submits(d: dict[str, Any]) -> str:
    return md(["connections", "access log", "submits/s", "server CPU µs per submit"],
              [[r["connections"], "on" if r["access_log"] else "off", fmt(r["submits_per_s"]),
                fmt(r["server_cpu_us"])] for r in d["rows"]])


def idle(d: dict[str, Any]) -> str:
    return md(["layout", "held", "RSS before MB", "RSS holding them MB", "delta MB"],
              [[f"{r['sockets']:,} sockets x {r['per_socket']}",
                " ".join(f"{h:,.0f}" for h in r["held"]), fmt(r["rss_before_mb"], 1),
                fmt(r["rss_after_mb"], 1), fmt(r["rss_delta_mb"], 1)] for r in d["rows"]])


def growth(d: dict[str, Any]) -> str:
    return md(*growth_table(d["rows"]))


def main() -> None:
    for name, render in (("throughput", throughput), ("progress", progress),
                         ("dedup", dedup), ("submits", submits), ("idle", idle),
                         ("growth", growth)):
        d = latest(name)
        if d is None:
            continue
        print(f"### {name} ({d['at']}, params {d['params']})\n")
        print(render(d) + "\n")
    d = latest("throughput")
    if d is not None:
        print(f"machine: {d['machine']}")


if __name__ == "__main__":
    main()
