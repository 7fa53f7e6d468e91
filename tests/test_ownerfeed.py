"""The owner feed: a client's list of its jobs follows creations, status changes and
deletions live, and after any reconnect with its cursor equals `GET /api/jobs` exactly,
on both backends, across server processes, and never shows another owner's jobs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import websockets

from jobwire.model import Status, now
from jobwire.store import Lease, open_store
from tests.conftest import Client, Proc, guest
from tests.wsframes import Messages

WAIT = 10.0  # seconds for a change to reach a feed (it takes milliseconds)


class Feed:
    """Folds `jobs` messages into a list as jobwire.js does."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.cursor = 0
        self.messages: list[dict[str, Any]] = []

    def fold(self, msg: dict[str, Any]) -> None:
        assert msg["op"] == "jobs", msg
        self.messages.append(msg)
        if msg["reset"]:
            self.jobs.clear()
        for change in msg["changes"]:
            self.jobs.pop(change["id"], None)
            if change["job"] is not None:
                self.jobs[change["id"]] = change["job"]
        self.cursor = msg["cursor"]

    def state(self) -> dict[str, str]:
        return {job_id: job["status"] for job_id, job in self.jobs.items()}


@contextlib.asynccontextmanager
async def watching(base: str, token: str, feed: Feed, status: str | None = "active"
                   ) -> AsyncIterator[Messages]:
    """A socket watching the owner's jobs from the feed's cursor."""
    url = base.replace("http://", "ws://") + f"/api/ws?token={token}"
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"op": "watch_jobs", "status": status, "after": feed.cursor}))
        yield Messages(ws)


async def until(feed: Feed, received: Messages, done: Callable[[dict[str, str]], bool]) -> None:
    """Fold messages until `done(state)` holds (the first message always comes)."""
    async with asyncio.timeout(WAIT):
        while True:
            feed.fold(await received.recv())
            if done(feed.state()):
                return


async def listed(client: Client, status: str | None = "active") -> dict[str, str]:
    params = {"limit": 500, **({"status": status} if status else {})}
    r = await client.http.get("/api/jobs", params=params)
    assert r.status_code == 200, r.text
    return {job["id"]: job["status"] for job in r.json()}


async def settle(feed: Feed, received: Messages, client: Client, status: str | None) -> None:
    """Fold until the feed equals a list read after it (it must, within WAIT). A list
    read before is not enough: a queued job may start while the feed catches up."""
    want: dict[str, str] = {}
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(WAIT):
            feed.fold(await received.recv())  # a watch is always answered
            while feed.state() != (want := await listed(client, status)):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        feed.fold(await received.recv())
    assert feed.state() == want


async def test_a_reconnect_with_the_cursor_gets_just_the_changes(server: Proc) -> None:
    client = await guest(server.url)
    kept, ended, deleted = [(await client.submit("block", {}))[0]["id"] for _ in range(3)]
    feed = Feed()
    async with watching(server.url, client.token, feed) as received:
        await until(feed, received, lambda state: len(state) == 3)
        assert feed.messages[0]["reset"], "a new watch gets the whole list"
    # While away: one created, one ended, one deleted (after it ended).
    created = (await client.submit("block", {}))[0]["id"]
    for job in (ended, deleted):
        assert (await client.http.post(f"/api/jobs/{job}/cancel")).status_code == 200
        await client.wait_terminal(job)
    assert (await client.http.delete(f"/api/jobs/{deleted}")).status_code == 204
    away = len(feed.messages)
    async with watching(server.url, client.token, feed) as received:
        await settle(feed, received, client, "active")
        resumed = feed.messages[away]
        assert not resumed["reset"], "a known cursor is resumed, not re-listed"
        assert {c["id"] for c in resumed["changes"]} <= {created, ended, deleted}, (
            "the unchanged job is not sent again")
    assert set(feed.state()) == {kept, created}
    await client.http.aclose()


async def test_two_pages_agree_live(server: Proc) -> None:
    client = await guest(server.url)
    a, b = Feed(), Feed()
    async with watching(server.url, client.token, a, None) as on_a, \
            watching(server.url, client.token, b, None) as on_b:
        await until(a, on_a, lambda state: True)
        await until(b, on_b, lambda state: True)
        job = (await client.submit("echo", {"x": 1}))[0]["id"]
        await until(b, on_b, lambda state: state.get(job) == "completed")
        assert (await client.http.delete(f"/api/jobs/{job}")).status_code == 204
        await until(b, on_b, lambda state: job not in state)
        await settle(a, on_a, client, None)


