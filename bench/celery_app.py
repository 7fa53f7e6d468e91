"""The Celery app of the benchmarks: a no-op task that counts itself in Redis (Celery has
no in-process way to learn that a worker process finished N tasks), and a task that
reports progress into the result backend (bench/progress_peers.py)."""

from __future__ import annotations

import time
from typing import Any

import redis
from celery import Celery

from bench.common import REDIS_URL

COUNTER = "bench:celery:done"

# The result backend only serves `progress`: the no-op tasks ignore results.
app = Celery("bench", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(task_ignore_result=True, worker_hijack_root_logger=False,
                broker_connection_retry_on_startup=True, task_default_queue="bench")
_redis: redis.Redis | None = None


@app.task(name="noop")
def noop() -> None:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(REDIS_URL)
    _redis.incr(COUNTER)


@app.task(name="warm")
def warm() -> None:
    noop()


@app.task(name="progress", bind=True, ignore_result=False)
def progress(self: Any, items: int, gate: str) -> dict[str, float]:
    """Waits until `gate` is set in Redis (the subscribers are polling), then reports
    `items` updates, each stamped with the time it was made."""
    r = redis.Redis.from_url(REDIS_URL)
    while not r.get(gate):
        time.sleep(0.01)
    for i in range(items):
        self.update_state(state="PROGRESS", meta={"t": time.time(), "i": i})
    return {"t": time.time(), "i": items}
