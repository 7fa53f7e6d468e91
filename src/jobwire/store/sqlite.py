"""The embedded store: one SQLite file in WAL mode, shared safely by several processes.

All statements run on one dedicated thread that owns the connection, so the event
loop never blocks on disk. Writers take `BEGIN IMMEDIATE`, which serialises them
across processes; constraints (the dedup index, status checks) live in the schema.
Events written by other processes are noticed through `PRAGMA data_version`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, TypeVar

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
    now,
)
from jobwire.settings import Settings
from jobwire.store.base import (
    DEFAULT_PLACEMENT,
    STATUS_EVENTS,
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
from jobwire.store.doorbell import Doorbell
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
    expiry_event,
    expiry_outcome,
    fire_tick_sql,
    guest_clashes_sql,
    item_change,
    item_from_row,
    job_from_row,
    lease_expired_error,
    lease_lost,
    loads,
    make_event,
    retrying_data,
)

T = TypeVar("T")
# A call for the store thread: fn(conn, *args) -> (value, events).
_Step = tuple[Callable[..., tuple[Any, list[Event]]], tuple[Any, ...]]
# (succeeded, (value, events) or the exception) per call of a batch, in order.
_Outcome = tuple[bool, Any]

# Calls that queue up while the store thread is busy go together, up to this many (for
# writes: one transaction, so the write lock is held for a few milliseconds at most).
MAX_BATCH = 64

# How long a write waits for another process's lock before failing with a clear error.
# Writers hold the lock for milliseconds; much longer means something is wrong, and an
# API caller should hear so (503 "database is locked") before its HTTP timeout.
BUSY_SECONDS = 5.0

# The WAL is copied back into the database file by a thread of its own, with a
# connection of its own (a PASSIVE checkpoint: it never holds up a writer), rather than by
# whichever commit crossed SQLite's threshold: that commit waited for the copy and its two
# fsyncs, milliseconds every few dozen jobs, most of the store thread's time in commits.
# It copies once this many rows were changed since its last copy (triggers' rows count
# too: a submit changes 4, a job's claim and end ~3 each), or a second after any: a WAL of
# a few thousand pages at most, near SQLite's own 1000.
CHECKPOINT_CHANGES = 1000
CHECKPOINT_SECONDS = 1.0
# The store's own connection still checkpoints past this many WAL pages (SQLite's
# default is 1000): should the copier fall behind, the WAL stays bounded.
BACKSTOP_PAGES = 20_000
# After reading what a ring announced, the next read waits this long at least: a busy
# peer's commits are read in batches, at most 200 reads a second, not one by one (per
# read ~0.2 ms of CPU; the events then go out as fewer, larger frames).
RUNG_GAP = 0.005

_ACTIVE_SQL = "('queued', 'running')"
_TERMINAL_SQL = "('completed', 'failed', 'cancelled')"
_BUMP = ("INSERT INTO owner_feeds (owner, seq) VALUES ({owner}, 1) "
         "ON CONFLICT (owner) DO UPDATE SET seq = seq + 1;")
_SEQ = "(SELECT seq FROM owner_feeds WHERE owner = {owner})"
_TOMBSTONE = ("INSERT INTO job_tombstones (owner, owner_seq, job_id, at) VALUES (OLD.owner, "
              f"{_SEQ.format(owner='OLD.owner')}, OLD.id, "
              "(julianday('now') - 2440587.5) * 86400.0);")

# Migration 3, and again in 4 for a database that has another 3 (see there).
_PERIODIC_TICKS = ("CREATE TABLE IF NOT EXISTS periodic_ticks "
                   "(task TEXT PRIMARY KEY, tick REAL NOT NULL);")

# The running jobs of the limit key `{}`, counted through an index.
_RUNNING_OF_KEY = ("(SELECT count(*) FROM jobs AS r WHERE r.limit_key = {} "
                   "AND r.status = 'running')")

MIGRATIONS: list[str] = [
    f"""
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        task TEXT NOT NULL,
        key TEXT,
        owner TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN {_ACTIVE_SQL[:-1]}, {_TERMINAL_SQL[1:]}),
        input TEXT NOT NULL,
        total INTEGER NOT NULL DEFAULT 0,
        done INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        result TEXT,
        error TEXT,
        info TEXT,
        attempt INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL CHECK (max_attempts >= 1),
        seq INTEGER NOT NULL,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        worker TEXT,
        lease_until REAL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        finished_at REAL,
        CHECK (done >= 0 AND failed >= 0 AND done + failed <= total),
        CHECK ((status IN {_TERMINAL_SQL}) = (finished_at IS NOT NULL))
    );
    -- At most one active job per (owner, task, key): the database decides, not Python.
    CREATE UNIQUE INDEX jobs_dedup ON jobs (owner, task, key)
        WHERE key IS NOT NULL AND status IN {_ACTIVE_SQL};
    CREATE INDEX jobs_by_owner ON jobs (owner, created_at DESC);
    CREATE INDEX jobs_queue ON jobs (created_at) WHERE status = 'queued';
    CREATE INDEX jobs_leases ON jobs (lease_until) WHERE status = 'running';
    CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
    CREATE TABLE items (
        job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        ref TEXT NOT NULL,
        pos INTEGER NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
        result TEXT,
        error TEXT,
        PRIMARY KEY (job_id, ref)
    ) WITHOUT ROWID;
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        type TEXT NOT NULL,
        data TEXT NOT NULL,
        at REAL NOT NULL,
        UNIQUE (job_id, seq)
    );
    CREATE TABLE sessions (
        token_hash TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL
    );
    """,
    # Fair claiming and the per-owner cap (see `submit`). Jobs queued before this
    # migration get rank 0, as if each were its owner's first.
    f"""
    ALTER TABLE jobs ADD COLUMN rank INTEGER NOT NULL DEFAULT 0;
    DROP INDEX jobs_queue;
    CREATE INDEX jobs_queue ON jobs (rank, created_at) WHERE status = 'queued';
    CREATE INDEX jobs_active ON jobs (owner) WHERE status IN {_ACTIVE_SQL};
    """,
    # Periodic jobs (see `submit_tick`): the last tick each one fired, one row each.
    _PERIODIC_TICKS,
    # Single-use stand-ins for a session's token in URLs (SSE), short-lived. (IF NOT
    # EXISTS: a database made by the tickets branch before it followed periodic_ticks
    # has tickets as its 3; the periodic_ticks it lacks comes here.)
    f"""
    {_PERIODIC_TICKS}
    CREATE TABLE IF NOT EXISTS tickets (
        ticket_hash TEXT PRIMARY KEY,
        token_hash TEXT NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE INDEX IF NOT EXISTS tickets_expiry ON tickets (expires_at);
    """,
    # Pages of a listing by (created_at, id), an owner's and every owner's (the operator
    # view): each walks an index in order from the cursor, whatever the table's size.
    """
    DROP INDEX IF EXISTS jobs_by_owner;
    CREATE INDEX jobs_by_owner ON jobs (owner, created_at DESC, id DESC);
    CREATE INDEX IF NOT EXISTS jobs_by_time ON jobs (created_at DESC, id DESC);
    """,
    # Delayed jobs and retries after a backoff (see `claim`). A `waiting` job is queued
    # but may not be claimed before its `run_at`: it is indexed by run_at alone, so
    # claims never scan the jobs whose time has not come.
    """
    ALTER TABLE jobs ADD COLUMN run_at REAL;
    ALTER TABLE jobs ADD COLUMN waiting INTEGER NOT NULL DEFAULT 0;
    DROP INDEX jobs_queue;
    CREATE INDEX jobs_queue ON jobs (rank, created_at) WHERE status = 'queued' AND waiting = 0;
    CREATE INDEX jobs_waiting ON jobs (run_at) WHERE status = 'queued' AND waiting = 1;
    """,
    # Owner feeds (see OwnerChanges): triggers, so that no write path can forget a bump.
    # Writers are serialised, so each owner's seq commits in order.
    f"""
    CREATE TABLE owner_feeds (
        owner TEXT PRIMARY KEY,
        seq INTEGER NOT NULL,
        floor INTEGER NOT NULL DEFAULT 0  -- the newest tombstone pruned
    ) WITHOUT ROWID;
    ALTER TABLE jobs ADD COLUMN owner_seq INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX jobs_owner_seq ON jobs (owner, owner_seq);
    CREATE TABLE job_tombstones (
        owner TEXT NOT NULL,
        owner_seq INTEGER NOT NULL,
        job_id TEXT NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (owner, owner_seq)
    ) WITHOUT ROWID;
    CREATE INDEX job_tombstones_at ON job_tombstones (at);
    CREATE TRIGGER jobs_feed_insert AFTER INSERT ON jobs BEGIN
        {_BUMP.format(owner="NEW.owner")}
        UPDATE jobs SET owner_seq = {_SEQ.format(owner="NEW.owner")} WHERE id = NEW.id;
    END;
    CREATE TRIGGER jobs_feed_update AFTER UPDATE OF status, owner ON jobs
    WHEN OLD.status IS NOT NEW.status OR OLD.owner IS NOT NEW.owner BEGIN
        {_BUMP.format(owner="NEW.owner")}
        UPDATE jobs SET owner_seq = {_SEQ.format(owner="NEW.owner")} WHERE id = NEW.id;
    END;
    CREATE TRIGGER jobs_feed_move AFTER UPDATE OF owner ON jobs
    WHEN OLD.owner IS NOT NEW.owner BEGIN
        {_BUMP.format(owner="OLD.owner")}
        {_TOMBSTONE}
    END;
    CREATE TRIGGER jobs_feed_delete AFTER DELETE ON jobs BEGIN
        {_BUMP.format(owner="OLD.owner")}
        {_TOMBSTONE}
    END;
    """,
    # Priorities, queues and concurrency limits (see `claim`). The claim order walks
    # jobs_queue; a limited job's key counts its running jobs through jobs_running_limits.
    f"""
    ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN queue TEXT NOT NULL DEFAULT 'default';
    ALTER TABLE jobs ADD COLUMN limit_key TEXT;
    ALTER TABLE jobs ADD COLUMN limit_max INTEGER CHECK (limit_max >= 1);
    DROP INDEX jobs_queue;
    CREATE INDEX jobs_queue ON jobs ({CLAIM_ORDER}) WHERE status = 'queued' AND waiting = 0;
    CREATE INDEX jobs_running_limits ON jobs (limit_key)
        WHERE status = 'running' AND limit_key IS NOT NULL;
    """,
    # Sessions by owner (a claim or revoke removes an owner's sessions; `users tokens` lists
    # them) and by expiry (the prune): neither may scan every session a flood left behind.
    """
    CREATE INDEX sessions_owner ON sessions (owner);
    CREATE INDEX sessions_expiry ON sessions (expires_at) WHERE expires_at IS NOT NULL;
    """,
    # Each owner's active jobs, counted by triggers whatever the write path, so a submit
    # reads its owner's rank (and the cap) in one row instead of counting up to the cap.
    f"""
    CREATE TABLE owner_active (owner TEXT PRIMARY KEY, n INTEGER NOT NULL CHECK (n >= 0))
        WITHOUT ROWID;
    INSERT INTO owner_active
        SELECT owner, count(*) FROM jobs WHERE status IN {_ACTIVE_SQL} GROUP BY owner;
    CREATE TRIGGER jobs_active_insert AFTER INSERT ON jobs
    WHEN NEW.status IN {_ACTIVE_SQL} BEGIN
        INSERT INTO owner_active VALUES (NEW.owner, 1)
            ON CONFLICT (owner) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER jobs_active_update AFTER UPDATE OF status, owner ON jobs
    WHEN (OLD.status IN {_ACTIVE_SQL}) IS NOT (NEW.status IN {_ACTIVE_SQL})
        OR OLD.owner IS NOT NEW.owner BEGIN
        UPDATE owner_active SET n = n - 1
            WHERE owner = OLD.owner AND OLD.status IN {_ACTIVE_SQL};
        INSERT INTO owner_active SELECT NEW.owner, 1 WHERE NEW.status IN {_ACTIVE_SQL}
            ON CONFLICT (owner) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER jobs_active_delete AFTER DELETE ON jobs
    WHEN OLD.status IN {_ACTIVE_SQL} BEGIN
        UPDATE owner_active SET n = n - 1 WHERE owner = OLD.owner;
    END;
    """,
    # A new job that comes with its owner_seq (the feed's next, as `_insert_job` gives it)
    # is not written a second time, nor moved in jobs_owner_seq, by its feed's trigger:
    # the trigger still bumps the feed, and sets the owner_seq of any other insert.
    f"""
    DROP TRIGGER jobs_feed_insert;
    CREATE TRIGGER jobs_feed_insert AFTER INSERT ON jobs BEGIN
        {_BUMP.format(owner="NEW.owner")}
        UPDATE jobs SET owner_seq = {_SEQ.format(owner="NEW.owner")}
            WHERE id = NEW.id AND NEW.owner_seq IS NOT {_SEQ.format(owner="NEW.owner")};
    END;
    """,
]


def claim_sql(tasks: int, queues: int | None) -> str:
    """The claim of `SQLiteStore.claim`, for `tasks` task names and `queues` queue names
    (None: any queue), with parameters (worker, lease_until, updated_at, *tasks, *queues,
    limit).

    Writers are serialised (BEGIN IMMEDIATE, across processes), so the running jobs
    counted per limit key are exact until commit: candidates skip full keys (the jobs
    behind them are not held up), then each key gets only the first of its candidates
    that fit."""
    in_queues = "" if queues is None else f"AND queue IN ({', '.join('?' * queues)}) "
    return (
        "UPDATE jobs SET status = 'running', attempt = attempt + 1, worker = ?, "
        "lease_until = ?, seq = seq + 1, updated_at = ? WHERE id IN ("
        "SELECT id FROM (SELECT id, limit_key, limit_max, row_number() OVER "
        f"(PARTITION BY limit_key ORDER BY {CLAIM_ORDER}) AS nth FROM ("
        "SELECT id, limit_key, limit_max, priority, rank, run_at, created_at "
        "FROM jobs WHERE status = 'queued' AND waiting = 0 AND task IN "
        f"({', '.join('?' * tasks)}) {in_queues}AND (limit_key IS NULL OR "
        f"{_RUNNING_OF_KEY.format('jobs.limit_key')} < limit_max) "
        f"ORDER BY {CLAIM_ORDER} LIMIT ?)) AS w WHERE w.limit_key IS NULL "
        f"OR nth + {_RUNNING_OF_KEY.format('w.limit_key')} <= w.limit_max) "
        f"RETURNING {JOB_COLUMNS}")


class _Lane:
    """Calls of one kind (reads or writes) waiting for the store thread, and the batch of
    them on it now. Calls that queue up meanwhile go together as the next batch: one
    hand-over to the thread and one wake-up of the loop for the lot (the hops, not the SQL,
    are most of a small call's cost). A batch starts after all its calls were made, so
    none is answered from before it was asked."""

    def __init__(self, run: Callable[[list[_Step]], list[_Outcome]]) -> None:
        self.run = run
        self.queue: collections.deque[tuple[_Step, asyncio.Future[Any]]] = collections.deque()
        self.running: asyncio.Future[None] | None = None  # done once the batch is settled


class _Checkpointer:
    """The WAL's copier (see CHECKPOINT_CHANGES). `committed` is told, on the store
    thread, the store connection's count of changed rows after each commit."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.written = 0  # rows changed so far, as the store thread last said
        self.copied = 0  # `written` when the last copy started
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name="jobwire-sqlite-checkpoint",
                                       daemon=True)
        self.thread.start()

    def committed(self, written: int) -> None:
        self.written = written
        if written - self.copied >= CHECKPOINT_CHANGES:
            self.wake.set()

    def run(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=BUSY_SECONDS)
        try:
            while not self.stopping:
                self.wake.wait(CHECKPOINT_SECONDS)
                self.wake.clear()
                if self.written != self.copied:
                    self.copied = self.written
                    try:
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    except sqlite3.Error:
                        pass  # busy or failing: the next round, or the store's backstop
        finally:
            conn.close()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join()


def _no_events(conn: sqlite3.Connection, fn: Callable[..., Any], *args: Any
               ) -> tuple[Any, list[Event]]:
    """A read as a step of a batch: its value, and no events."""
    return fn(conn, *args), []


def _path_of(url: str) -> str:
    for prefix in ("sqlite:///", "sqlite://"):
        if url.startswith(prefix):
            return url[len(prefix):] or ":memory:"
    return url


class SQLiteStore:
    """The embedded backend (`sqlite:///path/to/file.db`, or a plain path)."""

    def __init__(self, url: str, poll_interval: float = 0.05,
                 max_active_jobs: int | None = None) -> None:
        self.path = _path_of(url)
        self.max_active_jobs = (Settings().max_active_jobs if max_active_jobs is None
                                else max_active_jobs)
        self._poll_interval = poll_interval
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jobwire-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._checkpointer: _Checkpointer | None = None
        self._doorbell: Doorbell | None = None  # set while open, if it could be bound
        self._hints: list[Hint] = []
        self._owner_hints: list[OwnerHint] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watch: asyncio.Task[None] | None = None
        self._data_version = 0
        self._watermark = 0
        self._writes = _Lane(self._write_batch)
        self._reads = _Lane(self._read_batch)

    # -- plumbing

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, fn, *args)
        except (sqlite3.DatabaseError, OSError) as exc:
            raise self._error(exc) from exc

    def _error(self, exc: BaseException) -> BaseException:
        """Locked, full, unreadable or unreachable: a clear error, never a traceback."""
        if isinstance(exc, sqlite3.DatabaseError | OSError):
            error = StoreError(f"database error ({self.path}): {exc}")
            error.__cause__ = exc
            return error
        return exc

    @property
    def conn(self) -> sqlite3.Connection:
        assert self._conn is not None, "store is not open"
        return self._conn

    def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn inside one IMMEDIATE transaction on the store thread."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            out = fn(conn, *args)
            conn.execute("COMMIT")
            if self._checkpointer is not None:
                self._checkpointer.committed(conn.total_changes)
            if self._doorbell is not None:
                self._doorbell.ring()
        except BaseException:
            # A failed COMMIT (disk full, I/O error) may leave the transaction open;
            # left so, every later BEGIN on this connection would fail.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return out

    async def _transact(self, fn: Callable[..., tuple[T, list[Event]]], *args: Any) -> T:
        """Run fn(conn) -> (value, events) in one transaction; publish the events after commit.

        Writes that arrive while the store thread is busy go together: one transaction and
        one commit for the lot. Each runs inside its own savepoint, so one that fails undoes
        only itself, exactly as if run alone."""
        value: T = await self._queue(self._writes, fn, args)
        return value

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(conn, *args) on the store thread, outside any transaction; reads that arrive
        while a batch of reads is on the thread share the next hop."""
        value: T = await self._queue(self._reads, _no_events, (fn, *args))
        return value

    async def _queue(self, lane: _Lane, fn: Callable[..., tuple[Any, list[Event]]],
                     args: tuple[Any, ...]) -> Any:
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        lane.queue.append(((fn, args), done))
        self._next_batch(lane)
        return await done

    def _next_batch(self, lane: _Lane) -> None:
        if lane.running is not None or not lane.queue:
            return
        batch = [lane.queue.popleft() for _ in range(min(len(lane.queue), MAX_BATCH))]
        loop = asyncio.get_running_loop()
        lane.running = loop.create_future()
        self._thread.submit(self._run_batch, loop, lane, batch)

    def _run_batch(self, loop: asyncio.AbstractEventLoop, lane: _Lane,
                   batch: list[tuple[_Step, asyncio.Future[Any]]]) -> None:
        """On the store thread: run the batch and hand its outcomes to the loop in one call,
        not through run_in_executor's chain of futures (a loop iteration less per call)."""
        ran: list[_Outcome] | BaseException
        try:
            ran = lane.run([step for step, _ in batch])
        except BaseException as exc:  # nothing of the batch was committed
            ran = exc
        loop.call_soon_threadsafe(self._settle, lane, batch, ran)

    def _write_batch(self, batch: list[_Step]) -> list[_Outcome]:
        if len(batch) == 1:
            fn, args = batch[0]
            return [(True, self._write(fn, *args))]

        def each(conn: sqlite3.Connection) -> list[_Outcome]:
            outcomes: list[_Outcome] = []
            for fn, args in batch:
                conn.execute("SAVEPOINT one_write")
                try:
                    outcomes.append((True, fn(conn, *args)))
                except Exception as exc:
                    conn.execute("ROLLBACK TO one_write")
                    outcomes.append((False, exc))
                conn.execute("RELEASE one_write")
            return outcomes
        return self._write(each)

    def _read_batch(self, batch: list[_Step]) -> list[_Outcome]:
        outcomes: list[_Outcome] = []
        for fn, args in batch:
            try:
                outcomes.append((True, fn(self.conn, *args)))
            except Exception as exc:
                outcomes.append((False, exc))
        return outcomes

    def _settle(self, lane: _Lane, batch: list[tuple[_Step, asyncio.Future[Any]]],
                ran: list[_Outcome] | BaseException) -> None:
        """On the event loop: publish each committed write's events, then wake its caller."""
        running, lane.running = lane.running, None
        outcomes: list[_Outcome] = ran if not isinstance(ran, BaseException) else [
            (False, ran if len(batch) == 1 else self._error(ran)) for _ in batch]
        for (_, done), (ok, out) in zip(batch, outcomes, strict=True):
            if ok:
                value, events = out
                self._publish(events)
                if not done.done():
                    done.set_result(value)
            elif not done.done():
                done.set_exception(self._error(out))
        if running is not None:
            running.set_result(None)
        self._next_batch(lane)

    def _publish(self, events: Sequence[Event]) -> None:
        for ev in events:
            for hint in self._hints:
                hint(ev.job, ev.seq, ev)
        if any(ev.type in STATUS_EVENTS for ev in events):
            self._owners_changed(None)  # (events do not name their owner)

    def _owners_changed(self, owner: str | None) -> None:
        for hint in self._owner_hints:
            hint(owner)

    def listen(self, hint: Hint) -> None:
        self._hints.append(hint)

    def listen_owners(self, hint: OwnerHint) -> None:
        self._owner_hints.append(hint)

    # -- lifecycle

    def _connect(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=BUSY_SECONDS)
        # Turning a new file to WAL while another process does the same answers "locked"
        # at once, without the busy timeout (processes starting together): wait it out.
        deadline = time.monotonic() + BUSY_SECONDS
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_SECONDS * 1000)}")
        self._conn = conn
        self._write(self._migrate)
        if self.path != ":memory:":
            conn.execute(f"PRAGMA wal_autocheckpoint = {BACKSTOP_PAGES}")
            self._checkpointer = _Checkpointer(self.path)
        self._data_version = conn.execute("PRAGMA data_version").fetchone()[0]
        self._watermark = conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]

    def _disconnect(self) -> None:
        # The copier first: the store's connection, closed last, copies what is left and
        # removes the WAL.
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        self.conn.close()
        self._conn = None

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        # Under BEGIN IMMEDIATE, so two processes starting at once cannot both migrate.
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            statement = ""
            for part in script.split(";"):  # (a trigger's body holds semicolons too)
                statement += part + ";"
                if sqlite3.complete_statement(statement):
                    conn.execute(statement)
                    statement = ""
            conn.execute(f"PRAGMA user_version = {number}")

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._run(self._connect)
        if self.path != ":memory:":
            bell = Doorbell(self.path)
            self._doorbell = bell if bell.open() else None
        self._watch = asyncio.create_task(self._watch_other_processes())

    async def close(self) -> None:
        if self._watch:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        # Let queued calls run (writes commit) and reach their callers.
        while running := [lane.running for lane in (self._writes, self._reads) if lane.running]:
            await asyncio.gather(*running, return_exceptions=True)
            await asyncio.sleep(0)
        if self._conn is not None:
            await self._run(self._disconnect)
        if self._doorbell is not None:
            self._doorbell.close()
            self._doorbell = None
        self._thread.shutdown(wait=False)

    async def _watch_other_processes(self) -> None:
        """Reads other processes' commits when one of them rings (store/doorbell.py), at
        most once per RUNG_GAP, and every poll interval in any case."""
        looked = read = time.monotonic()
        while True:
            if (bell := self._doorbell) is None:
                await asyncio.sleep(self._poll_interval)
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll_interval):
                        await bell.wait()
                await asyncio.sleep(read + RUNG_GAP - time.monotonic())
                bell.take()  # the rings of the gap are answered by this read
                if time.monotonic() - looked >= self._poll_interval:
                    looked = time.monotonic()
                    bell.look_around()
            read = time.monotonic()
            try:
                events = await self._run(self._poll_foreign_events)
            except StoreError:
                continue  # locked or busy: the next round catches up
            if events is not None:
                self._publish(events)
                # Deletions and moves write no event: any commit may have made some.
                self._owners_changed(None)

    def _poll_foreign_events(self) -> list[Event] | None:
        """Other processes' events since the last look; None if none of them committed."""
        conn = self.conn
        newest = conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        if version == self._data_version:
            # No other process committed since the last look: all up to `newest` is ours.
            self._watermark = max(self._watermark, newest)
            return None
        self._data_version = version
        rows = conn.execute(
            "SELECT id, job_id, seq, type, data, at FROM events WHERE id > ? ORDER BY id",
            (self._watermark,),
        ).fetchall()
        if rows:
            self._watermark = rows[-1][0]
        return [Event(job=r[1], seq=r[2], type=r[3], data=loads(r[4]), at=r[5]) for r in rows]

    # -- shared transaction steps

    @classmethod
    def _add_event(cls, conn: sqlite3.Connection, job: str, seq: int, type: EventType,
                   data: dict[str, JSON], at: float) -> Event:
        return cls._add_events(conn, [make_event(job, seq, type, data, at)])[0]

    @staticmethod
    def _add_events(conn: sqlite3.Connection, events: list[Event]) -> list[Event]:
        """Several jobs' events in one statement (one prepared INSERT, run per row)."""
        conn.executemany(
            "INSERT INTO events (job_id, seq, type, data, at) VALUES (?, ?, ?, ?, ?)",
            [(ev.job, ev.seq, ev.type, dumps(ev.data), ev.at) for ev in events])
        return events

    @staticmethod
    def _fenced(conn: sqlite3.Connection, lease: Lease, assignments: str = "",
                params: Sequence[Any] = ()) -> tuple[int, str, int, int, int, bool]:
        """Bump the seq of a job the lease still holds, applying extra assignments.
        Returns (seq, status, total, done, failed, cancel_requested)."""
        row = conn.execute(
            f"UPDATE jobs SET seq = seq + 1, updated_at = ?{assignments} "
            "WHERE id = ? AND status = 'running' AND worker = ? AND attempt = ? "
            "RETURNING seq, status, total, done, failed, cancel_requested",
            (now(), *params, lease.job, lease.worker, lease.attempt),
        ).fetchone()
        if row is None:
            raise lease_lost(lease)
        return row[0], row[1], row[2], row[3], row[4], bool(row[5])

    @staticmethod
    def _reset_running(conn: sqlite3.Connection, job_id: str) -> list[str]:
        """Items a stopped attempt left running never finished: they go back to pending."""
        return [r[0] for r in conn.execute(
            "UPDATE items SET status = 'pending' WHERE job_id = ? AND status = 'running' "
            "RETURNING ref", (job_id,))]

    # -- sessions

    async def add_session(self, token_hash: str, owner: str, expires_at: float | None) -> None:
        def add(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO sessions VALUES (?, ?, ?, ?)",
                         (token_hash, owner, now(), expires_at))
        await self._run(self._write, add)

    async def session_owner(self, token_hash: str) -> str | None:
        def get(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT owner FROM sessions WHERE token_hash = ? "
                "AND (expires_at IS NULL OR expires_at > ?)", (token_hash, now())).fetchone()
            return None if row is None else str(row[0])
        return await self._read(get)

    async def live_sessions(self, token_hashes: Collection[str]) -> set[str]:
        def get(conn: sqlite3.Connection) -> set[str]:
            # One JSON parameter rather than one per hash: no limit on how many.
            return {str(r[0]) for r in conn.execute(
                "SELECT token_hash FROM sessions WHERE token_hash IN "
                "(SELECT value FROM json_each(?)) AND (expires_at IS NULL OR expires_at > ?)",
                (dumps(list(token_hashes)), now()))}
        return await self._read(get)

    async def sessions_of(self, owner: str) -> list[tuple[str, float, float | None]]:
        def get(conn: sqlite3.Connection) -> list[tuple[str, float, float | None]]:
            return [(str(r[0]), float(r[1]), r[2]) for r in conn.execute(
                "SELECT token_hash, created_at, expires_at FROM sessions WHERE owner = ? "
                "ORDER BY created_at, token_hash", (owner,))]
        return await self._read(get)

    async def revoke_sessions(self, owner: str) -> int:
        def revoke(conn: sqlite3.Connection) -> int:
            return int(conn.execute("DELETE FROM sessions WHERE owner = ?", (owner,)).rowcount)
        return await self._run(self._write, revoke)

    async def add_ticket(self, ticket_hash: str, token_hash: str, expires_at: float) -> None:
        def add(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM tickets WHERE expires_at <= ?", (now(),))
            conn.execute("INSERT INTO tickets VALUES (?, ?, ?)",
                         (ticket_hash, token_hash, expires_at))
        await self._run(self._write, add)

    async def use_ticket(self, ticket_hash: str) -> tuple[str, str] | None:
        def use(conn: sqlite3.Connection) -> tuple[str, str] | None:
            at = now()
            row = conn.execute("DELETE FROM tickets WHERE ticket_hash = ? AND expires_at > ? "
                               "RETURNING token_hash", (ticket_hash, at)).fetchone()
            if row is None:
                return None
            session = conn.execute(
                "SELECT owner FROM sessions WHERE token_hash = ? "
                "AND (expires_at IS NULL OR expires_at > ?)", (row[0], at)).fetchone()
            return None if session is None else (str(session[0]), str(row[0]))
        return await self._run(self._write, use)

    async def claim_session(self, token_hash: str, owner: str) -> int | None:
        def claim(conn: sqlite3.Connection) -> int | None:
            row = conn.execute(
                "SELECT owner FROM sessions WHERE token_hash = ? "
                "AND (expires_at IS NULL OR expires_at > ?)", (token_hash, now())).fetchone()
            if row is None or not str(row[0]).startswith("guest:"):
                return None
            guest = str(row[0])
            clashes = [r[0] for r in conn.execute(guest_clashes_sql("?"), (owner, guest))]
            if clashes:
                raise OwnerConflict(clash_error(clashes))
            moved = conn.execute("UPDATE jobs SET owner = ? WHERE owner = ?",
                                 (owner, guest)).rowcount
            conn.execute("DELETE FROM sessions WHERE owner = ?", (guest,))
            return int(moved)
        moved: int | None = await self._run(self._write, claim)
        self._owners_changed(None)  # the owner, and a guest whose name it did not know
        return moved

    # -- the API's side

    async def submit(self, owner: str, task: str, input: JSON, key: str | None,
                     max_attempts: int, delay: float = 0.0, run_at: float | None = None,
                     place: Placement = DEFAULT_PLACEMENT) -> tuple[Job, bool]:
        cap = self.max_active_jobs

        # Writers are serialised (BEGIN IMMEDIATE, across processes), so the owner's count
        # of active jobs (kept by triggers) is exact until this transaction commits: the
        # cap holds under any concurrency.
        def submit(conn: sqlite3.Connection) -> tuple[tuple[Job, bool], list[Event]]:
            if key is not None:
                row = conn.execute(
                    f"SELECT {JOB_COLUMNS} FROM jobs WHERE owner = ? AND task = ? AND key = ? "
                    f"AND status IN {_ACTIVE_SQL}", (owner, task, key)).fetchone()
                if row is not None:
                    return (job_from_row(row), False), []
            row = conn.execute("SELECT n FROM owner_active WHERE owner = ?",
                               (owner,)).fetchone()
            rank = 0 if row is None else row[0]
            if rank >= cap:
                raise TooManyActive(cap)
            return self._insert_job(conn, owner, task, input, key, max_attempts, rank, place,
                                    delay, run_at)

        return await self._transact(submit)

    async def submit_tick(self, owner: str, task: str, input: JSON, max_attempts: int,
                          tick: float, catch_up: bool = False,
                          place: Placement = DEFAULT_PLACEMENT) -> tuple[Job, bool] | None:
        def fire(conn: sqlite3.Connection) -> tuple[tuple[Job, bool] | None, list[Event]]:
            if conn.execute(fire_tick_sql("?", catch_up), (task, tick)).fetchone() is None:
                return None, []
            row = conn.execute(active_job_sql("?"), (owner, task)).fetchone()
            if row is not None:
                return (job_from_row(row), False), []
            # Rank 0: a tick's job is its periodic's only active job.
            return self._insert_job(conn, owner, task, input, tick_key(tick), max_attempts, 0,
                                    place)

        return await self._transact(fire)

    def _insert_job(self, conn: sqlite3.Connection, owner: str, task: str, input: JSON,
                    key: str | None, max_attempts: int, rank: int, place: Placement,
                    delay: float = 0.0, run_at: float | None = None
                    ) -> tuple[tuple[Job, bool], list[Event]]:
        job_id, at = uuid.uuid4().hex, now()
        # This process's clock: SQLite has no other (docs/guarantees.md).
        due = run_at if run_at is not None else at + delay if delay > 0 else None
        row = conn.execute(
            "INSERT INTO jobs (id, task, key, owner, status, input, max_attempts, seq, "
            "rank, created_at, updated_at, run_at, waiting, priority, queue, limit_key, "
            "limit_max, owner_seq) VALUES (?, ?, ?, ?, 'queued', ?, ?, 1, ?, ?, ?, ?, ?, ?, "
            "?, ?, ?, coalesce((SELECT seq FROM owner_feeds WHERE owner = ?), 0) + 1) "
            f"RETURNING {JOB_COLUMNS}",
            (job_id, task, key, owner, dumps(input), max_attempts, rank, at, at, due,
             due is not None, place.priority, place.queue, place.limit_key, place.limit_max,
             owner)).fetchone()
        ev = self._add_event(conn, job_id, 1, EventType.CREATED,
                             event_data(Status.QUEUED, 0, 0, 0, task=task, key=key,
                                        run_at=iso(due)), at)
        return (job_from_row(row), True), [ev]

    def _job(self, conn: sqlite3.Connection, job_id: str, owner: str | None = None) -> Job:
        job = self._find(conn, job_id, owner)
        assert job is not None
        return job

    @staticmethod
    def _find(conn: sqlite3.Connection, job_id: str, owner: str | None) -> Job | None:
        sql = f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?"
        args: tuple[str, ...] = (job_id,)
        if owner is not None:
            sql, args = sql + " AND owner = ?", (job_id, owner)
        row = conn.execute(sql, args).fetchone()
        return None if row is None else job_from_row(row)

    async def get_job(self, job_id: str, owner: str | None = None) -> Job | None:
        return await self._read(self._find, job_id, owner)

    async def list_jobs(self, owner: str | None, statuses: Collection[Status] | None,
                        limit: int, id_prefix: str | None = None, *, task: str | None = None,
                        since: float | None = None, until: float | None = None,
                        before: tuple[float, str] | None = None) -> list[Job]:
        def get(conn: sqlite3.Connection) -> list[Job]:
            sql, args = f"SELECT {JOB_COLUMNS} FROM jobs WHERE true", list[object]()
            if owner is not None:
                sql += " AND owner = ?"
                args.append(owner)
            if id_prefix is not None:  # substr, not LIKE: no wildcards, case-sensitive
                sql += " AND substr(id, 1, ?) = ?"
                args += [len(id_prefix), id_prefix]
            if statuses is not None:
                sql += f" AND status IN ({', '.join('?' * len(statuses))})"
                args += [s.value for s in statuses]
            for clause, value in (("task = ?", task), ("created_at >= ?", since),
                                  ("created_at < ?", until)):
                if value is not None:
                    sql += f" AND {clause}"
                    args.append(value)
            if before is not None:
                sql += " AND (created_at, id) < (?, ?)"
                args += before
            sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
            rows = conn.execute(sql, (*args, limit)).fetchall()
            return [job_from_row(r) for r in rows]
        return await self._read(get)

    @staticmethod
    def _items(conn: sqlite3.Connection, job_id: str) -> list[Item]:
        return [item_from_row(r) for r in conn.execute(
            "SELECT ref, status, result, error FROM items WHERE job_id = ? ORDER BY pos",
            (job_id,))]

    async def job_with_items(self, job_id: str, owner: str | None = None
                             ) -> tuple[Job, list[Item]] | None:
        def get(conn: sqlite3.Connection) -> tuple[Job, list[Item]] | None:
            conn.execute("BEGIN")  # one read snapshot for both queries
            try:
                job = self._find(conn, job_id, owner)
                return None if job is None else (job, self._items(conn, job_id))
            finally:
                conn.execute("COMMIT")
        return await self._read(get)

    async def count_by_status(self, owner: str | None = None) -> dict[str, int]:
        def get(conn: sqlite3.Connection) -> dict[str, int]:
            if owner is None:
                return dict(conn.execute("SELECT status, count(*) FROM jobs GROUP BY status"))
            return dict(conn.execute("SELECT status, count(*) FROM jobs WHERE owner = ? "
                                     "GROUP BY status", (owner,)))
        return await self._read(get)

    async def events(self, job_id: str, after: int, limit: int = 1000) -> list[Event]:
        def get(conn: sqlite3.Connection) -> list[Event]:
            rows = conn.execute(
                "SELECT seq, type, data, at FROM events WHERE job_id = ? AND seq > ? "
                "ORDER BY seq LIMIT ?", (job_id, after, limit)).fetchall()
            return [Event(job=job_id, seq=r[0], type=r[1], data=loads(r[2]), at=r[3])
                    for r in rows]
        return await self._read(get)

    async def request_cancel(self, job_id: str, owner: str) -> Job | None:
        def cancel(conn: sqlite3.Connection) -> tuple[Job | None, list[Event]]:
            job = self._find(conn, job_id, owner)
            if job is None or job.status.terminal or job.cancel_requested:
                return job, []
            at = now()
            if job.status == Status.QUEUED:
                check_job_transition(job.status, Status.CANCELLED)
                row = conn.execute(
                    "UPDATE jobs SET status = 'cancelled', seq = seq + 1, updated_at = ?, "
                    "finished_at = ?, cancel_requested = 1 WHERE id = ? "
                    "RETURNING seq, total, done, failed", (at, at, job_id)).fetchone()
                kind, status = EventType.CANCELLED, Status.CANCELLED
            else:
                row = conn.execute(
                    "UPDATE jobs SET cancel_requested = 1, seq = seq + 1, updated_at = ? "
                    "WHERE id = ? RETURNING seq, total, done, failed", (at, job_id)).fetchone()
                kind, status = EventType.CANCEL_REQUESTED, Status.RUNNING
            ev = self._add_event(conn, job_id, row[0], kind,
                                 event_data(status, row[1], row[2], row[3]), at)
            return self._job(conn, job_id), [ev]

        return await self._transact(cancel)

    async def delete_job(self, job_id: str, owner: str) -> bool:
        def delete(conn: sqlite3.Connection) -> bool:
            job = self._find(conn, job_id, owner)
            if job is None:
                return False
            if job.status.active:
                raise JobActive(f"job {job_id} is {job.status}; cancel it first")
            conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            return True
        deleted: bool = await self._run(self._write, delete)
        self._owners_changed(owner)
        return deleted

    # -- the worker's side

    async def claim(self, worker: str, tasks: Collection[str], limit: int,
                    lease_seconds: float, queues: Collection[str] | None = None) -> list[Job]:
        if not claims(tasks, limit, queues):
            return []
        jobs: list[Job] = await self._transact(
            self._claim, worker, tasks, limit, lease_seconds, queues)
        return jobs

    def _claim(self, conn: sqlite3.Connection, worker: str, tasks: Collection[str],
               limit: int, lease_seconds: float, queues: Collection[str] | None
               ) -> tuple[list[Job], list[Event]]:
        at = now()
        # Waiting jobs whose run_at has come join the claimable ones (the index of the
        # claim order); found through their own index, only those that are due.
        conn.execute(
            "UPDATE jobs SET waiting = 0 WHERE id IN (SELECT id FROM jobs "
            "WHERE status = 'queued' AND waiting = 1 AND run_at <= ? "
            "ORDER BY run_at LIMIT ?)", (at, PROMOTE_BATCH))
        rows = conn.execute(claim_sql(len(tasks), None if queues is None else len(queues)),
                            (worker, at + lease_seconds, at, *tasks, *(queues or ()),
                             limit)).fetchall()
        jobs = [job_from_row(r) for r in rows]
        events = self._add_events(conn, [make_event(
            job.id, job.seq, EventType.STARTED,
            event_data(Status.RUNNING, *job.progress.as_dict().values(), attempt=job.attempt),
            at) for job in jobs])
        return jobs, events

    async def finish_and_claim(
        self, ends: Sequence[End], worker: str, tasks: Collection[str], limit: int,
        lease_seconds: float, queues: Collection[str] | None = None,
    ) -> tuple[list[Written | Exception], list[Job]]:
        # Encoded first, so that a result that is not JSON fails its own end alone.
        checked = [encoded_end(end) for end in ends]
        wanted = claims(tasks, limit, queues)

        def write(conn: sqlite3.Connection
                  ) -> tuple[tuple[list[Written | Exception], list[Job]], list[Event]]:
            outcomes: list[Written | Exception] = []
            events: list[Event] = []
            for end, encoded in zip(ends, checked, strict=True):
                if isinstance(encoded, Exception):
                    outcomes.append(encoded)
                    continue
                try:
                    written = self._finish(conn, end, encoded)
                except LeaseLost as exc:  # raised before this end wrote anything
                    outcomes.append(exc)
                    continue
                outcomes.append(written)
                events += written.events
            self._add_events(conn, events)
            jobs: list[Job] = []
            if wanted:
                jobs, claimed = self._claim(conn, worker, tasks, limit, lease_seconds, queues)
                events += claimed
            return (outcomes, jobs), events

        if not wanted and all(isinstance(e, Exception) for e in checked):
            return [e for e in checked if isinstance(e, Exception)], []
        done: tuple[list[Written | Exception], list[Job]] = await self._transact(write)
        return done

    async def heartbeat(self, leases: Sequence[Lease], lease_seconds: float) -> dict[str, bool]:
        if not leases:
            return {}

        def beat(conn: sqlite3.Connection) -> dict[str, bool]:
            held: dict[str, bool] = {}
            until = now() + lease_seconds
            for lease in leases:
                row = conn.execute(
                    "UPDATE jobs SET lease_until = ? WHERE id = ? AND status = 'running' "
                    "AND worker = ? AND attempt = ? RETURNING cancel_requested",
                    (until, lease.job, lease.worker, lease.attempt)).fetchone()
                if row is not None:
                    held[lease.job] = bool(row[0])
            return held
        return await self._run(self._write, beat)

    async def declare_items(self, lease: Lease, refs: Sequence[str]) -> tuple[Written, list[Item]]:
        def declare(conn: sqlite3.Connection
                    ) -> tuple[tuple[Written, list[Item]], list[Event]]:
            existing = {r[0] for r in conn.execute(
                "SELECT ref FROM items WHERE job_id = ?", (lease.job,))}
            fresh = list(dict.fromkeys(r for r in refs if r not in existing))
            start = len(existing)
            conn.executemany(
                "INSERT INTO items (job_id, ref, pos, status) VALUES (?, ?, ?, 'pending')",
                [(lease.job, ref, start + i) for i, ref in enumerate(fresh)])
            seq, status, total, done, failed, cancel = self._fenced(
                conn, lease, ", total = total + ?", (len(fresh),))
            events = []
            if fresh:
                events.append(self._add_event(conn, lease.job, seq, EventType.ITEMS,
                                              event_data(status, total, done, failed,
                                                         refs=fresh), now()))
            else:  # nothing changed: undo the seq bump rather than log an empty event
                conn.execute("UPDATE jobs SET seq = seq - 1 WHERE id = ?", (lease.job,))
            items = self._items(conn, lease.job)
            return (Written(events, cancel), items), events

        return await self._transact(declare)

    async def update_items(self, lease: Lease, updates: Sequence[ItemUpdate]) -> Written:
        def update(conn: sqlite3.Connection) -> tuple[Written, list[Event]]:
            events: list[Event] = []
            cancel = False
            if not conn.execute("SELECT 1 FROM jobs WHERE id = ? AND status = 'running' "
                                "AND worker = ? AND attempt = ?",
                                (lease.job, lease.worker, lease.attempt)).fetchone():
                raise lease_lost(lease)  # a stale worker hears that, not about items
            for u in updates:
                row = conn.execute("SELECT status FROM items WHERE job_id = ? AND ref = ?",
                                   (lease.job, u.ref)).fetchone()
                if row is None:
                    raise UnknownItem(f"item {u.ref!r} was not declared")
                old = ItemStatus(row[0])
                check_item_transition(old, u.status)
                d_done, d_failed = counts_delta(old, u.status)
                seq, status, total, done, failed, cancel = self._fenced(
                    conn, lease, ", done = done + ?, failed = failed + ?", (d_done, d_failed))
                conn.execute(
                    "UPDATE items SET status = ?, result = ?, error = ? "
                    "WHERE job_id = ? AND ref = ?",
                    (u.status.value, dumps(u.result), u.error, lease.job, u.ref))
                extra = item_change(u.ref, u.status, u.result, u.error)
                events.append(self._add_event(conn, lease.job, seq, EventType.ITEM,
                                              event_data(status, total, done, failed, **extra),
                                              now()))
            return Written(events, cancel), events
        return await self._transact(update)

    async def report(self, lease: Lease, info: JSON) -> Written:
        def report(conn: sqlite3.Connection) -> tuple[Written, list[Event]]:
            seq, status, total, done, failed, cancel = self._fenced(
                conn, lease, ", info = ?", (dumps(info),))
            ev = self._add_event(conn, lease.job, seq, EventType.PROGRESS,
                                 event_data(status, total, done, failed, info=info), now())
            return Written([ev], cancel), [ev]
        return await self._transact(report)

    async def finish(self, lease: Lease, status: Status, result: JSON = None,
                     error: str | None = None) -> Written:
        check_end(status)
        end, encoded = End(lease, status, result, error), dumps(result)

        def finish(conn: sqlite3.Connection) -> tuple[Written, list[Event]]:
            written = self._finish(conn, end, encoded)
            return written, self._add_events(conn, written.events)
        return await self._transact(finish)

    def _finish(self, conn: sqlite3.Connection, end: End, encoded: str) -> Written:
        """Record an end, but not its event (the caller writes the events of all its ends
        at once); LeaseLost, before writing anything, if the lease is not held."""
        at = now()
        seq, _, total, done, failed, cancel = self._fenced(
            conn, end.lease, ", status = ?, result = ?, error = ?, finished_at = ?, "
            "worker = NULL, lease_until = NULL", (end.status.value, encoded, end.error, at))
        # Items are counted in total: a job without any has none left running.
        reset = self._reset_running(conn, end.lease.job) if total else []
        ev = make_event(end.lease.job, seq, EventType(end.status.value),
                        event_data(end.status, total, done, failed, result=end.result,
                                   error=end.error, reset=reset), at)
        return Written([ev], cancel)

    async def hand_back(self, leases: Sequence[Lease]) -> int:
        def hand_back(conn: sqlite3.Connection) -> tuple[int, list[Event]]:
            at = now()
            events = []
            for lease in leases:
                # Fenced like every write of a worker: only the lease's holder, same attempt.
                row = conn.execute(
                    "UPDATE jobs SET status = 'queued', error = ?, worker = NULL, "
                    "lease_until = NULL, attempt = attempt - 1, run_at = ?, seq = seq + 1, "
                    "updated_at = ? WHERE id = ? AND status = 'running' AND worker = ? "
                    "AND attempt = ? AND NOT cancel_requested "
                    "RETURNING seq, total, done, failed, attempt",
                    (HANDED_BACK, at, at, lease.job, lease.worker, lease.attempt)).fetchone()
                if row is None:
                    continue
                seq, total, done, failed, attempt = row
                events.append(self._add_event(conn, lease.job, seq, EventType.RETRYING,
                                              retrying_data(total, done, failed, attempt,
                                                            HANDED_BACK, iso(at),
                                                            self._reset_running(conn, lease.job)),
                                              at))
            return len(events), events
        return await self._transact(hand_back) if leases else 0

    async def retry(self, lease: Lease, error: str, delay: float) -> Written:
        def retry(conn: sqlite3.Connection) -> tuple[Written, list[Event]]:
            at = now()
            run_at = at + delay
            seq, _, total, done, failed, cancel = self._fenced(
                conn, lease, ", status = 'queued', error = ?, worker = NULL, "
                "lease_until = NULL, run_at = ?, waiting = 1", (error, run_at))
            ev = self._add_event(conn, lease.job, seq, EventType.RETRYING, retrying_data(
                total, done, failed, lease.attempt, error, iso(run_at),
                self._reset_running(conn, lease.job)), at)
            return Written([ev], cancel), [ev]
        return await self._transact(retry)

    # -- maintenance

    async def expire_leases(self) -> int:
        def expire(conn: sqlite3.Connection) -> tuple[int, list[Event]]:
            at = now()
            rows = conn.execute(
                "SELECT id, attempt, max_attempts, cancel_requested FROM jobs "
                "WHERE status = 'running' AND lease_until < ?", (at,)).fetchall()
            events = []
            for job_id, attempt, max_attempts, cancel in rows:
                outcome = expiry_outcome(attempt, max_attempts, bool(cancel))
                error = lease_expired_error(attempt, max_attempts, outcome == Status.QUEUED)
                reset = self._reset_running(conn, job_id)
                finished = at if outcome.terminal else None
                # Retried at once (run_at now, not waiting): the worker died, not the task.
                seq, total, done, failed = conn.execute(
                    "UPDATE jobs SET status = ?, error = ?, worker = NULL, lease_until = NULL, "
                    "seq = seq + 1, updated_at = ?, finished_at = ?, "
                    "run_at = CASE WHEN ? THEN ? ELSE run_at END WHERE id = ? "
                    "RETURNING seq, total, done, failed",
                    (outcome.value, error, at, finished, outcome == Status.QUEUED, at,
                     job_id)).fetchone()
                kind, data = expiry_event(outcome, total, done, failed, attempt, error, at,
                                          reset)
                events.append(self._add_event(conn, job_id, seq, kind, data, at))
            return len(events), events
        return await self._transact(expire)

    async def prune(self, finished_before: float) -> int:
        def prune(conn: sqlite3.Connection) -> int:
            conn.execute("DELETE FROM sessions WHERE expires_at <= ?", (now(),))
            pruned = conn.execute(
                f"DELETE FROM jobs WHERE status IN {_TERMINAL_SQL} AND finished_at < ?",
                (finished_before,)).rowcount
            # The floor first: a cursor below a pruned tombstone must get the whole list.
            conn.execute(
                "UPDATE owner_feeds SET floor = max(floor, (SELECT max(owner_seq) FROM "
                "job_tombstones AS t WHERE t.owner = owner_feeds.owner AND t.at < ?)) "
                "WHERE owner IN (SELECT owner FROM job_tombstones WHERE at < ?)",
                (finished_before, finished_before))
            conn.execute("DELETE FROM job_tombstones WHERE at < ?", (finished_before,))
            conn.execute("DELETE FROM owner_active WHERE n = 0")
            return int(pruned)
        pruned: int = await self._run(self._write, prune)
        if pruned:
            self._owners_changed(None)
        return pruned

    async def owner_changes(self, owner: str, after: int) -> OwnerChanges:
        def get(conn: sqlite3.Connection) -> OwnerChanges:
            conn.execute("BEGIN")  # one read snapshot for all three queries
            try:
                seq, floor = conn.execute(
                    "SELECT seq, floor FROM owner_feeds WHERE owner = ?", (owner,)
                ).fetchone() or (0, 0)
                reset = not floor <= after <= seq or after == 0
                since = 0 if reset else after
                jobs = [job_from_row(r) for r in conn.execute(
                    f"SELECT {JOB_COLUMNS} FROM jobs WHERE owner = ? AND owner_seq > ? "
                    "ORDER BY created_at DESC, id DESC", (owner, -1 if reset else since))]
                gone = [] if reset else [r[0] for r in conn.execute(
                    "SELECT job_id FROM job_tombstones WHERE owner = ? AND owner_seq > ?",
                    (owner, since))]
                return OwnerChanges(seq, reset, jobs, gone)
            finally:
                conn.execute("COMMIT")
        return await self._read(get)