async def test_a_change_through_one_server_reaches_a_feed_on_another(procs: Any, db_url: str
                                                                    ) -> None:
    one, two = (procs("serve", "--db", db_url, "--lease", "2") for _ in range(2))
    client = await guest(one.url)
    feed = Feed()
    async with watching(two.url, client.token, feed, None) as received:
        await until(feed, received, lambda state: True)
        job = (await client.submit("block", {}))[0]["id"]
        await until(feed, received, lambda state: job in state)
        assert (await client.http.post(f"/api/jobs/{job}/cancel")).status_code == 200
        await until(feed, received, lambda state: state.get(job) == "cancelled")
        # A deletion writes no event: it must reach the other server all the same.
        assert (await client.http.delete(f"/api/jobs/{job}")).status_code == 204
        await until(feed, received, lambda state: job not in state)
    await client.http.aclose()


async def test_another_owners_changes_never_arrive(server: Proc) -> None:
    mine, theirs = await guest(server.url), await guest(server.url)
    feed = Feed()
    async with watching(server.url, mine.token, feed, None) as received:
        await until(feed, received, lambda state: True)
        for _ in range(3):
            job = (await theirs.submit("echo", {}))[0]["id"]
            await theirs.wait_terminal(job)
            assert (await theirs.http.delete(f"/api/jobs/{job}")).status_code == 204
        own = (await mine.submit("echo", {}))[0]["id"]
        await until(feed, received, lambda state: state.get(own) == "completed")
    seen = {c["id"] for msg in feed.messages for c in msg["changes"]}
    assert seen == {own}, "only the owner's own job ever arrives"
    for c in (mine, theirs):
        await c.http.aclose()


async def test_random_changes_and_cuts_end_equal(server: Proc) -> None:
    """Random creates, cancels and deletes while the sockets (one watching the active
    jobs, one all) are cut at random moments."""
    rng = random.Random(7)
    client = await guest(server.url)
    feeds = {"active": Feed(), None: Feed()}
    jobs: list[str] = []

    async def act() -> None:
        choice = rng.random()
        if choice < 0.45 or not jobs:
            jobs.append((await client.submit(rng.choice(["block", "echo"]), {}))[0]["id"])
        elif choice < 0.75:
            await client.http.post(f"/api/jobs/{rng.choice(jobs)}/cancel")
        else:  # 409 while still active: a refusal changes nothing
            job = rng.choice(jobs)
            if (await client.http.delete(f"/api/jobs/{job}")).status_code == 204:
                jobs.remove(job)

    for _ in range(6):  # connections
        async with contextlib.AsyncExitStack() as sockets:
            received = {status: await sockets.enter_async_context(
                watching(server.url, client.token, feed, status))
                for status, feed in feeds.items()}
            for _ in range(rng.randrange(3, 8)):
                await act()
                for status, feed in feeds.items():
                    with contextlib.suppress(TimeoutError):  # take what came so far
                        async with asyncio.timeout(rng.random() * 0.03):
                            while True:
                                feed.fold(await received[status].recv())
        for _ in range(rng.randrange(0, 4)):  # changes made while cut off
            await act()
    for status, feed in feeds.items():
        async with watching(server.url, client.token, feed, status) as on:
            await settle(feed, on, client, status)
    await client.http.aclose()


async def test_sse_resumes_from_last_event_id(server: Proc) -> None:
    client = await guest(server.url)
    feed = Feed()

    async def read(headers: dict[str, str], done: Callable[[dict[str, str]], bool]) -> str:
        async with client.http.stream("GET", "/api/jobs/stream", params={"status": "active"},
                                      headers=headers) as r:
            assert r.status_code == 200
            last_id, frame = "", {}
            async with asyncio.timeout(WAIT):
                async for line in r.aiter_lines():
                    name, _, value = line.partition(": ")
                    if line:
                        frame[name] = value
                    elif "data" in frame:
                        assert frame["event"] == "jobs"
                        feed.fold(json.loads(frame["data"]))
                        last_id, frame = frame["id"], {}
                        if done(feed.state()):
                            return last_id
        raise AssertionError("stream ended")

    job = (await client.submit("block", {}))[0]["id"]
    last_id = await read({}, lambda state: job in state)
    assert int(last_id) == feed.cursor
    assert (await client.http.post(f"/api/jobs/{job}/cancel")).status_code == 200
    other = (await client.submit("block", {}))[0]["id"]
    away = len(feed.messages)
    # (running: the last status it takes before the comparison below)
    await read({"Last-Event-ID": last_id}, lambda state: state == {other: "running"})
    assert not feed.messages[away]["reset"]
    assert feed.state() == await listed(client)
    await client.http.post(f"/api/jobs/{other}/cancel")
    await client.http.aclose()


