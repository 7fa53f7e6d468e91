"""The distributed store: one PostgreSQL database shared by any number of API servers
and worker processes, with events fanned out to every process by LISTEN/NOTIFY.

The hot writes (submit, claim, finish) are each ONE statement that changes the rows,
writes their events and notifies them: one round trip. Finishes that arrive together
share that statement (group commit). Other writes are one transaction on a pooled
connection in pipeline mode, so statements whose results are not needed go out
together (two round trips).
Every job write locks the job row first (a guarded UPDATE, or SELECT … FOR NO KEY
UPDATE), and item rows are only written under that lock, so counts and items agree.
Claims, lease expiry and pruning skip rows another transaction holds, so many workers
never wait on each other. Statements that wait for several job rows (claiming a guest
session, heartbeats, the batched finishes) lock them in id order first, so no two can
wait on each other in a cycle (a deadlock, which PostgreSQL would break by aborting
one); items need no order, as only the holder of their job's row ever locks them.
Events are inserted and NOTIFYed in one statement at the end of the transaction;
PostgreSQL delivers the notifications at commit (to pg_listen).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import select
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from typing import Any, TypeVar

import orjson
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow, tuple_row
from psycopg.types.json import Json, set_json_loads
from psycopg_pool import AsyncConnectionPool

from jobwire.cron import tick_key
from jobwire.model import (
    JSON,
    Event,
    EventType,
    Item,
    ItemStatus,
    Job,
    Status,
    check_item_transition,
    check_job_transition,
    counts_delta,
    iso,
    item_sources,
    now,
)
from jobwire.settings import Settings
from jobwire.store.base import (
    DEFAULT_PLACEMENT,
    UNKNOWN_SEQ,
    End,
    Hint,
    ItemUpdate,
    JobActive,
    Lease,
    LeaseLost,
    OwnerChanges,
    OwnerConflict,
    OwnerHint,
    Placement,
    StoreError,
    TooManyActive,
    UnknownItem,
    Written,
)
from jobwire.store.batch import Batcher
from jobwire.store.pg_listen import HOST_ORIGIN, Listener, channel_of, note_sql
from jobwire.store.pg_schema import ACTIVE_SQL, TERMINAL_SQL, migrate
from jobwire.store.rows import (
    CLAIM_ORDER,
    HANDED_BACK,
    JOB_COLUMNS,
    PROMOTE_BATCH,
    active_job_sql,
    check_end,
    claims,
    clash_error,
    dumps,
    encoded_end,
    event_data,
    event_data_sql,
    expiry_event,
    expiry_outcome,
    fire_tick_sql,
    guest_clashes_sql,
    item_change,
    item_from_row,
    job_from_row,
    lease_expired_error,
    lease_lost,
    make_event,
    retrying_data,
)

log = logging.getLogger("jobwire.store.postgres")

T = TypeVar("T")
Conn = psycopg.AsyncConnection[TupleRow]
Steps = Callable[[Conn], Awaitable[tuple[T, list[Event]]]]

POOL_SIZE = 10
CONNECT_TIMEOUT = 10.0

# Leases are set and compared on the database clock, so hosts with skewed clocks
# never expire each other's leases early.
_DB_NOW = "extract(epoch FROM clock_timestamp())::float8"
_LEASE = "status = 'running' AND worker = %s AND attempt = %s"
# Times to wait until are kept to the millisecond, so that this statement's rendering
# of one (`_iso`) and Python's (`model.iso`, the snapshot's) agree to the character.
_DUE = "round(({})::numeric, 3)::float8"


def _iso(expr: str) -> str:
    """An epoch-seconds expression as `model.iso` renders it, for event data made in SQL."""
    return (f"to_char(to_timestamp({expr}) AT TIME ZONE 'UTC', "
            "'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')")


# Waiting jobs whose run_at has come join the claimable ones (the index of the fairness
# order); found through their own index, only those that are due. now() (the statement's
# start, in autocommit), not clock_timestamp(): a volatile bound is no index condition,
# and the scan would filter every waiting job.
_PROMOTE = (
    "UPDATE jobs SET waiting = false WHERE id IN (SELECT id FROM jobs "
    "WHERE status = 'queued' AND waiting AND run_at <= extract(epoch FROM now()) "
    "ORDER BY run_at LIMIT %s FOR UPDATE SKIP LOCKED)")
# The jobs that the rows of `leases` (job, worker, attempt) still hold, locked in id
# order like every statement that waits for several job rows (see the module's doc).
_HELD_SQL = ("SELECT jobs.id FROM jobs JOIN leases ON jobs.id = leases.job "
             "AND jobs.status = 'running' AND jobs.worker = leases.worker "
             "AND jobs.attempt = leases.attempt ORDER BY jobs.id FOR NO KEY UPDATE OF jobs")

# Serialises one owner's submits that may create a job: those whose key has no active job
# (joining one is never refused, so a dedup storm's joiners need not take turns). It notes
# in a transaction-local setting that it took the lock, for the submit statement to check.
# The first key ("jo") keeps these apart from other advisory locks (the migrations' is
# "jw"); owners whose names hash alike merely take turns. `{jobs}` is the table's name as
# _submit_sqls qualifies it.
_OWNER_LOCKED = "current_setting('jobwire.owner_locked', true) = 'on'"
_LOCK_OWNER = (
    f"SELECT pg_advisory_xact_lock({0x6A6F}, hashtext(%s)), "
    "set_config('jobwire.owner_locked', 'on', true) WHERE NOT EXISTS (SELECT FROM {jobs} "
    f"WHERE owner = %s AND task = %s AND key = %s AND status IN {ACTIVE_SQL})")
# What a submit on a host application's connection checks first (see submit_in): the
# isolation level, the schema of jobwire's tables, and that they are there.
_HOST_SQL = ("SELECT current_setting('transaction_isolation'), name, "
             "to_regclass(format('%%I.jobs', name)) IS NOT NULL "
             "FROM (SELECT coalesce(%s, current_schema()) AS name) AS jobwire_schema")

_WRITE_EVENTS = (
    "WITH written AS (INSERT INTO events (job_id, seq, type, data, at) "
    "SELECT * FROM unnest(%s::text[], %s::int[], %s::text[], %s::json[], %s::float8[])) "
    "SELECT count(pg_notify(%s, note)) FROM unnest(%s::text[]) AS note"
)


def _with_events(origin: str, changed: str, type: str, data: str, columns: str,
                 events: str = "events") -> str:
    """The end of a one-statement write whose CTE `changed` returned the job rows it
    changed (at least id, seq, status, updated_at): writes one event per row, of `type`
    (an event type, or "status" for the job's new status) with `data`, into the table
    `events`, and notifies it tagged with `origin`. Selects `columns`, the notification,
    and the event's data."""
    type_sql = type if type == "status" else f"'{type}'"
    note = note_sql(origin, "id", "seq", type_sql, "data", "updated_at")
    return (f"evented AS (SELECT {changed}.*, {data} AS data FROM {changed}), "
            f"written AS (INSERT INTO {events} (job_id, seq, type, data, at) "
            f"SELECT id, seq, {type_sql}, data, updated_at FROM evented) "
            f"SELECT {columns}, pg_notify(%s, {note}), data FROM evented")


@functools.cache
def _submit_sqls(origin: str, schema: str | None) -> tuple[str, str]:
    """The owner's lock and the submit statement, for jobwire's tables in `schema` (None:
    as the search_path finds them), notifying events tagged with `origin`.

    The submit returns the active job of (owner, task, key) with a NULL event, if there
    is one; else, only under the owner's lock: if the owner has fewer than the cap of
    active jobs, inserts a job ranked by their number, writing and notifying its
    `created` event, and returns it with the event's data; else one row of NULLs
    (refused)."""
    prefix = "" if schema is None else '"{}".'.format(schema.replace('"', '""'))
    jobs = prefix + "jobs"
    data = event_data_sql("'queued'", "0", "0", "0", task="task", key="key",
                          run_at=_iso("run_at"))
    refused = ", ".join(["NULL"] * (JOB_COLUMNS.count(",") + 3))
    return _LOCK_OWNER.replace("{jobs}", jobs), (
        f"WITH existing AS (SELECT {JOB_COLUMNS} FROM {jobs} WHERE owner = %s "
        f"AND task = %s AND key = %s AND status IN {ACTIVE_SQL}), "
        # Counted through the partial index of active jobs, and never past the cap.
        f"active AS (SELECT count(*) AS n FROM (SELECT FROM {jobs} WHERE owner = %s "
        f"AND status IN {ACTIVE_SQL} LIMIT %s) AS counted), "
        # A given run_at, or the delay from the database's clock, or none.
        "due AS (SELECT "
        + _DUE.format(f"coalesce(%s::float8, {_DB_NOW} + %s::float8)") + " AS due), "
        f"new AS (INSERT INTO {jobs} (id, task, key, owner, status, input, max_attempts, "
        "seq, rank, created_at, updated_at, run_at, waiting, priority, queue, limit_key, "
        "limit_max) SELECT %s, %s, %s, %s, 'queued', %s, %s, 1, n, %s, %s, due, "
        "due IS NOT NULL, %s, %s, %s, %s FROM active, due "
        "WHERE n < %s AND NOT EXISTS (SELECT FROM existing) "
        f"AND {_OWNER_LOCKED} "
        "ON CONFLICT (owner, task, key) WHERE key IS NOT NULL "
        f"AND status IN {ACTIVE_SQL} DO NOTHING RETURNING {JOB_COLUMNS}), "
        f"{_with_events(origin, 'new', 'created', data, JOB_COLUMNS, prefix + 'events')} "
        f"UNION ALL SELECT {JOB_COLUMNS}, NULL, NULL FROM existing "
        f"UNION ALL SELECT {refused} FROM active "
        f"WHERE n >= %s AND NOT EXISTS (SELECT FROM existing) AND {_OWNER_LOCKED}")


@dataclasses.dataclass(frozen=True, slots=True)
class _Submission:
    """One submit, on any connection: its statements (the owner's lock, then the submit;
    see _submit_sqls) and what the submit's rows mean."""

    sqls: tuple[str, str]
    channel: str
    owner: str
    task: str
    input: JSON
    key: str | None
    max_attempts: int
    cap: int
    delay: float = 0.0  # seconds from the database's clock; or
    run_at: float | None = None  # epoch seconds
    place: Placement = DEFAULT_PLACEMENT

    def statements(self, at: float) -> tuple[tuple[str, tuple[Any, ...]], ...]:
        owner, task, key, cap = self.owner, self.task, self.key, self.cap
        lock, submit = self.sqls
        return ((lock, (owner, owner, task, key)),
                (submit, (owner, task, key, owner, cap,
                          self.run_at, self.delay if self.delay > 0 else None,
                          uuid.uuid4().hex, task, key, owner,
                          Json(self.input, dumps), self.max_attempts, at, at,
                          *dataclasses.astuple(self.place), cap, self.channel, cap)))

    def outcome(self, rows: list[TupleRow], at: float) -> tuple[Job, Event | None] | None:
        """(the job, its `created` event if this submit made it); TooManyActive if
        refused; None if the round settled nothing and must run again: the key's active
        job, seen before the lock was skipped, ended before the submit statement; or the
        insert met an active job of the key that the statement's snapshot cannot see
        (moved to this owner by a session claim, which does not take the owner's lock).
        The next round sees how things are then."""
        if not rows:
            return None
        if rows[0][0] is None:
            raise TooManyActive(self.cap)
        job = job_from_row(rows[0], decode=False)
        data = rows[0][-1]
        return job, None if data is None else Event(
            job=job.id, seq=1, type=EventType.CREATED.value, data=data, at=at)


def _one_item_change(new: ItemStatus) -> tuple[list[str], tuple[int, int]] | None:
    """The states an item may reach `new` from, and the (done, failed) change that makes,
    when every such state makes the same change (so one statement can apply it)."""
    sources = item_sources(new)
    deltas = {counts_delta(ItemStatus(old), new) for old in sources}
    return (sources, deltas.pop()) if len(deltas) == 1 else None


_ONE_ITEM = {new: _one_item_change(new) for new in ItemStatus}


@dataclasses.dataclass(frozen=True, slots=True)
class _Finish:
    lease: Lease
    status: Status
    result: JSON
    encoded: str  # the result as JSON text
    error: str | None


# PostgreSQL text cannot hold NUL: error texts (from arbitrary exceptions) get it
# replaced, and an id containing it names no job rather than failing the lookup.
def _text(value: str | None) -> str | None:
    return None if value is None else value.replace("\x00", "\ufffd")


def _storable(text: str) -> bool:
    return "\x00" not in text


async def _reset_running(conn: Conn, job_id: str) -> list[str]:
    """Items a stopped attempt left running never finished: they go back to pending."""
    cur = await conn.execute("UPDATE items SET status = 'pending' WHERE job_id = %s "
                             "AND status = 'running' RETURNING ref", (job_id,))
    return [r[0] for r in await cur.fetchall()]


async def _configure(conn: Conn) -> None:
    set_json_loads(orjson.loads, conn)


async def _check(conn: Conn) -> None:
    """Checks a connection taken from the pool. An idle connection has nothing to read
    unless the server dropped it (restart, pg_terminate_backend: its goodbye or EOF is
    waiting), so only then is it worth the round trip that finds out."""
    if conn.closed or select.select([conn.fileno()], [], [], 0)[0]:
        await AsyncConnectionPool.check_connection(conn)


class PostgresStore:
    """The distributed backend (`postgresql://user@host:port/db?options=-csearch_path=…`)."""

    def __init__(self, url: str, max_active_jobs: int | None = None) -> None:
        self.url = url
        self.max_active_jobs = (Settings().max_active_jobs if max_active_jobs is None
                                else max_active_jobs)
        self._pool: AsyncConnectionPool[Conn] | None = None
        self._hints: list[Hint] = []
        self._owner_hints: list[OwnerHint] = []
        self._listener: Listener | None = None
        name = conninfo_to_dict(url).get("application_name")
        self._app_name = str(name) if name else "jobwire"
        self._finishes = Batcher(self._finish_many)

    # -- plumbing

    @property
    def pool(self) -> AsyncConnectionPool[Conn]:
        assert self._pool is not None, "store is not open"
        return self._pool

    @property
    def listener(self) -> Listener:
        assert self._listener is not None, "store is not open"
        return self._listener

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Conn]:
        try:
            async with self.pool.connection() as conn:
                try:
                    yield conn
                except Exception:
                    raise
                except BaseException:
                    # Cancelled mid round trip (a task stopped for a lost lease, a client
                    # gone): results may still be on their way, and a pipeline may have
                    # sent a BEGIN whose transaction the pool cannot see. The next user
                    # would read them as its own answers, so the connection goes.
                    await conn.close()
                    raise
        except psycopg.Error as exc:  # unreachable, refused or rejected: a clear error
            raise StoreError(f"database error: {exc}") from exc

    async def _query(self, query: str, params: Sequence[Any] = ()) -> list[TupleRow]:
        """One statement in its own (autocommit) transaction."""
        async with self._connection() as conn:
            cur = await conn.execute(query, params)
            return await cur.fetchall() if cur.description else []

    async def _execute(self, query: str, params: Sequence[Any] = ()) -> int:
        async with self._connection() as conn:
            cur = await conn.execute(query, params)
            return cur.rowcount

    async def _transact(self, steps: Steps[T]) -> T:
        """Run steps(conn) -> (value, events) in one transaction, writing and notifying
        the events last; hand them to local listeners after commit."""
        events: list[Event] = []
        try:
            async with self._connection() as conn, conn.pipeline(), conn.transaction():
                value, events = await steps(conn)
                if events:
                    await conn.execute(_WRITE_EVENTS, (
                        [e.job for e in events], [e.seq for e in events],
                        [e.type for e in events], [Json(e.data, dumps) for e in events],
                        [e.at for e in events],
                        self.listener.channel, [self.listener.note(e) for e in events]))
        except BaseException:
            # The commit may have landed before the failure, and our own listener skips
            # our notifications: hint without the event, so listeners read the store.
            for ev in events:
                self._call_hints(ev.job, ev.seq, None)
            raise
        self._publish(events)
        return value

    def _publish(self, events: Sequence[Event]) -> None:
        for ev in events:
            self._call_hints(ev.job, ev.seq, ev)

    def _call_hints(self, job: str, seq: int, ev: Event | None) -> None:
        for hint in self._hints:
            try:
                hint(job, seq, ev)
            except Exception:  # one broken listener must not stop delivery to the others
                log.exception("event listener failed")

    def listen(self, hint: Hint) -> None:
        self._hints.append(hint)

    def listen_owners(self, hint: OwnerHint) -> None:
        self._owner_hints.append(hint)

    def _owners_changed(self, owner: str | None) -> None:
        for hint in self._owner_hints:
            try:
                hint(owner)
            except Exception:  # as in _call_hints
                log.exception("owner listener failed")

    # -- lifecycle

    async def open(self) -> None:
        try:
            async with await psycopg.AsyncConnection.connect(
                    self.url, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT),
                    application_name=self._app_name) as conn:
                await migrate(conn)
                cur = await conn.execute("SELECT current_schema()")
                row = await cur.fetchone()
        except psycopg.Error as exc:
            raise StoreError(f"cannot open the database: {exc}") from exc
        self._pool = AsyncConnectionPool(
            self.url, min_size=1, max_size=POOL_SIZE, open=False, configure=_configure,
            kwargs={"autocommit": True, "application_name": self._app_name},
            # A pooled connection the server dropped (restart, pg_terminate_backend) is
            # replaced when taken rather than failing the next request with it.
            check=_check, name="jobwire")
        try:
            await self._pool.open(wait=True, timeout=CONNECT_TIMEOUT)
        except psycopg.OperationalError as exc:
            await self._pool.close()
            self._pool = None
            raise StoreError(f"cannot open the database: {exc}") from exc
        self._listener = Listener(
            make_conninfo(self.url, application_name=f"{self._app_name}/listen"[:63],
                          connect_timeout=int(CONNECT_TIMEOUT)),
            channel_of(str(row[0]) if row else "public"), self._call_hints, self._resync,
            self._owners_changed)
        try:
            await self._listener.start()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.stop()
            self._listener = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    # -- cross-process events

    async def _resync(self, since: float) -> None:
        """After the listener reconnects: hint every job that may have changed meanwhile."""
        rows = await self._query(
            f"SELECT id, seq FROM jobs WHERE status IN {ACTIVE_SQL} OR finished_at >= %s",
            (since,))
        for job, seq in rows:
            self._call_hints(job, seq, None)
        self._owners_changed(None)  # deletions leave no row to find: every owner re-reads

    # -- shared transaction steps

    @staticmethod
    async def _fenced(conn: Conn, lease: Lease, assignments: str = "",
                      params: Sequence[Any] = ()) -> tuple[int, str, int, int, int, bool]:
        """Bump the seq of a job the lease still holds, applying extra assignments.
        Returns (seq, status, total, done, failed, cancel_requested)."""
        cur = await conn.execute(
            f"UPDATE jobs SET seq = seq + 1, updated_at = %s{assignments} "
            f"WHERE id = %s AND {_LEASE} "
            "RETURNING seq, status, total, done, failed, cancel_requested",
            (now(), *params, lease.job, lease.worker, lease.attempt))
        row = await cur.fetchone()
        if row is None:
            raise lease_lost(lease)
        return row[0], row[1], row[2], row[3], row[4], row[5]

    @staticmethod
    async def _hold(conn: Conn, lease: Lease, items_query: str, items_params: Sequence[Any]
                    ) -> tuple[tuple[int, str, int, int, int, bool], list[TupleRow]]:
        """Lock a job the lease still holds and read its items under the lock, in one
        round trip. Returns ((seq, status, total, done, failed, cancel_requested), items)."""
        job_cur = await conn.execute(
            "SELECT seq, status, total, done, failed, cancel_requested FROM jobs "
            f"WHERE id = %s AND {_LEASE} FOR NO KEY UPDATE",
            (lease.job, lease.worker, lease.attempt))
        items_cur = await conn.execute(items_query, items_params)
        row = await job_cur.fetchone()
        items = await items_cur.fetchall()
        if row is None:
            raise lease_lost(lease)
        return (row[0], row[1], row[2], row[3], row[4], row[5]), items

    @staticmethod
    async def _find(conn: Conn, job_id: str, owner: str | None, lock: bool = False
                    ) -> Job | None:
        if not _storable(job_id):
            return None
        query = f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = %s"
        params: tuple[str, ...] = (job_id,)
        if owner is not None:
            query, params = query + " AND owner = %s", (job_id, owner)
        if lock:
            query += " FOR NO KEY UPDATE"
        cur = await conn.execute(query, params)
        row = await cur.fetchone()
        return None if row is None else job_from_row(row, decode=False)

    # -- sessions

    async def add_session(self, token_hash: str, owner: str, expires_at: float | None) -> None:
        await self._execute("INSERT INTO sessions VALUES (%s, %s, %s, %s)",
                            (token_hash, owner, now(), expires_at))

    async def session_owner(self, token_hash: str) -> str | None:
        rows = await self._query(
            "SELECT owner FROM sessions WHERE token_hash = %s "
            "AND (expires_at IS NULL OR expires_at > %s)", (token_hash, now()))
        return str(rows[0][0]) if rows else None

    async def live_sessions(self, token_hashes: Collection[str]) -> set[str]:
        rows = await self._query(
            "SELECT token_hash FROM sessions WHERE token_hash = ANY(%s) "
            "AND (expires_at IS NULL OR expires_at > %s)", (list(token_hashes), now()))
        return {str(r[0]) for r in rows}

    async def sessions_of(self, owner: str) -> list[tuple[str, float, float | None]]:
        rows = await self._query(
            "SELECT token_hash, created_at, expires_at FROM sessions WHERE owner = %s "
            "ORDER BY created_at, token_hash", (owner,))
        return [(str(r[0]), float(r[1]), r[2]) for r in rows]

    async def revoke_sessions(self, owner: str) -> int:
        return await self._execute("DELETE FROM sessions WHERE owner = %s", (owner,))

    async def add_ticket(self, ticket_hash: str, token_hash: str, expires_at: float) -> None:
        async def add(conn: Conn) -> tuple[None, list[Event]]:
            await conn.execute("DELETE FROM tickets WHERE expires_at <= %s", (now(),))
            await conn.execute("INSERT INTO tickets VALUES (%s, %s, %s)",
                               (ticket_hash, token_hash, expires_at))
            return None, []
        await self._transact(add)

    async def use_ticket(self, ticket_hash: str) -> tuple[str, str] | None:
        at = now()
        rows = await self._query(
            "WITH used AS (DELETE FROM tickets WHERE ticket_hash = %s AND expires_at > %s "
            "RETURNING token_hash) SELECT s.owner, s.token_hash FROM used JOIN sessions s "
            "USING (token_hash) WHERE s.expires_at IS NULL OR s.expires_at > %s",
            (ticket_hash, at, at))
        return (str(rows[0][0]), str(rows[0][1])) if rows else None

    async def claim_session(self, token_hash: str, owner: str) -> int | None:
        async def claim(conn: Conn) -> tuple[int | None, list[Event]]:
            cur = await conn.execute(
                "SELECT owner FROM sessions WHERE token_hash = %s "
                "AND (expires_at IS NULL OR expires_at > %s) FOR UPDATE", (token_hash, now()))
            row = await cur.fetchone()
            if row is None or not str(row[0]).startswith("guest:"):
                return None, []
            guest = str(row[0])
            cur = await conn.execute(guest_clashes_sql("%s"), (owner, guest))
            clashes = [r[0] for r in await cur.fetchall()]
            if clashes:
                raise OwnerConflict(clash_error(clashes))
            cur = await conn.execute(
                "WITH moving AS (SELECT id FROM jobs WHERE owner = %s ORDER BY id "
                "FOR NO KEY UPDATE) UPDATE jobs SET owner = %s FROM moving "
                "WHERE jobs.id = moving.id RETURNING jobs.id", (guest, owner))
            moved = len(await cur.fetchall())  # rowcount is not known yet in pipeline mode
            await conn.execute("DELETE FROM sessions WHERE owner = %s", (guest,))
            return moved, []

        return await self._transact(claim)

    # -- the API's side

    async def submit(self, owner: str, task: str, input: JSON, key: str | None,
                     max_attempts: int, delay: float = 0.0, run_at: float | None = None,
                     place: Placement = DEFAULT_PLACEMENT) -> tuple[Job, bool]:
        sub = _Submission(_submit_sqls(self.listener.origin, None), self.listener.channel,
                          owner, task, input, key, max_attempts, self.max_active_jobs,
                          delay, run_at, place)
        while True:
            at = now()
            lock, submit = sub.statements(at)
            async with self._connection() as conn:
                # One owner's submits that may create a job take turns on a lock held to
                # commit (other owners' run in parallel), so the count the submit statement
                # makes, in a snapshot taken after the lock, is exact: the cap holds across
                # any number of processes. Pipelined, with no BEGIN/COMMIT: the statements
                # before a pipeline's Sync (sent at its end) are one implicit transaction,
                # committed by the Sync, or rolled back if one fails. One round trip, and
                # a third less client CPU than psycopg's transaction() in a pipeline.
                async with conn.pipeline():
                    await conn.execute(*lock)
                    cur = await conn.execute(*submit)
                rows = await cur.fetchall()
            if (outcome := sub.outcome(rows, at)) is not None:
                job, created = outcome
                if created is not None:
                    self._publish([created])
                return job, created is not None

    async def submit_tick(self, owner: str, task: str, input: JSON, max_attempts: int,
                          tick: float, catch_up: bool = False,
                          place: Placement = DEFAULT_PLACEMENT) -> tuple[Job, bool] | None:
        # The compare-and-set locks the periodic's row to commit: processes firing the
        # same or a later tick wait, and then see this tick recorded and its job active.
        async def fire(conn: Conn) -> tuple[tuple[Job, bool] | None, list[Event]]:
            cur = await conn.execute(fire_tick_sql("%s", catch_up), (task, tick))
            if await cur.fetchone() is None:
                return None, []
            cur = await conn.execute(active_job_sql("%s"), (owner, task))
            if (row := await cur.fetchone()) is not None:
                return (job_from_row(row, decode=False), False), []
            at, key = now(), tick_key(tick)
            cur = await conn.execute(
                "INSERT INTO jobs (id, task, key, owner, status, input, max_attempts, seq, "
                "rank, created_at, updated_at, priority, queue, limit_key, limit_max) "
                "VALUES (%s, %s, %s, %s, 'queued', %s, %s, 1, 0, %s, %s, %s, %s, %s, %s) "
                f"RETURNING {JOB_COLUMNS}",  # rank 0: the periodic's only job
                (uuid.uuid4().hex, task, key, owner, Json(input, dumps), max_attempts, at, at,
                 *dataclasses.astuple(place)))
            row = await cur.fetchone()
            assert row is not None  # INSERT … RETURNING: the row it inserted
            job = job_from_row(row, decode=False)
            data = event_data(Status.QUEUED, 0, 0, 0, task=task, key=key, run_at=None)
            return (job, True), [make_event(job.id, 1, EventType.CREATED, data, at)]

        return await self._transact(fire)

    async def get_job(self, job_id: str, owner: str | None = None) -> Job | None:
        async with self._connection() as conn:
            return await self._find(conn, job_id, owner)

    async def list_jobs(self, owner: str | None, statuses: Collection[Status] | None,
                        limit: int, id_prefix: str | None = None, *, task: str | None = None,
                        since: float | None = None, until: float | None = None,
                        before: tuple[float, str] | None = None) -> list[Job]:
        query = f"SELECT {JOB_COLUMNS} FROM jobs WHERE true"
        params: list[Any] = []
        if owner is not None:  # (not `owner = coalesce(%s, owner)`: that skips the index)
            query += " AND owner = %s"
            params.append(owner)
        if id_prefix is not None:  # starts_with, not LIKE: no wildcards, case-sensitive
            query += " AND starts_with(id, %s)"
            params.append(id_prefix)
        if statuses is not None:
            query += " AND status = ANY(%s)"
            params.append([s.value for s in statuses])
        for clause, value in (("task = %s", task), ("created_at >= %s", since),
                              ("created_at < %s", until)):
            if value is not None:
                query += f" AND {clause}"
                params.append(value)
        if before is not None:  # a row comparison: one range scan of the index
            query += " AND (created_at, id) < (%s, %s)"
            params += before
        rows = await self._query(query + " ORDER BY created_at DESC, id DESC LIMIT %s",
                                 (*params, limit))
        return [job_from_row(r, decode=False) for r in rows]

    async def job_with_items(self, job_id: str, owner: str | None = None
                             ) -> tuple[Job, list[Item]] | None:
        if not _storable(job_id):
            return None
        # One statement is one snapshot: the items agree with the job row's seq.
        query = (
            f"SELECT {JOB_COLUMNS}, (SELECT coalesce(json_agg(json_build_array("
            "ref, status, result, error) ORDER BY pos), '[]') FROM items "
            "WHERE job_id = jobs.id) FROM jobs WHERE id = %s")
        params: tuple[str, ...] = (job_id,)
        if owner is not None:
            query, params = query + " AND owner = %s", (job_id, owner)
        rows = await self._query(query, params)
        if not rows:
            return None
        return (job_from_row(rows[0], decode=False),
                [item_from_row(r, decode=False) for r in rows[0][-1]])

    async def count_by_status(self, owner: str | None = None) -> dict[str, int]:
        if owner is None:
            rows = await self._query("SELECT status, count(*) FROM jobs GROUP BY status")
        else:
            rows = await self._query("SELECT status, count(*) FROM jobs WHERE owner = %s "
                                     "GROUP BY status", (owner,))
        return {str(s): int(n) for s, n in rows}

    async def events(self, job_id: str, after: int, limit: int = 1000) -> list[Event]:
        rows = await self._query(
            "SELECT seq, type, data, at FROM events WHERE job_id = %s AND seq > %s "
            "ORDER BY seq LIMIT %s", (job_id, after, limit))
        return [Event(job=job_id, seq=r[0], type=r[1], data=r[2], at=r[3]) for r in rows]

    async def request_cancel(self, job_id: str, owner: str) -> Job | None:
        async def cancel(conn: Conn) -> tuple[Job | None, list[Event]]:
            job = await self._find(conn, job_id, owner, lock=True)
            if job is None or job.status.terminal or job.cancel_requested:
                return job, []
            at = now()
            if job.status == Status.QUEUED:
                check_job_transition(job.status, Status.CANCELLED)
                assignments, kind = "status = 'cancelled', finished_at = %s, ", EventType.CANCELLED
                params: tuple[Any, ...] = (at, at, job_id)
            else:
                assignments, kind = "", EventType.CANCEL_REQUESTED
                params = (at, job_id)
            cur = await conn.execute(
                f"UPDATE jobs SET {assignments}cancel_requested = true, seq = seq + 1, "
                f"updated_at = %s WHERE id = %s RETURNING {JOB_COLUMNS}", params)
            row = await cur.fetchone()
            assert row is not None  # locked above
            job = job_from_row(row, decode=False)
            p = job.progress
            ev = make_event(job_id, job.seq, kind,
                            event_data(job.status, p.total, p.done, p.failed), at)
            return job, [ev]

        return await self._transact(cancel)

    async def delete_job(self, job_id: str, owner: str) -> bool:
        async def delete(conn: Conn) -> tuple[bool, list[Event]]:
            job = await self._find(conn, job_id, owner, lock=True)
            if job is None:
                return False, []
            if job.status.active:
                raise JobActive(f"job {job_id} is {job.status}; cancel it first")
            await conn.execute("DELETE FROM jobs WHERE id = %s", (job_id,))
            return True, []

        return await self._transact(delete)

    # -- the worker's side

    async def claim(self, worker: str, tasks: Collection[str], limit: int,
                    lease_seconds: float, queues: Collection[str] | None = None) -> list[Job]:
        _, jobs = await self.finish_and_claim([], worker, tasks, limit, lease_seconds, queues)
        return jobs

    @functools.cached_property
    def _claim_sql(self) -> str:
        """Claims, writes each claimed job's `started` event and notifies it, all in one
        statement: one round trip per claim, however many jobs it takes.

        Candidates are taken in the claim order through jobs_queue, skipping rows other
        claims hold and jobs whose limit key is full (as this snapshot sees it; the jobs
        behind them are not held up). Each limit key among them then asks job_limits for
        as many slots as it has candidates (the upsert waits for a concurrent claim of
        the key and reads the row as that one left it): only the first `granted`
        candidates of the key are claimed; the others stay queued."""
        data = event_data_sql("'running'", "total", "done", "failed", attempt="attempt")
        return (
            "WITH picked AS MATERIALIZED (SELECT id AS picked_id, limit_key AS picked_key, "
            "limit_max AS picked_max, priority AS picked_priority, rank AS picked_rank, "
            "coalesce(run_at, created_at) AS picked_due FROM jobs WHERE status = 'queued' "
            "AND NOT waiting AND task = ANY(%s) AND (%s::text[] IS NULL OR queue = ANY(%s)) "
            "AND (limit_key IS NULL OR NOT EXISTS (SELECT FROM job_limits AS l "
            "WHERE l.key = jobs.limit_key AND l.running >= l.limit_max)) "
            f"ORDER BY {CLAIM_ORDER} LIMIT %s FOR UPDATE SKIP LOCKED), "
            "wanted AS (SELECT picked_key, least(count(*)::integer, max(picked_max)) AS n, "
            "max(picked_max) AS m FROM picked WHERE picked_key IS NOT NULL "
            "GROUP BY picked_key), "
            # In key order, as the trigger releasing slots takes them: no deadlock.
            "gate AS (INSERT INTO job_limits AS l (key, running, limit_max, granted) "
            "SELECT picked_key, n, m, n FROM wanted ORDER BY picked_key "
            "ON CONFLICT (key) DO UPDATE SET "
            "granted = greatest(0, least(excluded.granted, excluded.limit_max - l.running)), "
            "running = l.running "
            "+ greatest(0, least(excluded.granted, excluded.limit_max - l.running)), "
            "limit_max = excluded.limit_max RETURNING key, granted), "
            "chosen AS (SELECT picked_id FROM (SELECT picked_id, picked_key, row_number() "
            "OVER (PARTITION BY picked_key ORDER BY picked_priority DESC, picked_rank, "
            "picked_due) AS nth FROM picked) AS p LEFT JOIN gate ON gate.key = p.picked_key "
            "WHERE p.picked_key IS NULL OR p.nth <= gate.granted), "
            "claimed AS (UPDATE jobs SET status = 'running', attempt = attempt + 1, "
            f"worker = %s, lease_until = {_DB_NOW} + %s, seq = seq + 1, updated_at = %s "
            f"FROM chosen WHERE id = picked_id RETURNING {JOB_COLUMNS}), "
            + _with_events(self.listener.origin, "claimed", "started", data, JOB_COLUMNS))

    async def heartbeat(self, leases: Sequence[Lease], lease_seconds: float) -> dict[str, bool]:
        if not leases:
            return {}
        rows = await self._query(
            "WITH leases AS (SELECT * FROM unnest(%s::text[], %s::text[], %s::int[]) "
            f"AS leases(job, worker, attempt)), held AS ({_HELD_SQL}) "
            f"UPDATE jobs SET lease_until = {_DB_NOW} + %s FROM held WHERE jobs.id = held.id "
            "RETURNING jobs.id, jobs.cancel_requested",
            ([x.job for x in leases], [x.worker for x in leases], [x.attempt for x in leases],
             lease_seconds))
        return {str(job): bool(cancel) for job, cancel in rows}

    async def declare_items(self, lease: Lease, refs: Sequence[str]) -> tuple[Written, list[Item]]:
        async def declare(conn: Conn) -> tuple[tuple[Written, list[Item]], list[Event]]:
            (seq, status, total, done, failed, cancel), rows = await self._hold(
                conn, lease, "SELECT ref, status, result, error FROM items "
                "WHERE job_id = %s ORDER BY pos", (lease.job,))
            items = [item_from_row(r, decode=False) for r in rows]
            existing = {it.ref for it in items}
            fresh = list(dict.fromkeys(r for r in refs if r not in existing))
            if not fresh:  # nothing changed: no event
                return (Written([], cancel), items), []
            at = now()
            await conn.execute(
                "INSERT INTO items (job_id, ref, pos, status) "
                "SELECT %s, ref, %s + n - 1, 'pending' FROM unnest(%s::text[]) "
                "WITH ORDINALITY AS fresh(ref, n)", (lease.job, len(items), fresh))
            await conn.execute(
                "UPDATE jobs SET seq = seq + 1, total = total + %s, updated_at = %s "
                "WHERE id = %s", (len(fresh), at, lease.job))
            ev = make_event(lease.job, seq + 1, EventType.ITEMS,
                            event_data(status, total + len(fresh), done, failed, refs=fresh), at)
            items += [Item(ref, ItemStatus.PENDING) for ref in fresh]
            return (Written([ev], cancel), items), [ev]

        return await self._transact(declare)

    async def update_items(self, lease: Lease, updates: Sequence[ItemUpdate]) -> Written:
        if len(updates) == 1 and (written := await self._update_one(lease, updates[0])):
            return written
        # Several updates, or one that did not apply: the general path applies them or
        # says why not (lease lost, unknown item, illegal transition).

        async def update(conn: Conn) -> tuple[Written, list[Event]]:
            (seq, status, total, done, failed, cancel), rows = await self._hold(
                conn, lease, "SELECT ref, status FROM items WHERE job_id = %s AND ref = ANY(%s)",
                (lease.job, list({u.ref for u in updates})))
            if not updates:
                return Written([], cancel), []
            current = {str(ref): ItemStatus(st) for ref, st in rows}
            events: list[Event] = []
            at = now()
            for u in updates:
                old = current.get(u.ref)
                if old is None:
                    raise UnknownItem(f"item {u.ref!r} was not declared")
                check_item_transition(old, u.status)
                d_done, d_failed = counts_delta(old, u.status)
                current[u.ref] = u.status
                seq, done, failed = seq + 1, done + d_done, failed + d_failed
                extra = item_change(u.ref, u.status, u.result, u.error)
                events.append(make_event(lease.job, seq, EventType.ITEM,
                                         event_data(status, total, done, failed, **extra), at))
            # Later updates of the same item win, as if applied one by one.
            last = {u.ref: u for u in updates}
            await conn.execute(
                "UPDATE items SET status = u.status, result = u.result, error = u.error "
                "FROM unnest(%s::text[], %s::text[], %s::json[], %s::text[]) "
                "AS u(ref, status, result, error) WHERE job_id = %s AND items.ref = u.ref",
                ([u.ref for u in last.values()], [u.status.value for u in last.values()],
                 [Json(u.result, dumps) for u in last.values()],
                 [_text(u.error) for u in last.values()], lease.job))
            await conn.execute(
                "UPDATE jobs SET seq = %s, done = %s, failed = %s, updated_at = %s "
                "WHERE id = %s", (seq, done, failed, at, lease.job))
            return Written(events, cancel), events

        return await self._transact(update)

    async def _update_one(self, lease: Lease, u: ItemUpdate) -> Written | None:
        """One item changing (a task's `ctx.done(ref)`), in one statement; None if it did
        not apply."""
        change = _ONE_ITEM[u.status]
        if change is None:
            return None  # the counts would depend on the old state: the general path
        sources, (d_done, d_failed) = change
        at = now()
        sql = self._update_one_sqls[u.result is not None, u.error is not None]
        rows = await self._query(sql, (
            lease.job, lease.worker, lease.attempt, u.status.value, Json(u.result, dumps),
            _text(u.error), u.ref, sources, d_done, d_failed, at, lease.job,
            self.listener.channel))
        if not rows:
            return None
        seq, cancel, _, data = rows[0]
        ev = Event(job=lease.job, seq=seq, type=EventType.ITEM.value, data=data, at=at)
        self._publish([ev])
        return Written([ev], cancel)

    @functools.cached_property
    def _update_one_sqls(self) -> dict[tuple[bool, bool], str]:
        """By (has result, has error): locks the held job row, then changes the item if
        its state allows (the guard is rechecked on the item's latest version), then
        bumps the job's seq and counts and writes the event; no row if any of it did not
        apply."""
        return {(r, e): self._update_one_sql(r, e) for r in (False, True) for e in (False, True)}

    def _update_one_sql(self, has_result: bool, has_error: bool) -> str:
        # The same keys as item_change() gives, as columns of the `item` CTE below.
        columns = {"ref": "ref", "item": "item_status", "result": "item_result",
                   "error": "item_error"}
        change = item_change("", ItemStatus.DONE, True if has_result else None,
                             "" if has_error else None)
        data = event_data_sql("status", "total", "done", "failed",
                              **{key: columns[key] for key in change})
        return (
            f"WITH held AS (SELECT id FROM jobs WHERE id = %s AND {_LEASE} "
            "FOR NO KEY UPDATE), "
            "item AS (UPDATE items SET status = %s, result = %s, error = %s FROM held "
            "WHERE items.job_id = held.id AND items.ref = %s AND items.status = ANY(%s) "
            "RETURNING items.ref, items.status AS item_status, items.result AS item_result, "
            "items.error AS item_error), "
            "changed AS (UPDATE jobs SET seq = seq + 1, done = done + %s, "
            "failed = failed + %s, updated_at = %s FROM item WHERE jobs.id = %s "
            "RETURNING jobs.id, jobs.seq, jobs.status, jobs.total, jobs.done, jobs.failed, "
            "jobs.cancel_requested, jobs.updated_at, item.*), "
            + _with_events(self.listener.origin, "changed", "item", data, "seq, cancel_requested"))

    async def report(self, lease: Lease, info: JSON) -> Written:
        async def report(conn: Conn) -> tuple[Written, list[Event]]:
            seq, status, total, done, failed, cancel = await self._fenced(
                conn, lease, ", info = %s", (Json(info, dumps),))
            ev = make_event(lease.job, seq, EventType.PROGRESS,
                            event_data(status, total, done, failed, info=info), now())
            return Written([ev], cancel), [ev]

        return await self._transact(report)

    async def finish(self, lease: Lease, status: Status, result: JSON = None,
                     error: str | None = None) -> Written:
        check_end(status)
        # Encoded here so a result that is not JSON fails its own call, not the batch.
        return await self._finishes(_Finish(lease, status, result, dumps(result), _text(error)))

    async def _finish_many(self, finishes: list[_Finish]) -> list[Written | LeaseLost]:
        """The ends of jobs that finished together: one statement, one round trip."""
        at = now()
        try:
            rows = await self._query(self._finish_sql, self._finish_params(finishes, at))
        except BaseException:
            self._unknown(finishes)
            raise
        return self._finished(finishes, rows, at)

    def _finish_params(self, finishes: Sequence[_Finish], at: float) -> tuple[Any, ...]:
        return ([f.lease.job for f in finishes], [f.lease.worker for f in finishes],
                [f.lease.attempt for f in finishes], [f.status.value for f in finishes],
                [f.encoded for f in finishes], [f.error for f in finishes], at, at,
                self.listener.channel)

    def _unknown(self, finishes: Sequence[_Finish]) -> None:
        # A finish may have committed, and our own listener skips our notifications:
        # hint without the event, so listeners read the store.
        for f in finishes:
            self._call_hints(f.lease.job, UNKNOWN_SEQ, None)

    def _finished(self, finishes: Sequence[_Finish], rows: list[TupleRow], at: float
                  ) -> list[Written | LeaseLost]:
        ended = {row[0]: row for row in rows}
        outcomes: list[Written | LeaseLost] = []
        events: list[Event] = []
        for f in finishes:
            row = ended.pop(f.lease.job, None)  # (the same lease twice: only once)
            if row is None:
                outcomes.append(lease_lost(f.lease))
                continue
            job, seq, cancel, _, data = row
            ev = Event(job=job, seq=seq, type=f.status.value, data=data, at=at)
            events.append(ev)
            outcomes.append(Written([ev], cancel))
        self._publish(events)
        return outcomes

    async def finish_and_claim(
        self, ends: Sequence[End], worker: str, tasks: Collection[str], limit: int,
        lease_seconds: float, queues: Collection[str] | None = None,
    ) -> tuple[list[Written | Exception], list[Job]]:
        # A result that is not JSON fails its own end alone.
        encoded = [encoded_end(end) for end in ends]
        finishes = [_Finish(end.lease, end.status, end.result, e, _text(end.error))
                    for end, e in zip(ends, encoded, strict=True) if isinstance(e, str)]
        wanted = claims(tasks, limit, queues)
        if not finishes and not wanted:
            return [e for e in encoded if isinstance(e, Exception)], []
        at = now()
        queue_list = None if queues is None else list(queues)
        # Pipeline mode: the statements before the pipeline's Sync (sent at its end) are
        # one transaction, one round trip and one commit for the ends and the claim. The
        # claim sees the ends (their limit slots free) and what the promotion made due.
        # But ends that free limit slots hold their keys' rows of job_limits: a claim
        # waiting then for another key's row could close a cycle with a worker whose
        # ends and claim cross the keys the other way. Those ends commit first (a Sync,
        # and a second round trip).
        try:
            async with self._connection() as conn, conn.pipeline() as pipeline:
                ended = (await conn.execute(self._finish_sql, self._finish_params(finishes, at))
                         if finishes else None)
                claimed = None
                if wanted:
                    if any(end.limited for end in ends):
                        await pipeline.sync()
                    await conn.execute(_PROMOTE, (PROMOTE_BATCH,))
                    claimed = await conn.execute(self._claim_sql, (
                        list(tasks), queue_list, queue_list, limit, worker, lease_seconds, at,
                        self.listener.channel))
                ended_rows = await ended.fetchall() if ended else []
                claimed_rows = await claimed.fetchall() if claimed else []
        except BaseException:
            self._unknown(finishes)
            raise
        written = iter(self._finished(finishes, ended_rows, at))
        jobs = [job_from_row(row, decode=False) for row in claimed_rows]
        self._publish([Event(job=job.id, seq=job.seq, type=EventType.STARTED.value,
                             data=row[-1], at=at)
                       for job, row in zip(jobs, claimed_rows, strict=True)])
        return [e if isinstance(e, Exception) else next(written) for e in encoded], jobs

    @functools.cached_property
    def _finish_sql(self) -> str:
        """Ends the jobs the given leases still hold, puts the items their attempts left
        running back to pending under the same row locks, and writes and notifies one
        event per job ended; returns a row per job ended."""
        reset = ("to_json(ARRAY(SELECT ref FROM reset WHERE reset.job_id = ended.id "
                 "ORDER BY pos))")
        data = event_data_sql("status", "total", "done", "failed", result="result",
                              error="error", reset=reset)
        return (
            "WITH leases AS (SELECT * FROM unnest(%s::text[], %s::text[], %s::int[], "
            "%s::text[], %s::json[], %s::text[]) "
            "AS leases(job, worker, attempt, status, result, error)), "
            f"held AS ({_HELD_SQL}), "
            "ended AS (UPDATE jobs SET seq = jobs.seq + 1, updated_at = %s, "
            "status = f.status, result = f.result, error = f.error, finished_at = %s, "
            "worker = NULL, lease_until = NULL FROM held JOIN leases AS f ON f.job = held.id "
            "WHERE jobs.id = held.id AND jobs.worker = f.worker "
            "AND jobs.attempt = f.attempt RETURNING jobs.id, jobs.seq, jobs.status, "
            "jobs.total, jobs.done, jobs.failed, jobs.result, jobs.error, "
            "jobs.cancel_requested, jobs.updated_at), "
            "reset AS (UPDATE items SET status = 'pending' FROM ended "
            "WHERE items.job_id = ended.id AND items.status = 'running' "
            "RETURNING items.job_id, items.ref, items.pos), "
            + _with_events(self.listener.origin, "ended", "status", data,
                           "id, seq, cancel_requested"))

    async def hand_back(self, leases: Sequence[Lease]) -> int:
        async def hand_back(conn: Conn) -> tuple[int, list[Event]]:
            at = now()
            events = []
            for lease in leases:
                # Fenced like every write of a worker: only the lease's holder, same attempt.
                cur = await conn.execute(
                    "UPDATE jobs SET status = 'queued', error = %s, worker = NULL, "
                    "lease_until = NULL, attempt = attempt - 1, run_at = %s, seq = seq + 1, "
                    f"updated_at = %s WHERE id = %s AND {_LEASE} AND NOT cancel_requested "
                    "RETURNING seq, total, done, failed, attempt",
                    (HANDED_BACK, at, at, lease.job, lease.worker, lease.attempt))
                row = await cur.fetchone()
                if row is None:
                    continue
                seq, total, done, failed, attempt = row
                events.append(make_event(lease.job, seq, EventType.RETRYING, retrying_data(
                    total, done, failed, attempt, HANDED_BACK, iso(at),
                    await _reset_running(conn, lease.job)), at))
            return len(events), events

        return await self._transact(hand_back) if leases else 0

    async def retry(self, lease: Lease, error: str, delay: float) -> Written:
        async def retry(conn: Conn) -> tuple[Written, list[Event]]:
            at = now()
            cur = await conn.execute(
                "UPDATE jobs SET status = 'queued', error = %s, worker = NULL, "
                "lease_until = NULL, waiting = true, run_at = "
                + _DUE.format(f"{_DB_NOW} + %s") + ", seq = seq + 1, updated_at = %s "
                f"WHERE id = %s AND {_LEASE} "
                "RETURNING seq, total, done, failed, cancel_requested, run_at",
                (_text(error), delay, at, lease.job, lease.worker, lease.attempt))
            row = await cur.fetchone()
            if row is None:
                raise lease_lost(lease)
            seq, total, done, failed, cancel, run_at = row
            ev = make_event(lease.job, seq, EventType.RETRYING, retrying_data(
                total, done, failed, lease.attempt, _text(error) or "", iso(run_at),
                await _reset_running(conn, lease.job)), at)
            return Written([ev], cancel), [ev]

        return await self._transact(retry)

    # -- maintenance

    async def expire_leases(self) -> int:
        async def expire(conn: Conn) -> tuple[int, list[Event]]:
            at = now()
            # SKIP LOCKED: a job its worker is writing right now is not expired this round.
            cur = await conn.execute(
                "SELECT id, attempt, max_attempts, cancel_requested FROM jobs "
                f"WHERE status = 'running' AND lease_until < {_DB_NOW} "
                # Each job's update releases its limit key's slot (a trigger): in key
                # order, as claims take them.
                "ORDER BY limit_key, id FOR NO KEY UPDATE SKIP LOCKED")
            events = []
            for job_id, attempt, max_attempts, cancel in await cur.fetchall():
                outcome = expiry_outcome(attempt, max_attempts, cancel)
                error = lease_expired_error(attempt, max_attempts, outcome == Status.QUEUED)
                reset = await _reset_running(conn, job_id)
                # Retried at once (run_at now, not waiting): the worker died, not the task.
                retried = outcome == Status.QUEUED
                job_cur = await conn.execute(
                    "UPDATE jobs SET status = %s, error = %s, worker = NULL, lease_until = NULL, "
                    "seq = seq + 1, updated_at = %s, finished_at = %s, "
                    "run_at = CASE WHEN %s THEN %s ELSE run_at END WHERE id = %s "
                    "RETURNING seq, total, done, failed",
                    (outcome.value, error, at, at if outcome.terminal else None, retried, at,
                     job_id))
                row = await job_cur.fetchone()
                assert row is not None  # locked above
                seq, total, done, failed = row
                kind, data = expiry_event(outcome, total, done, failed, attempt, error, at,
                                          reset)
                events.append(make_event(job_id, seq, kind, data, at))
            return len(events), events

        return await self._transact(expire)

    async def prune(self, finished_before: float) -> int:
        await self._execute("DELETE FROM sessions WHERE expires_at <= %s", (now(),))
        pruned = await self._execute(
            "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE status IN "
            f"{TERMINAL_SQL} AND finished_at < %s FOR UPDATE SKIP LOCKED)",
            (finished_before,))
        # Limit keys with no job running. A claim holding a row is skipped; one that waits
        # for the deletion inserts the row afresh.
        await self._execute("DELETE FROM job_limits WHERE key IN (SELECT key FROM "
                            "job_limits WHERE running = 0 FOR UPDATE SKIP LOCKED)")
        async with self._connection() as conn, conn.transaction():
            # The floor rises with the tombstones' deletion: a cursor below a pruned one
            # gets the whole list. Owner rows are locked in name order, as committers do.
            await conn.execute(
                "SELECT 1 FROM owner_feeds WHERE owner IN (SELECT owner FROM job_feed "
                "WHERE at < %s) ORDER BY owner FOR UPDATE", (finished_before,))
            await conn.execute(
                "WITH pruned AS (DELETE FROM job_feed WHERE at < %s AND owner_seq >= 0 "
                "RETURNING owner, owner_seq) UPDATE owner_feeds AS f "
                "SET floor = greatest(f.floor, p.top) FROM (SELECT owner, max(owner_seq) "
                "AS top FROM pruned GROUP BY owner) AS p WHERE f.owner = p.owner",
                (finished_before,))
        return pruned

    async def owner_changes(self, owner: str, after: int) -> OwnerChanges:
        async with self._connection() as conn, conn.transaction():
            # One snapshot: a seq, and exactly the rows stamped up to it.
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            cur = await conn.execute(
                "SELECT seq, floor FROM owner_feeds WHERE owner = %s", (owner,))
            seq, floor = await cur.fetchone() or (0, 0)
            reset = not floor <= after <= seq or after == 0
            changed = "" if reset else (
                " AND id IN (SELECT job_id FROM job_feed WHERE owner = %(owner)s "
                "AND owner_seq > %(after)s AND at IS NULL)")
            cur = await conn.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE owner = %(owner)s{changed} "
                "ORDER BY created_at DESC, id DESC", {"owner": owner, "after": after})
            jobs = [job_from_row(r, decode=False) for r in await cur.fetchall()]
            gone: list[str] = []
            if not reset:
                cur = await conn.execute(
                    "SELECT job_id FROM job_feed WHERE owner = %s AND owner_seq > %s "
                    "AND at IS NOT NULL", (owner, after))
                gone = [r[0] for r in await cur.fetchall()]
        return OwnerChanges(seq, reset, jobs, gone)


