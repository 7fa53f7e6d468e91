"""Draws PNG charts of the latest line of each bench/results/<name>.jsonl (medians as
bars or points, min-max as error bars).

Run: .venv/bin/python -m bench.charts
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from bench.common import RESULTS


def latest(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.jsonl"
    if not path.exists():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else None


def _err(stats: list[dict[str, float] | None]) -> list[list[float]]:
    """Error bars (below, above) from median/min/max."""
    return [[(s["median"] - s["min"]) if s else 0 for s in stats],
            [(s["max"] - s["median"]) if s else 0 for s in stats]]


def _med(stats: list[dict[str, float] | None]) -> list[float]:
    return [s["median"] if s else 0 for s in stats]


def bars(ax: Axes, labels: list[str], series: dict[str, list[dict[str, float] | None]],
         ylabel: str) -> None:
    width = 0.8 / max(1, len(series))
    for i, (name, stats) in enumerate(series.items()):
        xs = [k + (i - (len(series) - 1) / 2) * width for k in range(len(labels))]
        ax.bar(xs, _med(stats), width, yerr=_err(stats), capsize=3, label=name)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def throughput(data: dict[str, Any], ax: Axes) -> None:
    rows = [r for r in data["rows"] if "limit" not in r]
    bars(ax, [r["system"] for r in rows],
         {"enqueue, 1 call/job": [r.get("enqueue") for r in rows],
          "enqueue, batched": [r.get("enqueue_batch") for r in rows],
          "processed (concurrency 10)": [r.get("processed") for r in rows]}, "jobs/s")
    ax.set_title(f"No-op jobs, {data['params']['jobs']:,} per run")


def progress(data: dict[str, Any], ax: Axes) -> None:
    for system in dict.fromkeys(r["system"] for r in data["rows"] if "subscribers" in r):
        rows = [r for r in data["rows"] if r.get("system") == system and "subscribers" in r
                and not r.get("rate")]  # (the paced run is a table row, not a point)
        xs = [r["subscribers"] for r in rows]
        for key, style in (("p50_ms", "o-"), ("p99_ms", "s--")):
            stats = [r[key] for r in rows]
            ax.errorbar(xs, _med(stats), yerr=_err(stats), fmt=style, capsize=3,
                        label=f"{system} {key[:3]}")
    ax.axhline(20, color="red", lw=0.8, ls=":", label="target p99 20 ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("WebSocket subscribers")
    ax.set_ylabel("latency from progress call to receipt, ms")
    ax.set_title(f"{data['params']['items']:,} item updates of one job")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def dedup(data: dict[str, Any], ax: Axes) -> None:
    rows = [r for r in data["rows"] if r.get("wall_ms")]
    bars(ax, [r["system"] for r in rows], {"wall time": [r["wall_ms"] for r in rows]}, "ms")
    ax.axhline(1000, color="red", lw=0.8, ls=":", label="target 1 s")
    ax.set_title(f"{data['params']['submits']:,} concurrent submits of one key")


def idle(data: dict[str, Any], ax: Axes) -> None:
    rows = data["rows"]
    bars(ax, [f"{r['sockets']:,} sockets x {r['per_socket']}" for r in rows],
         {"RSS before": [r["rss_before_mb"] for r in rows],
          "RSS holding them": [r["rss_after_mb"] for r in rows]}, "MB")
    ax.axhline(500, color="red", lw=0.8, ls=":", label="target 500 MB")
    ax.set_title(f"One API server, {data['params']['subscriptions']:,} idle subscriptions")


def growth(data: dict[str, Any], ax: Axes) -> None:
    done = [r for r in data["rows"] if "error" not in r]
    for backend, kind in dict.fromkeys((r["backend"], r["kind"]) for r in done):
        rows = [r for r in done if r["backend"] == backend and r["kind"] == kind]
        xs = [r["jobs"] for r in rows]
        for key in ("submit_p50", "claim_p50"):
            stats = [r[key] for r in rows]
            ax.errorbar(xs, _med(stats), yerr=_err(stats), capsize=3,
                        fmt="o-" if key.startswith("submit") else "s--",
                        label=f"{backend} {kind}: {key}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("jobs in the table (finished, queued or delayed)")
    ax.set_ylabel("ms per call (p50)")
    ax.set_title("Cost growth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)


CHARTS: dict[str, Callable[[dict[str, Any], Axes], None]] = {
    "throughput": throughput, "progress": progress, "dedup": dedup, "idle": idle,
    "growth": growth,
}


def main() -> None:
    for name, draw in CHARTS.items():
        data = latest(name)
        if data is None:
            print(f"{name}: no results yet")
            continue
        fig, ax = plt.subplots(figsize=(10, 5.5))
        draw(data, ax)
        fig.text(0.01, 0.01, f"{data['at']} · {data['machine']['cpu']} · "
                 f"{data['machine']['nproc']} CPUs", fontsize=7, color="gray")
        fig.tight_layout()
        out = Path(RESULTS) / f"{name}.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
