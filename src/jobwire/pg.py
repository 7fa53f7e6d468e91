"""Submitting a job in the host application's own PostgreSQL transaction.

    async with conn.transaction():            # the host's psycopg connection
        await conn.execute("INSERT INTO orders …")
        job, created = await jobwire.pg.submit(conn, tasks, "user:42", "ship", {"order": 7})

The job, its `created` event and the notification that wakes workers and live
subscribers exist if and only if the host's transaction commits (PostgreSQL delivers
NOTIFY at commit); dedup and the per-owner cap hold as for `POST /api/jobs`. No jobwire
server need run in this process: it only needs the connection and the task registry.
The owner's advisory lock (the cap's) is held until the host's transaction ends, so one
owner's concurrent host transactions that may create a job take turns, and its other
submits wait for them. The embedded runtime's `submit` is to take `conn=` by delegating here.
"""

from __future__ import annotations

from typing import Any

import psycopg

from jobwire.app import Jobwire, check_submit
from jobwire.model import JSON, Job
from jobwire.settings import Settings
from jobwire.store.base import Placement
from jobwire.store.postgres import submit_in, submit_in_sync

__all__ = ["submit", "submit_sync"]

def _checked(jobwire: Jobwire, owner: str, task: str, input: JSON, key: str | None,
             priority: int | None) -> tuple[JSON, str | None, int, Placement]:
    """What `POST /api/jobs` checks, before anything reaches the host's connection (a
    refused statement would abort the host's transaction): InputError naming the field.
    Returns the input as stored, the dedup key, the task's max_attempts and how the job
    is claimed."""
    check_submit(owner, task, input, key, Settings().max_json_depth, priority=priority)
    spec, value, key, place = jobwire.prepare(task, input, key, owner, priority)
    return value, key, spec.max_attempts, place


async def submit(conn: psycopg.AsyncConnection[Any], jobwire: Jobwire, owner: str, task: str,
                 input: JSON = None, key: str | None = None, *,
                 schema: str | None = None, priority: int | None = None
                 ) -> tuple[Job, bool]:
    """Submit in the transaction open on `conn`: (the job, True), or (the active job of
    this task and key, False). Neither commits nor rolls back. `priority` as for
    `Runtime.submit`.

    `schema`: where jobwire's tables are (None: the connection's current schema), i.e.
    the search_path of jobwire's URL. The cap is `JOBWIRE_MAX_ACTIVE_JOBS`, as on the
    servers. InputError for invalid input, TooManyActive over the cap, StoreError if
    the connection is not in a READ COMMITTED transaction (or jobwire's tables are not
    in the schema); psycopg's own errors as they are."""
    value, key, max_attempts, place = _checked(jobwire, owner, task, input, key, priority)
    return await submit_in(conn, owner, task, value, key, max_attempts,
                           cap=Settings().max_active_jobs, schema=schema, place=place)


def submit_sync(conn: psycopg.Connection[Any], jobwire: Jobwire, owner: str, task: str,
                input: JSON = None, key: str | None = None, *,
                schema: str | None = None, priority: int | None = None) -> tuple[Job, bool]:
    """`submit` on a blocking connection: Django's (`connection.connection` inside
    `transaction.atomic()`), or Flask's."""
    value, key, max_attempts, place = _checked(jobwire, owner, task, input, key, priority)
    return submit_in_sync(conn, owner, task, value, key, max_attempts,
                          cap=Settings().max_active_jobs, schema=schema, place=place)