# -- submitting in a host application's transaction

AnyConnection = psycopg.Connection[Any] | psycopg.AsyncConnection[Any]


def _joinable(conn: AnyConnection) -> None:
    """Refuses a connection whose transaction a submit could not join: one in autocommit
    outside a transaction (each statement would commit alone, so the owner's lock would
    not cover the submit), a failed transaction, or one busy with another statement."""
    status = conn.info.transaction_status
    if not (status == TransactionStatus.INTRANS
            or (status == TransactionStatus.IDLE and not conn.autocommit)):
        raise StoreError(
            "submitting in a transaction needs the connection inside a healthy transaction "
            f"(it is {status.name.lower()}{', autocommit' if conn.autocommit else ''})")


def _hosted(row: TupleRow | None, owner: str, task: str, input: JSON, key: str | None,
            max_attempts: int, cap: int, place: Placement) -> _Submission:
    """The submission for a host's transaction, given what _HOST_SQL answered."""
    assert row is not None
    isolation, schema, found = row
    if isolation != "read committed":
        # Under a snapshot older than the owner's lock, the cap's count could miss jobs
        # that other submits committed meanwhile.
        raise StoreError(f"submitting in a transaction needs READ COMMITTED isolation, "
                         f"not {str(isolation).upper()}")
    if not found:
        raise StoreError(f"jobwire's tables are not in schema {schema!r}: pass the schema "
                         "jobwire's URL uses, or run `jobwire migrate`")
    # Tagged as no listener's own: every process's listener delivers the events at commit.
    return _Submission(_submit_sqls(HOST_ORIGIN, schema), channel_of(schema), owner, task,
                       input, key, max_attempts, cap, place=place)


