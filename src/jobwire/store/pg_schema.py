"""PostgreSQL schema migrations: numbered scripts applied in order, recorded in a table,
serialised across processes by an advisory lock."""

from __future__ import annotations

from typing import Any

import psycopg

from jobwire.model import now
from jobwire.store.base import StoreError
from jobwire.store.rows import CLAIM_ORDER

ACTIVE_SQL = "('queued', 'running')"
TERMINAL_SQL = "('completed', 'failed', 'cancelled')"

# Migration 3, and again in 4 for a database that has another 3 (see there).
_PERIODIC_TICKS = ("CREATE TABLE IF NOT EXISTS periodic_ticks "
                   "(task text PRIMARY KEY, tick double precision NOT NULL);")


def _stamp_prelude(flag: str) -> str:
    """The start of an owner feed's commit-time stamp (migrations "Owner feeds" and its
    second and third forms): one firing per transaction, the one that sets the setting
    named by the SQL expression `flag`, stamps all its marks."""
    return f"""RETURNS trigger LANGUAGE plpgsql
        SET search_path FROM CURRENT AS $$
    DECLARE
        channel text := left('jobwire:' || TG_TABLE_SCHEMA, 63);
        who text;
        bumped bigint;
    BEGIN
        IF current_setting({flag}, true) = 'y' THEN
            RETURN NULL;  -- one firing per transaction stamps all its marks
        END IF;
        PERFORM set_config({flag}, 'y', true);"""


# The stamp's flag: one for all schemas, then (from the third form on) one per schema.
_STAMPED_ONCE = "'jobwire.stamped'"
_STAMPED = "'jobwire.stamped_' || encode(convert_to(TG_TABLE_SCHEMA, 'UTF8'), 'hex')"
# The stamp's work on job_feed (migration "Owner feeds, second form" and on).
_FEED_STAMP = """\
        FOR who IN SELECT DISTINCT owner FROM job_feed WHERE owner_seq = -1 ORDER BY 1 LOOP
            INSERT INTO owner_feeds AS f (owner, seq) VALUES (who, 1)
                ON CONFLICT (owner) DO UPDATE SET seq = f.seq + 1 RETURNING f.seq INTO bumped;
            UPDATE job_feed SET owner_seq = bumped WHERE owner = who AND owner_seq = -1;
            PERFORM pg_notify(channel, json_build_object('owner', who, 'oseq', bumped)::text);
        END LOOP;
        RETURN NULL;
    END $$;
"""

