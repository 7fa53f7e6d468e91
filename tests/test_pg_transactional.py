"""Submitting in the host application's own PostgreSQL transaction (`jobwire.pg`): the
job, its `created` event and its notification exist if and only if the host commits;
dedup and the per-owner cap hold across host transactions; the host's connection keeps
its settings. The host connects without jobwire's search_path and names the schema."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import psycopg
import pytest
import websockets
from psycopg import sql
from psycopg.rows import dict_row

import jobwire.pg
from jobwire.app import InputError
from jobwire.model import Event
from jobwire.store import StoreError, TooManyActive, open_store
from jobwire.store.pg_listen import channel_of
from tests.conftest import Client, Proc, fresh_db, guest
from tests.tasks import jobwire as tasks
from tests.wsframes import Messages

TERMINAL = {"completed", "failed", "cancelled"}


class Rollback(Exception):
    """Raised in a host transaction to roll it back."""


def split(url: str) -> tuple[str, str]:
    """(the URL without jobwire's search_path, the schema it named)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    schema = query.pop("options").removeprefix("-csearch_path=")
    return urlunsplit(parts._replace(query="")), schema


@pytest.fixture
async def migrated(pg_url: str) -> str:
    """pg_url, with jobwire's tables in its schema."""
    store = open_store(pg_url)
    await store.open()
    await store.close()
    return pg_url


@pytest.fixture
async def host(migrated: str) -> AsyncIterator[tuple[psycopg.AsyncConnection[Any], str]]:
    """The host application's connection: its own search_path (not jobwire's schema), a
    dict row factory, autocommit (transactions by `conn.transaction()`)."""
    base, schema = split(migrated)
    conn = await psycopg.AsyncConnection.connect(base, autocommit=True, row_factory=dict_row,
                                                 application_name=schema)
    yield conn, schema
    await conn.close()


async def notes(pg_url: str, seconds: float) -> list[str]:
    """Every notification on jobwire's channel for `seconds`."""
    base, schema = split(pg_url)
    got: list[str] = []
    async with await psycopg.AsyncConnection.connect(base, autocommit=True) as conn:
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel_of(schema))))
        async for note in conn.notifies(timeout=seconds):
            got.append(note.payload)
    return got


async def subscribe(srv: Proc, c: Client, job: str) -> tuple[Any, Messages, dict[str, Any]]:
    ws = await websockets.connect(srv.url.replace("http://", "ws://") + f"/api/ws?token={c.token}")
    received = Messages(ws)
    await ws.send(json.dumps({"op": "subscribe", "job": job, "after": 0}))
    return ws, received, await asyncio.wait_for(received.recv(), 10)


async def test_rolled_back_submit_leaves_no_job_event_or_notification(
        procs: Any, pg_url: str, host: tuple[psycopg.AsyncConnection[Any], str]) -> None:
    conn, schema = host
    srv: Proc = procs("serve", "--db", pg_url, "--lease", "2")
    c = await guest(srv.url)
    path_before = (await (await conn.execute("SHOW search_path")).fetchone() or {})
    listening = asyncio.create_task(notes(pg_url, 3.0))
    await asyncio.sleep(0.3)  # LISTEN is in place
    with pytest.raises(Rollback):
        async with conn.transaction():
            job, created = await jobwire.pg.submit(conn, tasks, c.owner, "echo", 1,
                                                   key="k", schema=schema)
            assert created
            # Inside the host's transaction the job is the host's alone.
            ws, _, reply = await subscribe(srv, c, job.id)
            assert reply["op"] == "error" and reply["code"] == 404, reply
            raise Rollback
    # The connection is as the host left it: same search_path, no transaction.
    assert await (await conn.execute("SHOW search_path")).fetchone() == path_before
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert not await listening, "a rolled-back submit notified"
    # Nothing to see over HTTP or a WebSocket, and no worker ran it (it would be listed).
    assert (await c.http.get(f"/api/jobs/{job.id}")).status_code == 404
    assert (await c.http.get("/api/jobs")).json() == []
    await ws.send(json.dumps({"op": "subscribe", "job": job.id, "after": 0}))
    reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert reply["op"] == "error" and reply["code"] == 404, reply
    await ws.close()
    # The same key is free: the rolled-back job held nothing.
    async with conn.transaction():
        _, created = await jobwire.pg.submit(conn, tasks, c.owner, "echo", 1, key="k",
                                             schema=schema)
    assert created
    await c.http.aclose()