async def test_bad_watch_requests_are_refused(server: Proc) -> None:
    client = await guest(server.url)
    url = server.url.replace("http://", "ws://") + f"/api/ws?token={client.token}"
    async with websockets.connect(url) as ws:
        received = Messages(ws)
        for bad, says in (({"status": "nope"}, "status must be one of"),
                          ({"after": -1}, "after must be"), ({"after": "1"}, "after must be")):
            await ws.send(json.dumps({"op": "watch_jobs", **bad}))
            reply = await asyncio.wait_for(received.recv(), WAIT)
            assert reply["op"] == "error" and says in reply["error"], reply
    r = await client.http.get("/api/jobs/stream", params={"status": "nope"})
    assert r.status_code == 422
    await client.http.aclose()



async def test_each_write_comes_after_the_cursor_it_was_made_after(db_url: str) -> None:
    """Store level, no worker: a new job, and each change of status, is in the feed
    after the cursor read before it (a worker's claim must not be what makes it so)."""
    store = open_store(db_url)
    await store.open()
    try:
        await store.submit("user:a", "t", {}, None, 1)  # the feed exists already
        cursor = (await store.owner_changes("user:a", 0)).seq
        job, _ = await store.submit("user:a", "t", {}, None, 1)
        since = await store.owner_changes("user:a", cursor)
        assert (since.reset, [j.id for j in since.jobs]) == (False, [job.id])
        (claimed,) = await store.claim("w", ["t"], 1, 30)
        since = await store.owner_changes("user:a", since.seq)
        assert [j.id for j in since.jobs] == [claimed.id]
        await store.finish(Lease(claimed.id, "w", claimed.attempt), Status.COMPLETED)
        since = await store.owner_changes("user:a", since.seq)
        assert [(j.id, j.status) for j in since.jobs] == [(claimed.id, Status.COMPLETED)]
    finally:
        await store.close()


async def test_a_cursor_older_than_the_kept_tombstones_gets_the_whole_list(db_url: str
                                                                           ) -> None:
    store = open_store(db_url)
    await store.open()
    try:
        kept, _ = await store.submit("user:a", "t", {}, None, 1)
        gone, _ = await store.submit("user:a", "t", {}, None, 1)
        cursor = (await store.owner_changes("user:a", 0)).seq
        await store.request_cancel(gone.id, "user:a")
        assert await store.delete_job(gone.id, "user:a")
        since = await store.owner_changes("user:a", cursor)
        assert (since.reset, since.gone) == (False, [gone.id])
        await store.prune(now() + 60)  # the tombstone goes with it
        after = await store.owner_changes("user:a", cursor)
        assert after.reset, "the deletion can no longer be told: the whole list instead"
        assert [j.id for j in after.jobs] == [kept.id] and after.seq == since.seq
        assert not (await store.owner_changes("user:a", after.seq)).reset
    finally:
        await store.close()


async def test_python_client_lists_live_across_a_server_restart(server: Proc) -> None:
    from jobwire.client import Client as PyClient

    async with PyClient(server.url) as py:
        lists: list[list[str]] = []
        changed = asyncio.Event()

        async def follow() -> None:
            async for jobs in py.jobs(status="active"):
                lists.append([str(j["id"]) for j in jobs])
                changed.set()

        async def until_listed(want: Callable[[], Awaitable[list[str]]]) -> None:
            async with asyncio.timeout(WAIT * 3):
                while not lists or lists[-1] != await want():
                    changed.clear()
                    await changed.wait()

        async def rest() -> list[str]:
            return [str(j["id"]) for j in await py.jobs(status="active", limit=500)]

        reader = asyncio.create_task(follow())
        ended, kept = [(await py.submit("block", {}))[0]["id"] for _ in range(2)]
        await until_listed(rest)
        server.kill()
        server.start()  # the client reconnects and resumes from its cursor
        await py.cancel(str(ended))  # (running: it ends once its worker sees the request)
        created = (await py.submit("block", {}))[0]["id"]

        async def ended_and_created() -> list[str]:
            return [str(created), str(kept)]

        await until_listed(ended_and_created)
        assert lists[-1] == await rest()
        reader.cancel()
        for job in (kept, created):
            await py.cancel(str(job))


