"""Progress to a UI with the peers that can report it, measured the way a UI would follow
it with each (the issue's "closest equivalent"); the job and the subscribers are as in
bench/progress.py: one job reporting N updates, subscribers spread over client processes.

- SAQ (Redis): the task calls `job.update(meta=...)` per update, which stores the job and
  publishes its *status* on the job's channel; each subscriber `queue.listen()`s and
  re-reads the job (`queue.job(key)`) on every message to see the progress.
- Celery (Redis): the task calls `update_state(state="PROGRESS", meta=...)` into the
  result backend; each subscriber polls `AsyncResult(id).info` every POLL seconds.

Neither has per-update events or replay: a subscriber sees the latest state when it
looks, so updates between two looks are never seen ("delivered" counts those seen).
Procrastinate and arq have no progress reporting at all.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.common import (
    PYTHON,
    REDIS_URL,
    ROOT,
    SUBSCRIBER_DEADLINE,
    follow_in_processes,
    redis_flush,
    stop_process,
)

POLL = 0.1  # seconds between a Celery subscriber's looks; tuned in its favour (UIs poll 0.5-2 s)
GATE = "bench:progress:gate"


# -- SAQ on Redis


def _saq_clients(key: str, count: int, out: Any) -> None:
    from saq import Queue
    from saq.job import TERMINAL_STATUSES

    async def main() -> None:
        queue = Queue.from_url(REDIS_URL, name="progress")
        await queue.connect()
        lat: list[float] = []

        async def follow() -> None:
            seen = -1

            async def on_message(job_key: str, status: Any) -> bool:
                nonlocal seen
                job = await queue.job(job_key)
                now = time.time()
                if job is not None and job.meta.get("i", -1) > seen:
                    seen = job.meta["i"]
                    lat.append(now - job.meta["t"])
                return status in TERMINAL_STATUSES

            await queue.listen([key], on_message, timeout=SUBSCRIBER_DEADLINE)

        followers = [asyncio.create_task(follow()) for _ in range(count)]
        await asyncio.sleep(0.5)  # listening: the multiplexer subscribed at connect
        out.put(("ready", time.process_time()))
        await asyncio.gather(*followers, return_exceptions=True)
        out.put(("done", np.asarray(lat, dtype=np.float64).tobytes(), 0, [], time.time(),
                 time.process_time()))
        await queue.disconnect()

    asyncio.run(main())


def saq_redis(items: int, subscribers: int) -> dict[str, Any]:
    from saq import Queue, Worker

    async def main() -> dict[str, Any]:
        queue = Queue.from_url(REDIS_URL, name="progress")
        await queue.connect()
        gate = asyncio.Event()

        async def progress(ctx: Any, *, items: int) -> None:
            await gate.wait()
            for i in range(items):
                await ctx["job"].update(meta={"t": time.time(), "i": i})

        worker = Worker(queue, functions=[("progress", progress)], concurrency=1)
        running = asyncio.create_task(worker.start())
        try:
            job = await queue.enqueue("progress", items=items, timeout=0)
            assert job is not None
            loop = asyncio.get_running_loop()
            return await asyncio.to_thread(
                follow_in_processes, _saq_clients, (job.key,), subscribers,
                lambda: loop.call_soon_threadsafe(gate.set), items)
        finally:
            await worker.stop()
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            await queue.disconnect()

    redis_flush()
    try:
        return asyncio.run(main())
    finally:
        redis_flush()


# -- Celery on Redis


def _celery_clients(task_id: str, count: int, out: Any) -> None:
    from bench.celery_app import app

    lat: list[float] = []
    lock = threading.Lock()
    deadline = time.time() + SUBSCRIBER_DEADLINE

    def poll() -> None:
        result, seen = app.AsyncResult(task_id), -1
        while time.time() < deadline:
            info, state = result.info, result.state
            now = time.time()
            if isinstance(info, dict) and info.get("i", -1) > seen:
                seen = info["i"]
                with lock:
                    lat.append(now - info["t"])
            if state in ("SUCCESS", "FAILURE"):
                return
            time.sleep(POLL)

    pollers = [threading.Thread(target=poll) for _ in range(count)]
    out.put(("ready", time.process_time()))
    for t in pollers:
        t.start()
    for t in pollers:
        t.join()
    out.put(("done", np.asarray(lat, dtype=np.float64).tobytes(), 0, [], time.time(),
                 time.process_time()))


def celery_redis(items: int, subscribers: int) -> dict[str, Any]:
    import redis

    from bench.celery_app import progress

    redis_flush()
    r = redis.Redis.from_url(REDIS_URL)
    worker = subprocess.Popen(
        [PYTHON, "-m", "celery", "-A", "bench.celery_app", "worker", "-Q", "progress",
         "-c", "1", "-P", "prefork", "-l", "WARNING", "--without-gossip",
         "--without-mingle", "--without-heartbeat"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        task = progress.apply_async(args=(items, GATE), queue="progress")
        return follow_in_processes(_celery_clients, (task.id,), subscribers,
                            lambda: r.set(GATE, 1), items)
    finally:
        stop_process(worker, 20)
        redis_flush()


PEERS: dict[str, Callable[[int, int], dict[str, Any]]] = {
    "SAQ (Redis), listen + re-read": saq_redis,
    f"Celery (Redis), polling every {POLL * 1000:.0f} ms": celery_redis,
}
