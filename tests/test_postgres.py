"""PostgreSQL with real processes: API servers and workers on one database see each
other's events through LISTEN/NOTIFY, share dedup and leases, survive crashes and
lost listening connections, and migrate a fresh schema concurrently."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import websockets
from psycopg.conninfo import conninfo_to_dict

from jobwire.hub import Hub
from jobwire.model import Event, ItemStatus, Status
from jobwire.store import ItemUpdate, Lease, StoreError, open_store
from jobwire.store.pg_schema import MIGRATIONS
from jobwire.store.postgres import PostgresStore
from tests.conftest import Client, Proc, guest
from tests.test_cli_server import jobwire
from tests.test_live import TERMINAL, assert_complete, ws_url
from tests.wsframes import Messages

pytestmark = pytest.mark.postgres


@dataclasses.dataclass
class Cluster:
    a: Proc
    b: Proc
    workers: list[Proc]


@pytest.fixture
def cluster(pg_url: str, procs: Any) -> Cluster:
    """Two API-only servers and two worker processes on one fresh schema, all started
    at once (so they race to migrate it)."""
    a = procs("serve", "--db", pg_url, "--no-workers", start=False).start(wait=False)
    b = procs("serve", "--db", pg_url, "--no-workers", start=False).start(wait=False)
    workers = [procs("worker", "--db", pg_url, "--lease", "2") for _ in range(2)]
    a.wait_ready()
    b.wait_ready()
    return Cluster(a, b, workers)


@pytest.fixture
async def on_b(cluster: Cluster) -> AsyncIterator[Client]:
    c = await guest(cluster.b.url)
    yield c
    await c.http.aclose()


async def ws_follow(base: str, token: str, job: str, after: int,
                    on_event: Callable[[dict[str, Any]], bool] | None = None
                    ) -> list[dict[str, Any]]:
    """Subscribe and return events until the terminal one; `on_event(event)` may return
    True to drop the socket right there."""
    got: list[dict[str, Any]] = []
    async with websockets.connect(ws_url(base, token)) as ws:
        await ws.send(json.dumps({"op": "subscribe", "job": job, "after": after}))
        received = Messages(ws)
        while not got or got[-1]["type"] not in TERMINAL:
            msg = await asyncio.wait_for(received.recv(), 30)
            if "op" in msg:
                assert msg["op"] == "subscribed", msg
                continue
            got.append(msg)
            if on_event is not None and on_event(msg):
                break
    return got


def gated(tmp_path: Path, n: int) -> tuple[dict[str, Any], Path]:
    """A `steps` input whose items wait until the returned file exists."""
    gate = tmp_path / "gate"
    return {"n": n, "gate": str(gate)}, gate


async def test_subscriber_on_one_server_sees_a_workers_events_live(
        cluster: Cluster, on_b: Client, tmp_path: Path) -> None:
    spec, gate = gated(tmp_path, 25)
    job, _ = await on_b.submit("steps", spec)

    def open_gate(ev: dict[str, Any]) -> bool:
        if ev["type"] == "items":
            gate.touch()  # from here on, every event reaches server A only by NOTIFY
        return False

    events = await ws_follow(cluster.a.url, on_b.token, job["id"], 0, open_gate)
    assert_complete(events, job["id"])
    assert events[-1]["type"] == "completed"
    assert events[-1]["data"]["progress"] == {"total": 25, "done": 25, "failed": 0}
    assert events == await on_b.events(job["id"]), "live events equal the stored log"


async def test_dedup_storm_split_across_servers(cluster: Cluster, on_b: Client) -> None:
    limits = httpx.Limits(max_connections=100)
    headers = {"Authorization": f"Bearer {on_b.token}"}
    async with httpx.AsyncClient(base_url=cluster.a.url, headers=headers, timeout=60,
                                 limits=limits) as a, \
            httpx.AsyncClient(base_url=cluster.b.url, headers=headers, timeout=60,
                              limits=limits) as b:
        replies = await asyncio.gather(*[
            (a if k % 2 else b).post("/api/jobs", json={"task": "block", "input": {},
                                                        "key": "storm"})
            for k in range(400)])
    assert sorted({r.status_code for r in replies}) == [200, 201]
    assert sum(r.json()["created"] for r in replies) == 1
    assert len({r.json()["job"]["id"] for r in replies}) == 1
    listed = (await on_b.http.get("/api/jobs")).json()
    assert len(listed) == 1
    job_id = replies[0].json()["job"]["id"]
    assert (await on_b.http.post(f"/api/jobs/{job_id}/cancel")).status_code == 200
    assert (await on_b.wait_terminal(job_id))["status"] == "cancelled"


async def test_sigkilled_worker_process_job_finishes_on_another(
        pg_url: str, procs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    api: Proc = procs("serve", "--db", pg_url, "--no-workers")
    first: Proc = procs("worker", "--db", pg_url, "--lease", "2")
    c = await guest(api.url)
    spec, gate = gated(tmp_path, 6)
    job, _ = await c.submit("steps", spec)
    while (await c.job(job["id"]))["status"] != "running":
        await c.events(job["id"], after=1, wait=1)
    monkeypatch.setenv("JOBWIRE_DB", pg_url)  # the database, named the other way
    second: Proc = procs("worker", "--lease", "2")
    first.kill()
    gate.touch()
    ended = await c.wait_terminal(job["id"], timeout=60)
    assert ended["status"] == "completed" and ended["attempt"] == 2
    events = await c.events(job["id"])
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert "lease expired during attempt 1" in next(
        e for e in events if e["type"] == "retrying")["data"]["error"]
    items = (await c.http.get(f"/api/jobs/{job['id']}/items")).json()["items"]
    assert second.proc is not None
    assert {i["result"]["pid"] for i in items} == {second.proc.pid}
    await c.http.aclose()


async def test_restarted_server_resumes_its_subscribers(
        cluster: Cluster, on_b: Client, tmp_path: Path) -> None:
    spec, gate = gated(tmp_path, 30)
    job, _ = await on_b.submit("steps", spec)
    events = await ws_follow(cluster.a.url, on_b.token, job["id"], 0,
                             lambda ev: ev["type"] == "items")
    cluster.a.kill()
    gate.touch()  # the job runs on while server A is down
    cluster.a.start()
    events += await ws_follow(cluster.a.url, on_b.token, job["id"], events[-1]["seq"])
    assert_complete(events, job["id"])
    assert events == await on_b.events(job["id"])


async def test_lost_listening_connections_lose_no_events(
        cluster: Cluster, on_b: Client, pg_url: str, tmp_path: Path) -> None:
    spec, gate = gated(tmp_path, 20)
    job, _ = await on_b.submit("steps", spec)
    events = await ws_follow(cluster.a.url, on_b.token, job["id"], 0,
                             lambda ev: ev["type"] == "items")
    async with websockets.connect(ws_url(cluster.a.url, on_b.token)) as ws:
        await ws.send(json.dumps({"op": "subscribe", "job": job["id"],
                                  "after": events[-1]["seq"]}))
        received = Messages(ws)
        assert (await received.recv())["op"] == "subscribed"
        await terminate_listeners(pg_url)  # every process's LISTEN connection drops
        gate.touch()
        while events[-1]["type"] not in TERMINAL:
            events.append(await asyncio.wait_for(received.recv(), 30))
    assert_complete(events, job["id"])


async def terminate_listeners(url: str) -> int:
    name = conninfo_to_dict(url)["application_name"]
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = %s", (f"{name}/listen",))
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def test_a_store_catches_up_after_its_listener_reconnects(pg_url: str) -> None:
    reader, writer = PostgresStore(pg_url), open_store(pg_url)
    await reader.open()
    await writer.open()
    seen: dict[str, int] = {}
    reader.listen(lambda job, seq, ev: seen.__setitem__(job, max(seq, seen.get(job, 0))))
    try:
        assert await terminate_listeners(pg_url) == 2
        # Written while the reader is (most likely) still reconnecting: its notification
        # is lost, and the reader must learn of the job from the table instead.
        job, _ = await writer.submit("o", "t", {}, None, 1)
        claimed = await writer.claim("w", ["t"], 1, 30)
        assert [j.id for j in claimed] == [job.id]
        while seen.get(job.id, 0) < 2:
            await asyncio.sleep(0.05)
    finally:
        await writer.close()
        await reader.close()


async def test_events_too_big_to_notify_arrive_as_hints(pg_url: str) -> None:
    reader, writer = PostgresStore(pg_url), open_store(pg_url)
    await reader.open()
    await writer.open()
    got: asyncio.Queue[tuple[int, Event | None]] = asyncio.Queue()
    reader.listen(lambda job, seq, ev: got.put_nowait((seq, ev)))
    try:
        job, _ = await writer.submit("o", "t", {}, None, 1)
        [claimed] = await writer.claim("w", ["t"], 1, 30)
        lease = Lease(job.id, "w", claimed.attempt)
        await writer.report(lease, {"text": "x" * 20_000})
        await writer.finish(lease, Status.COMPLETED, {"ok": True})
        received = [await asyncio.wait_for(got.get(), 20) for _ in range(4)]
    finally:
        await writer.close()
        await reader.close()
    assert [seq for seq, _ in received] == [1, 2, 3, 4]
    assert received[2][1] is None, "a big event is announced by seq, read from the table"
    stored = await events_of(pg_url, job.id)
    assert [ev for _, ev in received if ev is not None] == [stored[0], stored[1], stored[3]]


async def events_of(url: str, job: str) -> list[Event]:
    store = open_store(url)
    await store.open()
    try:
        return await store.events(job, 0)
    finally:
        await store.close()


async def test_servers_and_migrate_on_a_fresh_schema_at_once(pg_url: str, procs: Any) -> None:
    servers = [procs("serve", "--db", pg_url, start=False).start(wait=False) for _ in range(2)]
    migrate = jobwire("migrate", "--db", pg_url)
    assert migrate.returncode == 0, migrate.stderr
    for server in servers:
        server.wait_ready()
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        cur = await conn.execute("SELECT version FROM jobwire_migrations ORDER BY version")
        assert [r[0] for r in await cur.fetchall()] == list(range(1, len(MIGRATIONS) + 1))
    c = await guest(servers[0].url)
    job, created = await c.submit("echo", {"hello": "world"})
    assert created
    assert (await c.wait_terminal(job["id"]))["result"] == {"hello": "world"}
    await c.http.aclose()


async def test_concurrent_claims_and_expiries_take_each_job_once(pg_url: str) -> None:
    stores = [open_store(pg_url, max_active_jobs=120) for _ in range(4)]  # one owner's 120
    for s in stores:
        await s.open()
    try:
        jobs = {(await stores[0].submit("o", "t", {}, None, 3))[0].id for _ in range(120)}

        async def drain(k: int) -> list[str]:
            taken: list[str] = []
            while batch := await stores[k].claim(f"w{k}", ["t"], 7, 0.2):
                taken += [j.id for j in batch]
            return taken

        claimed = [j for taken in await asyncio.gather(*map(drain, range(4))) for j in taken]
        assert sorted(claimed) == sorted(jobs), "every job claimed exactly once"
        await asyncio.sleep(0.3)  # every lease (0.2 s) has run out
        expired = await asyncio.gather(*(s.expire_leases() for s in stores))
        assert sum(expired) == len(jobs), "every expired lease requeued exactly once"
        for job in list(jobs)[:10]:
            kinds = [e.type for e in await stores[1].events(job, 0)]
            assert kinds == ["created", "started", "retrying"]
    finally:
        for s in stores:
            await s.close()


async def test_nul_characters_never_break_a_lookup_or_a_failure(pg_url: str) -> None:
    store = open_store(pg_url)
    await store.open()
    try:
        assert await store.get_job("no\x00such", "o") is None
        assert await store.job_with_items("no\x00such") is None
        job, _ = await store.submit("o", "t", {"text": "a\x00b"}, None, 1)
        [claimed] = await store.claim("w", ["t"], 1, 30)
        await store.finish(Lease(job.id, "w", claimed.attempt), Status.FAILED,
                           error="ValueError: bad byte \x00 in input")
        ended = await store.get_job(job.id)
        assert ended is not None and ended.status == Status.FAILED
        assert ended.input == {"text": "a\x00b"}
        assert ended.error is not None and ended.error.startswith("ValueError: bad byte")
    finally:
        await store.close()


async def test_failure_after_commit_still_reaches_local_subscribers(pg_url: str) -> None:
    """The event committed, then the connection failed on its way back to the pool: the
    write reports the error, and this process's subscribers still get the event."""
    store = open_store(pg_url)
    await store.open()
    hub = Hub(store)
    job, _ = await store.submit("o", "t", {}, None, 1)
    [claimed] = await store.claim("w", ["t"], 1, 30)
    got: list[int] = []
    sub = await hub.subscribe(job.id, claimed.seq, lambda ev: got.append(ev.seq))
    await asyncio.sleep(0.5)  # its catch-up from the store is over: only live events now
    healthy = store._connection  # type: ignore[attr-defined]

    @contextlib.asynccontextmanager
    async def fails_after_commit() -> Any:
        async with healthy() as conn:
            yield conn
        raise StoreError("connection lost after commit")

    store._connection = fails_after_commit  # type: ignore[attr-defined]
    with pytest.raises(StoreError):
        await store.finish(Lease(job.id, "w", claimed.attempt), Status.COMPLETED, {"ok": 1})
    store._connection = healthy  # type: ignore[attr-defined]
    for _ in range(100):
        if got:
            break
        await asyncio.sleep(0.02)
    assert got == [claimed.seq + 1], "the committed terminal event reached the subscriber"
    sub.close()
    await store.close()