async def test_a_job_moved_to_another_owner_leaves_the_first_feed(store: Any) -> None:
    """A guest's session claimed by a user: the job is gone from the guest's feed and
    new in the user's, each with a seq of its own owner."""
    job, _ = await store.submit("guest:m", "t", {}, None, 1)
    await store.add_session("tok", "guest:m", None)
    guest_cursor = (await store.owner_changes("guest:m", 0)).seq
    user_cursor = (await store.owner_changes("user:m", 0)).seq
    assert await store.claim_session("tok", "user:m") == 1
    left = await store.owner_changes("guest:m", guest_cursor)
    assert (left.seq, left.reset, left.jobs, left.gone) == (guest_cursor + 1, False, [], [job.id])
    came = await store.owner_changes("user:m", user_cursor)
    assert [j.id for j in came.jobs] == [job.id] and came.gone == []


async def test_postgres_cursors_stay_valid_across_the_feed_table_migration(
        pg_url: str, monkeypatch: Any) -> None:
    """A database whose feed stamps lived on the jobs rows keeps its seqs and tombstones
    when they move to job_feed: a cursor taken before answers the same after, and the
    feed goes on from there."""
    from jobwire.store import pg_schema
    from jobwire.store.postgres import PostgresStore

    upto = next(i for i, m in enumerate(pg_schema.MIGRATIONS) if "CREATE TABLE job_feed" in m)
    monkeypatch.setattr(pg_schema, "MIGRATIONS", pg_schema.MIGRATIONS[:upto])
    store = PostgresStore(pg_url)
    await store.open()
    guest_owner = "guest:g"
    try:
        kept, _ = await store.submit("user:a", "t", {}, None, 1)
        gone, _ = await store.submit("user:a", "t", {}, None, 1)
        ended, _ = await store.submit("user:a", "t", {}, None, 1)
        moved, _ = await store.submit(guest_owner, "t", {}, None, 1)
        await store.add_session("tok", guest_owner, None)
        a_cursor = (await store.owner_changes("user:a", 0)).seq
        g_cursor = (await store.owner_changes(guest_owner, 0)).seq
        await store.request_cancel(gone.id, "user:a")
        assert await store.delete_job(gone.id, "user:a")
        await store.request_cancel(ended.id, "user:a")
        assert await store.claim_session("tok", "user:b") == 1
        stamps = await store._query("SELECT owner, id, owner_seq, false FROM jobs UNION ALL "
                                    "SELECT owner, job_id, owner_seq, true FROM job_tombstones")
    finally:
        await store.close()
    monkeypatch.undo()
    store = PostgresStore(pg_url)
    await store.open()
    try:
        assert sorted(stamps) == sorted(await store._query(
            "SELECT owner, job_id, owner_seq, at IS NOT NULL FROM job_feed"))
        seq = (await store.owner_changes("user:a", 0)).seq
        at_a, at_guest, at_b = [await store.owner_changes(o, c) for o, c in
                                (("user:a", a_cursor), (guest_owner, g_cursor), ("user:b", 0))]
        assert (at_a.reset, [j.id for j in at_a.jobs], at_a.gone) == (False, [ended.id],
                                                                      [gone.id])
        assert (at_guest.reset, at_guest.jobs, at_guest.gone) == (False, [], [moved.id])
        assert [j.id for j in at_b.jobs] == [moved.id]
        await store.request_cancel(kept.id, "user:a")
        since = await store.owner_changes("user:a", seq)
        assert (since.seq, since.reset, [j.id for j in since.jobs], since.gone) == (
            seq + 1, False, [kept.id], [])
    finally:
        await store.close()
