"""Event loop lag of a process running sync tasks: how late a 10 ms sleep on the worker's
event loop (the one that serves the API in `jobwire serve`) wakes up, with no sync tasks,
with 10 sync tasks blocked in `time.sleep`, and with 10 CPU-bound pure-Python sync tasks.

Run: .venv/bin/python -m bench.looplag [--seconds S]
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from bench.common import percentile, table, wait_until
from bench.tasks import jobwire

TICK = 0.01
TASKS = 10


async def loop_lag(db: str, task: str | None, seconds: float, tasks: int = TASKS
                   ) -> list[float]:
    """Lateness (s) of each TICK sleep over `seconds`, while `tasks` jobs of sync `task`
    run on an in-process worker (none if `task` is None)."""
    from jobwire.store import open_store
    from jobwire.worker import Worker

    store = open_store(db)
    await store.open()
    worker = Worker(jobwire, store, concurrency=tasks, poll_seconds=0.05)

    async def all_running() -> bool:
        return len(worker.running) == tasks

    async def threads_returned() -> bool:
        return worker._runner.busy == 0

    await worker.start()
    try:
        if task is not None:
            # The tasks outlast the window (they are cancelled after it), so every sample
            # is taken while all of them run.
            jobs = [(await store.submit("bench", task, {"seconds": 600}, None, 1))[0]
                    for _ in range(tasks)]
            await wait_until(all_running, 10)
        lags = []
        end = time.monotonic() + seconds
        while (start := time.monotonic()) < end:
            await asyncio.sleep(TICK)
            lags.append(time.monotonic() - start - TICK)
        if task is not None:
            for job in jobs:
                await store.request_cancel(job.id, "bench")
            await wait_until(threads_returned, 10)
        return lags
    finally:
        await worker.stop()
        await store.close()


def summary(lags: list[float]) -> dict[str, float]:
    """p50, p99 and max lag in milliseconds."""
    ordered = sorted(lags)
    return {"p50": percentile(ordered, 0.5) * 1000, "p99": percentile(ordered, 0.99) * 1000,
            "max": ordered[-1] * 1000}


async def main(seconds: float) -> None:
    rows = []
    for label, task in [("no sync tasks", None), (f"{TASKS} sleeping sync tasks", "snooze"),
                        (f"{TASKS} CPU-bound sync tasks", "spin")]:
        with tempfile.TemporaryDirectory() as tmp:
            s = summary(await loop_lag(f"sqlite:///{Path(tmp) / 'lag.db'}", task, seconds))
        rows.append([label, f"{s['p50']:.1f}", f"{s['p99']:.1f}", f"{s['max']:.1f}"])
    table(f"Event loop lag of a {TICK * 1000:.0f} ms sleep over {seconds:g} s (ms)",
          ["", "p50", "p99", "max"], rows)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=5.0, help="window per row (default 5)")
    asyncio.run(main(p.parse_args().seconds))