async def test_cancelled_writes_never_hand_their_results_to_the_next(pg_url: str) -> None:
    """A worker cancels a task mid-write when its lease is lost. The write's connection
    may be mid round trip (a pipeline's BEGIN sent, its results unread); reused from the
    pool, the next write read those results as its own: it applied but saw "SELECT 0",
    and its retry on the general path failed the job with "item cannot go from done to
    done" (or ran uncommitted in a transaction it did not know of). Every write after a
    cancelled one must get its own answer."""
    store = open_store(pg_url)
    await store.open()
    try:
        n = 100
        job, _ = await store.submit("o", "t", {}, None, 1)
        [claimed] = await store.claim("w", ["t"], 1, 60)
        lease = Lease(job.id, "w", claimed.attempt)
        await store.declare_items(lease, [f"k{k}" for k in range(n)])
        for k in range(n):
            # A pipelined write (a progress report), cancelled at a varying point.
            victim = asyncio.create_task(store.report(lease, {"k": k}))
            await asyncio.sleep((k % 15) * 0.0005)
            victim.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await victim
            written = await store.update_items(lease, [ItemUpdate(f"k{k}", ItemStatus.DONE)])
            assert [e.data["ref"] for e in written.events] == [f"k{k}"]
        ended = await store.job_with_items(job.id)
        assert ended is not None
        assert ended[0].progress.done == n
        assert all(it.status == ItemStatus.DONE for it in ended[1])
    finally:
        await store.close()