async def test_committed_submit_is_run_promptly_and_streamed_live(
        procs: Any, pg_url: str, host: tuple[psycopg.AsyncConnection[Any], str]) -> None:
    conn, schema = host
    srv: Proc = procs("serve", "--db", pg_url, "--lease", "2")
    c = await guest(srv.url)
    async with conn.transaction():
        await conn.execute("SELECT 1")  # the host's own work
        job, created = await jobwire.pg.submit(conn, tasks, c.owner, "steps",
                                               {"n": 3, "delay": 0.2}, schema=schema)
    assert created
    ws, received, reply = await subscribe(srv, c, job.id)
    assert reply["op"] == "subscribed", reply
    got: list[dict[str, Any]] = []
    while not got or got[-1]["type"] not in TERMINAL:
        got.append(await asyncio.wait_for(received.recv(), 20))
    await ws.close()
    assert [e["seq"] for e in got] == list(range(1, len(got) + 1))
    assert [e["type"] for e in got[:3]] == ["created", "started", "items"]
    assert got[-1]["type"] == "completed"
    # Workers wake on the committed notification, not on their 1 s poll: each of these
    # is claimed well within a poll (a poll alone would take 0.5 s on average).
    waits = []
    for k in range(6):
        await asyncio.sleep(0.13 * k)  # commits at different moments of the poll cycle
        async with conn.transaction():
            job, _ = await jobwire.pg.submit(conn, tasks, c.owner, "echo", k, schema=schema)
        committed = time.time()
        await c.wait_terminal(job.id)
        started = next(e for e in await c.events(job.id) if e["type"] == "started")
        waits.append(datetime.fromisoformat(started["at"]).timestamp() - committed)
    assert max(waits) < 0.5, waits
    await c.http.aclose()


async def test_the_notification_reaches_a_listener_in_the_same_process(
        pg_url: str, host: tuple[psycopg.AsyncConnection[Any], str]) -> None:
    """A store open in the submitting process published nothing at submit: its own
    listener delivers the committed `created` event, event and all."""
    conn, schema = host
    store = open_store(pg_url)
    await store.open()
    hints: list[tuple[str, int, Event | None]] = []
    store.listen(lambda job, seq, ev: hints.append((job, seq, ev)))
    try:
        with pytest.raises(Rollback):
            async with conn.transaction():
                await jobwire.pg.submit(conn, tasks, "user:1", "echo", 1, schema=schema)
                raise Rollback
        async with conn.transaction():
            job, _ = await jobwire.pg.submit(conn, tasks, "user:1", "echo", 2, schema=schema)
        deadline = time.monotonic() + 5
        while not hints and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        [(job_id, seq, ev)] = hints
        assert (job_id, seq) == (job.id, 1)
        assert ev is not None and (ev.type, ev.data["status"]) == ("created", "queued")
        assert await store.events(job.id, 0) == [ev]
    finally:
        await store.close()


async def test_one_key_in_two_open_host_transactions_is_one_job(migrated: str) -> None:
    base, schema = split(migrated)
    first, second = [await psycopg.AsyncConnection.connect(base, application_name=schema)
                     for _ in range(2)]
    try:
        for outcome in ("commit", "rollback"):
            job, created = await jobwire.pg.submit(first, tasks, "user:1", "echo", outcome,
                                                   key=outcome, schema=schema)
            assert created
            # The second waits (on the owner's lock: it cannot see the first's job yet)…
            joining = asyncio.create_task(jobwire.pg.submit(
                second, tasks, "user:1", "echo", outcome, key=outcome, schema=schema))
            await asyncio.sleep(0.5)
            assert not joining.done(), "a second submit of the key went ahead"
            # …until the first ends: it joins the committed job, or makes the key's job.
            await (first.commit() if outcome == "commit" else first.rollback())
            other, created = await asyncio.wait_for(joining, 10)
            await second.commit()
            assert (other.id == job.id, created) == ((False, True) if outcome == "rollback"
                                                     else (True, False))
        async with first.transaction():
            cur = await first.execute(sql.SQL("SELECT key, count(*) FROM {}.jobs GROUP BY key "
                                              "ORDER BY key").format(sql.Identifier(schema)))
            assert await cur.fetchall() == [("commit", 1), ("rollback", 1)]
    finally:
        for conn in (first, second):
            await conn.close()