# Timestamps are epoch seconds (double precision) so snapshots render exactly as on
# SQLite; JSON is `json`, not `jsonb`, so objects keep the key order they were given.
MIGRATIONS: list[str] = [
    f"""
    CREATE TABLE jobs (
        id text PRIMARY KEY,
        task text NOT NULL,
        key text,
        owner text NOT NULL,
        status text NOT NULL CHECK (status IN {ACTIVE_SQL[:-1]}, {TERMINAL_SQL[1:]}),
        input json NOT NULL,
        total integer NOT NULL DEFAULT 0,
        done integer NOT NULL DEFAULT 0,
        failed integer NOT NULL DEFAULT 0,
        result json,
        error text,
        info json,
        attempt integer NOT NULL DEFAULT 0,
        max_attempts integer NOT NULL CHECK (max_attempts >= 1),
        seq integer NOT NULL,
        cancel_requested boolean NOT NULL DEFAULT false,
        worker text,
        lease_until double precision,
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL,
        finished_at double precision,
        CHECK (done >= 0 AND failed >= 0 AND done + failed <= total),
        CHECK ((status IN {TERMINAL_SQL}) = (finished_at IS NOT NULL))
    );
    -- At most one active job per (owner, task, key): the database decides, not Python.
    CREATE UNIQUE INDEX jobs_dedup ON jobs (owner, task, key)
        WHERE key IS NOT NULL AND status IN {ACTIVE_SQL};
    CREATE INDEX jobs_by_owner ON jobs (owner, created_at DESC);
    CREATE INDEX jobs_queue ON jobs (created_at) WHERE status = 'queued';
    CREATE INDEX jobs_leases ON jobs (lease_until) WHERE status = 'running';
    CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
    CREATE TABLE items (
        job_id text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        ref text NOT NULL,
        pos integer NOT NULL,
        status text NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
        result json,
        error text,
        PRIMARY KEY (job_id, ref)
    );
    CREATE TABLE events (
        job_id text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        seq integer NOT NULL,
        type text NOT NULL,
        data json NOT NULL,
        at double precision NOT NULL,
        PRIMARY KEY (job_id, seq)
    );
    CREATE TABLE sessions (
        token_hash text PRIMARY KEY,
        owner text NOT NULL,
        created_at double precision NOT NULL,
        expires_at double precision
    );
    """,
    # Fair claiming and the per-owner cap (see PostgresStore.submit). Jobs queued before
    # this migration get rank 0, as if each were its owner's first.
    f"""
    ALTER TABLE jobs ADD COLUMN rank integer NOT NULL DEFAULT 0;
    DROP INDEX jobs_queue;
    CREATE INDEX jobs_queue ON jobs (rank, created_at) WHERE status = 'queued';
    CREATE INDEX jobs_active ON jobs (owner) WHERE status IN {ACTIVE_SQL};
    """,
    # Periodic jobs (see PostgresStore.submit_tick): the last tick each one fired.
    _PERIODIC_TICKS,
    # Single-use stand-ins for a session's token in URLs (SSE), short-lived. (IF NOT
    # EXISTS: a database made by the tickets branch before it followed periodic_ticks
    # has tickets as its 3; the periodic_ticks it lacks comes here.)
    f"""
    {_PERIODIC_TICKS}
    CREATE TABLE IF NOT EXISTS tickets (
        ticket_hash text PRIMARY KEY,
        token_hash text NOT NULL,
        expires_at double precision NOT NULL
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
    # Delayed jobs and retries after a backoff (see PostgresStore.claim). A `waiting` job
    # is queued but may not be claimed before its `run_at`: it is indexed by run_at alone,
    # so claims never scan the jobs whose time has not come.
    """
    ALTER TABLE jobs ADD COLUMN run_at double precision;
    ALTER TABLE jobs ADD COLUMN waiting boolean NOT NULL DEFAULT false;
    DROP INDEX jobs_queue;
    CREATE INDEX jobs_queue ON jobs (rank, created_at) WHERE status = 'queued' AND NOT waiting;
    CREATE INDEX jobs_waiting ON jobs (run_at) WHERE status = 'queued' AND waiting;
    """,
    # Owner feeds (see OwnerChanges): triggers, so that no write path can forget a bump.
    # A changed row (or a tombstone) is first marked pending (owner_seq -1). At commit, a
    # deferred trigger gives each owner the transaction changed one new seq, locking the
    # owners' rows in name order until commit: so one owner's seqs commit in order, and
    # as the transaction then waits on nothing but other committers' owner rows, taken in
    # the same order, the new locks can form no deadlock with the job rows' (see
    # test_pg_lock_order.py). The notification goes out at that commit.
    f"""
    CREATE TABLE owner_feeds (
        owner text PRIMARY KEY,
        seq bigint NOT NULL,
        floor bigint NOT NULL DEFAULT 0  -- the newest tombstone pruned
    );
    ALTER TABLE jobs ADD COLUMN owner_seq bigint NOT NULL DEFAULT 0;
    CREATE INDEX jobs_owner_seq ON jobs (owner, owner_seq);
    CREATE TABLE job_tombstones (
        owner text NOT NULL,
        job_id text NOT NULL,
        owner_seq bigint NOT NULL,
        at double precision NOT NULL,
        PRIMARY KEY (owner, job_id)
    );
    CREATE INDEX job_tombstones_seq ON job_tombstones (owner, owner_seq);
    CREATE INDEX job_tombstones_at ON job_tombstones (at);
    CREATE FUNCTION jobwire_jobs_mark() RETURNS trigger LANGUAGE plpgsql
        SET search_path FROM CURRENT AS $$
    BEGIN
        IF TG_OP = 'DELETE' OR TG_OP = 'UPDATE' AND OLD.owner IS DISTINCT FROM NEW.owner THEN
            INSERT INTO job_tombstones VALUES (OLD.owner, OLD.id, -1,
                extract(epoch FROM clock_timestamp()))
                ON CONFLICT (owner, job_id) DO UPDATE SET owner_seq = -1, at = EXCLUDED.at;
        END IF;
        IF TG_OP = 'DELETE' THEN
            RETURN OLD;
        END IF;
        NEW.owner_seq := -1;
        RETURN NEW;
    END $$;
    CREATE FUNCTION jobwire_jobs_stamp() {_stamp_prelude(_STAMPED_ONCE)}
        FOR who IN SELECT owner FROM jobs WHERE owner_seq = -1
                   UNION SELECT owner FROM job_tombstones WHERE owner_seq = -1
                   ORDER BY 1 LOOP
            INSERT INTO owner_feeds AS f (owner, seq) VALUES (who, 1)
                ON CONFLICT (owner) DO UPDATE SET seq = f.seq + 1 RETURNING f.seq INTO bumped;
            UPDATE jobs SET owner_seq = bumped WHERE owner = who AND owner_seq = -1;
            UPDATE job_tombstones SET owner_seq = bumped WHERE owner = who AND owner_seq = -1;
            PERFORM pg_notify(channel, json_build_object('owner', who, 'oseq', bumped)::text);
        END LOOP;
        RETURN NULL;
    END $$;
    CREATE INDEX jobs_owner_pending ON jobs (owner) WHERE owner_seq = -1;
    CREATE INDEX job_tombstones_pending ON job_tombstones (owner) WHERE owner_seq = -1;
    CREATE TRIGGER jobs_feed_insert BEFORE INSERT ON jobs
        FOR EACH ROW EXECUTE FUNCTION jobwire_jobs_mark();
    CREATE TRIGGER jobs_feed_update BEFORE UPDATE OF status, owner ON jobs FOR EACH ROW
        WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.owner IS DISTINCT FROM NEW.owner)
        EXECUTE FUNCTION jobwire_jobs_mark();
    CREATE TRIGGER jobs_feed_delete AFTER DELETE ON jobs
        FOR EACH ROW EXECUTE FUNCTION jobwire_jobs_mark();
    CREATE CONSTRAINT TRIGGER jobs_feed_stamp AFTER INSERT OR UPDATE OF status, owner OR DELETE
        ON jobs DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION jobwire_jobs_stamp();
    """,
    # Priorities, queues and concurrency limits (see PostgresStore.claim). The claim order
    # walks jobs_queue. A limit key's row in job_limits counts its running jobs: claims
    # add to it in one upsert (which locks the row and reads its latest version, so
    # concurrent claims of one key take turns and never overshoot `limit_max`), and a
    # trigger takes off the jobs that stop running, whatever the statement. Both lock
    # the rows of several keys in key order, and before no job row: no deadlock.
    f"""
    ALTER TABLE jobs ADD COLUMN priority integer NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN queue text NOT NULL DEFAULT 'default';
    ALTER TABLE jobs ADD COLUMN limit_key text;
    ALTER TABLE jobs ADD COLUMN limit_max integer CHECK (limit_max >= 1);
    DROP INDEX jobs_queue;
    CREATE INDEX jobs_queue ON jobs ({CLAIM_ORDER}) WHERE status = 'queued' AND NOT waiting;
    CREATE TABLE job_limits (
        key text PRIMARY KEY,
        running integer NOT NULL CHECK (running >= 0),
        limit_max integer NOT NULL,
        granted integer NOT NULL  -- to the last claim that upserted the row
    );
    CREATE FUNCTION jobwire_limits_release() RETURNS trigger LANGUAGE plpgsql
        SET search_path FROM CURRENT AS $$
    BEGIN
        IF NOT EXISTS (SELECT FROM old_jobs WHERE status = 'running'
                       AND limit_key IS NOT NULL) THEN
            RETURN NULL;  -- no limited job was running: the common statement
        END IF;
        WITH released AS (SELECT o.limit_key AS key, count(*)::integer AS n
            FROM old_jobs o JOIN new_jobs n ON n.id = o.id
            WHERE o.status = 'running' AND n.status <> 'running' AND o.limit_key IS NOT NULL
            GROUP BY o.limit_key),
        locked AS MATERIALIZED (SELECT l.key, r.n FROM job_limits l JOIN released r ON r.key = l.key
            ORDER BY l.key FOR NO KEY UPDATE OF l)
        UPDATE job_limits l SET running = l.running - locked.n FROM locked
            WHERE l.key = locked.key;
        RETURN NULL;
    END $$;
    CREATE TRIGGER jobs_limits_release AFTER UPDATE ON jobs
        REFERENCING OLD TABLE AS old_jobs NEW TABLE AS new_jobs
        FOR EACH STATEMENT EXECUTE FUNCTION jobwire_limits_release();
    CREATE FUNCTION jobwire_limits_delete() RETURNS trigger LANGUAGE plpgsql
        SET search_path FROM CURRENT AS $$
    BEGIN
        UPDATE job_limits SET running = running - 1 WHERE key = OLD.limit_key;
        RETURN NULL;
    END $$;
    CREATE TRIGGER jobs_limits_delete AFTER DELETE ON jobs FOR EACH ROW
        WHEN (OLD.status = 'running' AND OLD.limit_key IS NOT NULL)
        EXECUTE FUNCTION jobwire_limits_delete();
    """,
    # Sessions by owner (a claim or revoke removes an owner's sessions; `users tokens` lists
    # them) and by expiry (the prune): neither may scan every session a flood left behind.
    """
    CREATE INDEX sessions_owner ON sessions (owner);
    CREATE INDEX sessions_expiry ON sessions (expires_at) WHERE expires_at IS NOT NULL;
    """,
    # Owner feeds, second form: the stamps move off the wide jobs row (a dozen indexes,
    # written twice per status change) into a narrow job_feed row per (owner, job), which
    # also holds the tombstones (`at` set: the job was deleted or moved to another owner).
    # Marks are row triggers filtered by WHEN, so heartbeats and progress call none (a
    # statement trigger fires for every update); AFTER, so an insert a conflict skipped
    # marks nothing. The commit's stamp, its lock order (owner rows in name order, after
    # every job row) and its notification are as before. Existing seqs are carried over,
    # so clients' cursors stay valid; the lock lets transactions that marked under the old
    # triggers commit (and stamp) first.
    f"""
    LOCK TABLE jobs IN EXCLUSIVE MODE;
    CREATE TABLE job_feed (
        owner text NOT NULL,
        job_id text NOT NULL,
        owner_seq bigint NOT NULL,  -- -1: pending, until the commit stamps it
        at double precision,  -- a tombstone's time, for the prune
        PRIMARY KEY (owner, job_id)
    );
    INSERT INTO job_feed SELECT owner, id, owner_seq, NULL FROM jobs;
    -- (A job moved away and back has both: its live row is the newer.)
    INSERT INTO job_feed SELECT owner, job_id, owner_seq, at FROM job_tombstones
        ON CONFLICT DO NOTHING;
    CREATE INDEX job_feed_seq ON job_feed (owner, owner_seq);
    CREATE INDEX job_feed_pending ON job_feed (owner) WHERE owner_seq = -1;
    CREATE INDEX job_feed_gone ON job_feed (at) WHERE at IS NOT NULL;
    DROP TRIGGER jobs_feed_insert ON jobs;
    DROP TRIGGER jobs_feed_update ON jobs;
    DROP TRIGGER jobs_feed_delete ON jobs;
    DROP TRIGGER jobs_feed_stamp ON jobs;
    DROP FUNCTION jobwire_jobs_mark();
    DROP FUNCTION jobwire_jobs_stamp();
    DROP TABLE job_tombstones;
    ALTER TABLE jobs DROP COLUMN owner_seq;  -- with its indexes
    CREATE FUNCTION jobwire_feed_mark() RETURNS trigger LANGUAGE plpgsql
        SET search_path FROM CURRENT AS $$
    BEGIN
        IF TG_OP = 'DELETE' OR TG_OP = 'UPDATE' AND OLD.owner <> NEW.owner THEN
            INSERT INTO job_feed AS f
                VALUES (OLD.owner, OLD.id, -1, extract(epoch FROM clock_timestamp()))
                ON CONFLICT (owner, job_id) DO UPDATE SET owner_seq = -1, at = EXCLUDED.at;
        END IF;
        IF TG_OP <> 'DELETE' THEN
            -- (A row already pending in this transaction is not written again.)
            INSERT INTO job_feed AS f VALUES (NEW.owner, NEW.id, -1, NULL)
                ON CONFLICT (owner, job_id) DO UPDATE SET owner_seq = -1, at = NULL
                WHERE f.owner_seq <> -1 OR f.at IS NOT NULL;
        END IF;
        RETURN NULL;
    END $$;
    CREATE FUNCTION jobwire_feed_stamp() {_stamp_prelude(_STAMPED_ONCE)}
{_FEED_STAMP}    CREATE TRIGGER jobs_feed_insert AFTER INSERT ON jobs
        FOR EACH ROW EXECUTE FUNCTION jobwire_feed_mark();
    CREATE TRIGGER jobs_feed_update AFTER UPDATE OF status, owner ON jobs FOR EACH ROW
        WHEN (OLD.status <> NEW.status OR OLD.owner <> NEW.owner)
        EXECUTE FUNCTION jobwire_feed_mark();
    CREATE TRIGGER jobs_feed_delete AFTER DELETE ON jobs
        FOR EACH ROW EXECUTE FUNCTION jobwire_feed_mark();
    CREATE CONSTRAINT TRIGGER job_feed_stamp AFTER INSERT OR UPDATE ON job_feed
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.owner_seq = -1)
        EXECUTE FUNCTION jobwire_feed_stamp();
    """,
    # Owner feeds, third form: the flag that lets one firing of the stamp per transaction
    # stamp all its marks is one per schema. With one flag, a transaction that wrote
    # jobs in two jobwire schemas stamped only the first: the second's changes stayed
    # unstamped, out of its owners' feeds for good.
    f"""
    CREATE OR REPLACE FUNCTION jobwire_feed_stamp() {_stamp_prelude(_STAMPED)}
{_FEED_STAMP}    """,
]

_LOCK_CLASS = 0x6A77  # "jw": the advisory-lock namespace of jobwire migrations


async def migrate(conn: psycopg.AsyncConnection[Any]) -> int:
    """Apply pending migrations in one transaction; returns the schema version.

    A second process starting at the same moment waits on the advisory lock, then
    finds the work done. The lock is keyed by schema, so schemas migrate independently.
    """
    cur = await conn.execute("SELECT current_schema()")
    if (row := await cur.fetchone()) is None or row[0] is None:
        raise StoreError("no schema to create tables in: the search_path names none that "
                         "exists (CREATE SCHEMA it first)")
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(current_schema()))",
                           (_LOCK_CLASS,))
        await conn.execute("CREATE TABLE IF NOT EXISTS jobwire_migrations ("
                           "version integer PRIMARY KEY, applied_at double precision NOT NULL)")
        cur = await conn.execute("SELECT coalesce(max(version), 0) FROM jobwire_migrations")
        row = await cur.fetchone()
        version = int(row[0]) if row else 0
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            await conn.execute(script.encode())  # no parameters: several statements allowed
            await conn.execute("INSERT INTO jobwire_migrations VALUES (%s, %s)", (number, now()))
        return max(version, len(MIGRATIONS))
