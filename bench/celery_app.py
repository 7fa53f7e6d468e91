"""The Celery app of the throughput benchmark: a no-op task that counts itself in Redis
(Celery has no in-process way to learn that a worker process finished N tasks)."""

from __future__ import annotations

import redis
from celery import Celery

from bench.common import REDIS_URL

COUNTER = "bench:celery:done"

app = Celery("bench", broker=REDIS_URL)
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