async def submit_in(conn: psycopg.AsyncConnection[Any], owner: str, task: str, input: JSON,
                    key: str | None, max_attempts: int, *, cap: int,
                    schema: str | None = None, place: Placement = DEFAULT_PLACEMENT
                    ) -> tuple[Job, bool]:
    """`PostgresStore.submit` inside the transaction open on the host's `conn`: the job,
    its `created` event and its notification exist if and only if that transaction
    commits. Runs the same statements as the store's submit (plus one check first) and
    neither commits nor rolls back, nor changes the connection's settings.

    `schema` names the schema of jobwire's tables (None: the connection's current
    schema). The owner's advisory lock (the cap's) is held until the host's transaction
    ends. Errors of the connection (psycopg's) are raised as they are, for the host's
    own handling; StoreError if the connection cannot be used so."""
    _joinable(conn)
    async with psycopg.AsyncCursor(conn, row_factory=tuple_row) as cur:
        set_json_loads(orjson.loads, cur)  # on this cursor only: the host keeps its loaders
        await cur.execute(_HOST_SQL, (schema,))
        sub = _hosted(await cur.fetchone(), owner, task, input, key, max_attempts, cap,
                      place)
        while True:  # more than once only in the rare cases _Submission.outcome says
            at = now()
            for query, params in sub.statements(at):
                await cur.execute(query, params)
            if (outcome := sub.outcome(await cur.fetchall(), at)) is not None:
                return outcome[0], outcome[1] is not None


def submit_in_sync(conn: psycopg.Connection[Any], owner: str, task: str, input: JSON,
                   key: str | None, max_attempts: int, *, cap: int,
                   schema: str | None = None, place: Placement = DEFAULT_PLACEMENT
                   ) -> tuple[Job, bool]:
    """`submit_in` on a blocking connection (Django, Flask)."""
    _joinable(conn)
    with psycopg.Cursor(conn, row_factory=tuple_row) as cur:
        set_json_loads(orjson.loads, cur)
        cur.execute(_HOST_SQL, (schema,))
        sub = _hosted(cur.fetchone(), owner, task, input, key, max_attempts, cap, place)
        while True:
            at = now()
            for query, params in sub.statements(at):
                cur.execute(query, params)
            if (outcome := sub.outcome(cur.fetchall(), at)) is not None:
                return outcome[0], outcome[1] is not None