async def test_the_cap_holds_across_concurrent_host_transactions(
        migrated: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """6 host transactions of one owner at once, each submitting a new key and committing
    a moment later, with a cap of 3: 3 jobs; the others are refused."""
    monkeypatch.setenv("JOBWIRE_MAX_ACTIVE_JOBS", "3")
    base, schema = split(migrated)

    async def one(k: int) -> str:
        async with await psycopg.AsyncConnection.connect(base) as conn:
            try:
                await jobwire.pg.submit(conn, tasks, "user:1", "echo", k, key=str(k),
                                        schema=schema)
            except TooManyActive:
                await conn.rollback()
                return "refused"
            await asyncio.sleep(0.2)  # the host's own work, before its commit
            await conn.commit()
            return "created"

    outcomes = await asyncio.gather(*(one(k) for k in range(6)))
    assert sorted(outcomes) == ["created"] * 3 + ["refused"] * 3
    async with await psycopg.AsyncConnection.connect(migrated) as conn:
        cur = await conn.execute("SELECT count(*) FROM jobs")
        assert await cur.fetchone() == (3,)


def test_a_blocking_connection_submits_in_its_transaction(migrated: str) -> None:
    """Django's and Flask's psycopg connections: non-autocommit, the current schema
    being jobwire's (schema not given)."""
    with psycopg.connect(migrated) as conn:
        jobwire.pg.submit_sync(conn, tasks, "user:1", "echo", 1, key="gone")
        conn.rollback()
        job, created = jobwire.pg.submit_sync(conn, tasks, "user:1", "echo", 2, key="kept")
        assert created
        again, created = jobwire.pg.submit_sync(conn, tasks, "user:1", "echo", 3, key="kept")
        assert (again.id, created) == (job.id, False)
        conn.commit()
        rows = conn.execute("SELECT key, e.type FROM jobs JOIN events AS e "
                            "ON e.job_id = jobs.id").fetchall()
        assert rows == [("kept", "created")]


async def test_what_cannot_join_is_refused_before_anything_is_written(
        pg_url: str, host: tuple[psycopg.AsyncConnection[Any], str]) -> None:
    conn, schema = host

    async def submit(**kw: Any) -> Any:
        args = {"owner": "user:1", "task": "echo", "input": 1, "schema": schema, **kw}
        return await jobwire.pg.submit(conn, tasks, **args)

    with pytest.raises(StoreError, match="inside a healthy transaction"):
        await submit()  # autocommit, no transaction: each statement would commit alone
    async with conn.transaction():
        for bad, field in (({"owner": "alice"}, "owner"), ({"owner": "user:\x00"}, "owner"),
                           ({"task": "nope"}, "task"), ({"key": "a\nb"}, "key"),
                           ({"task": "steps", "input": {"n": -1}}, "input")):
            with pytest.raises(InputError) as exc:
                await submit(**bad)
            assert exc.value.loc[0] == field
        with pytest.raises(StoreError, match="tables are not in schema 'public'"):
            await submit(schema="public")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    async with conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        with pytest.raises(StoreError, match="READ COMMITTED"):
            await submit()
    async with await psycopg.AsyncConnection.connect(pg_url) as check:
        assert await (await check.execute("SELECT count(*) FROM jobs")).fetchone() == (0,)


async def test_a_host_transaction_writing_in_two_schemas_reaches_both_owner_feeds(
        migrated: str, tmp_path: Path) -> None:
    """One host transaction submits for two owners in jobwire's schema, undoes a third
    owner's submit at a savepoint, and submits in a second jobwire schema too: after the
    commit, each owner's feed in each schema has exactly its new job after the cursor
    read before (the commit stamps every schema's changes, not only the first's)."""
    owners = ["user:a", "user:b", "user:undone"]
    base, schema = split(migrated)
    with fresh_db("postgres", tmp_path) as other_url:
        stores = open_store(migrated), open_store(other_url)
        for store in stores:
            await store.open()
        try:
            cursors = {}  # (store, owner): the feed's seq before the host's transaction
            for n, store in enumerate(stores):
                for owner in owners:
                    await store.submit(owner, "echo", 0, None, 1)
                    cursors[n, owner] = (await store.owner_changes(owner, 0)).seq
            made: dict[tuple[int, str], str] = {}
            async with await psycopg.AsyncConnection.connect(base, autocommit=True) as conn:
                async with conn.transaction():
                    for owner in owners[:2]:
                        job, _ = await jobwire.pg.submit(conn, tasks, owner, "echo", 1,
                                                         schema=schema)
                        made[0, owner] = job.id
                    with pytest.raises(Rollback):
                        async with conn.transaction():  # a savepoint
                            await jobwire.pg.submit(conn, tasks, "user:undone", "echo", 1,
                                                    schema=schema)
                            raise Rollback
                    job, _ = await jobwire.pg.submit(conn, tasks, "user:b", "echo", 1,
                                                     schema=split(other_url)[1])
                    made[1, "user:b"] = job.id
            for (n, owner), cursor in cursors.items():
                feed = await stores[n].owner_changes(owner, cursor)
                want = [made[n, owner]] if (n, owner) in made else []
                assert (feed.reset, [j.id for j in feed.jobs]) == (False, want), (n, owner)
        finally:
            for store in stores:
                await store.close()
