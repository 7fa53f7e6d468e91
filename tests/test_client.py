"""The Python client against real server processes: shared subscriptions, resume across a
server crash, the long-poll fallback, single-flight recovery, clean per-job state."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobwire.client import (
    Client,
    JobActive,
    JobCancelled,
    JobFailed,
    JobNotFound,
    Snapshot,
    SyncClient,
)
from jobwire.client.backoff import Backoff
from jobwire.client.feed import Feed
from jobwire.model import counts_of
from tests.conftest import Proc, free_port

FAST = (0.05, 0.5)  # backoff base and cap: tests should not wait out production delays


class Counting(httpx.AsyncHTTPTransport):
    """Counts requests per path and the most ever in flight at once per path."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: collections.Counter[str] = collections.Counter()
        self.in_flight: collections.Counter[str] = collections.Counter()
        self.peak: collections.Counter[str] = collections.Counter()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.sent[path] += 1
        self.in_flight[path] += 1
        self.peak[path] = max(self.peak[path], self.in_flight[path])
        try:
            return await super().handle_async_request(request)
        finally:
            self.in_flight[path] -= 1


async def metric(url: str, name: str) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(url + "/metrics")).text
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found, text
    return float(found.group(1))


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.05)


async def collect(client: Client, job_id: str, started: asyncio.Event | None = None,
                  on_state: Callable[[Snapshot], None] | None = None) -> list[Snapshot]:
    """Every state one watcher sees, in order."""
    seen: list[Snapshot] = []
    async for snap in client.watch(job_id):
        seen.append(snap)
        if on_state is not None:
            on_state(snap)
        if started is not None:
            started.set()
    return seen


def assert_gap_free(seen: list[Snapshot], final: dict[str, Any]) -> None:
    seqs = [s.seq for s in seen]
    assert seqs == list(range(seqs[0], final["seq"] + 1)), seqs
    last = seen[-1]
    assert last.status == final["status"] and dict(last.progress) == final["progress"]
    for snap in seen:  # every state is consistent: counts agree with the items
        assert counts_of(snap.items.values())["done"] == snap.progress["done"]


@pytest.fixture
async def client(server: Proc) -> AsyncIterator[Client]:
    async with Client(server.url, backoff=FAST) as c:
        yield c


async def test_twenty_watchers_share_one_subscription(client: Client, server: Proc,
                                                      tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    job, created = await client.submit("steps", {"n": 5, "gate": str(gate)})
    assert created
    started = [asyncio.Event() for _ in range(20)]
    watchers = [asyncio.create_task(collect(client, job["id"], ev)) for ev in started]
    await asyncio.gather(*(ev.wait() for ev in started))

    # The subscription follows the first state (loaded over HTTP) once the socket is up.
    await eventually(lambda: _metric_is(server.url, "jobwire_subscriptions", 1))
    assert client.feeds[job["id"]].watchers == 20
    assert await metric(server.url, "jobwire_subscriptions") == 1
    gate.touch()
    seen = await asyncio.gather(*watchers)

    final = await client.job(job["id"])
    assert final["status"] == "completed"
    for states in seen:
        assert_gap_free(states, final)
        assert states[-1].result == {"ran": 5}
    assert client.feeds == {}
    await eventually(lambda: _metric_is(server.url, "jobwire_subscriptions", 0))


async def _metric_is(url: str, name: str, value: float) -> bool:
    return await metric(url, name) == value


async def test_a_watcher_far_behind_skips_to_newer_states(server: Proc, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    async with Client(server.url, backoff=FAST, backlog=3) as client:
        job, _ = await client.submit("steps", {"n": 10, "gate": str(gate)})
        slow = client.watch(job["id"])
        first = await anext(slow)  # then it does not read while the job runs
        gate.touch()
        assert await client.wait(job["id"]) == {"ran": 10}
        final = await client.job(job["id"])
        rest = [s async for s in slow]
    assert len(rest) == 3
    assert [s.seq for s in rest] == sorted({s.seq for s in rest}) and rest[0].seq > first.seq
    assert_gap_free(rest[-1:], final)  # the last state it gets is the final one


async def test_last_watcher_leaving_unsubscribes(client: Client, server: Proc) -> None:
    job, _ = await client.submit("block", {})

    async def first_state() -> Snapshot:
        async for snap in client.watch(job["id"]):
            return snap  # leaving the loop early ends this watcher
        raise AssertionError("no state")

    states = await asyncio.gather(*(first_state() for _ in range(3)))
    assert {s.id for s in states} == {job["id"]}
    assert client.feeds == {}
    await eventually(lambda: _metric_is(server.url, "jobwire_subscriptions", 0))
    await client.cancel(job["id"])
    with pytest.raises(JobCancelled):
        await client.wait(job["id"])


async def test_server_killed_mid_job_every_watcher_gets_every_seq(
        client: Client, server: Proc, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    job, _ = await client.submit("steps", {"n": 30, "delay": 0.05, "gate": str(gate)})
    started = [asyncio.Event() for _ in range(5)]
    halfway = asyncio.Event()

    def on_state(snap: Snapshot) -> None:
        if snap.progress["done"] >= 5:
            halfway.set()

    watchers = [asyncio.create_task(collect(client, job["id"], ev, on_state)) for ev in started]
    await asyncio.gather(*(ev.wait() for ev in started))
    gate.touch()
    await halfway.wait()
    server.kill()
    server.start()  # same port, same database; the job's lease expires and it is retried
    seen = await asyncio.wait_for(asyncio.gather(*watchers), 60)

    final = await client.job(job["id"])
    assert final["status"] == "completed" and final["progress"]["done"] == 30
    for states in seen:
        assert_gap_free(states, final)
        assert "retrying" in [s.event["type"] for s in states if s.event is not None]
        assert sorted(states[-1].items) == sorted(f"i{k}" for k in range(30))


async def test_websocket_blocked_falls_back_to_one_poller_per_job(server: Proc,
                                                                  tmp_path: Path) -> None:
    blocked = free_port()  # nothing listens here: the socket cannot be opened
    counting = Counting()
    async with Client(server.url, ws_url=f"ws://127.0.0.1:{blocked}/api/ws", backoff=FAST,
                      poll_wait=5, transport=counting) as client:
        gate = tmp_path / "gate"
        jobs = [(await client.submit("steps", {"n": 4, "gate": str(gate)}))[0] for _ in range(2)]
        started = [[asyncio.Event() for _ in range(10)] for _ in jobs]
        watchers = [asyncio.create_task(collect(client, job["id"], ev))
                    for job, evs in zip(jobs, started, strict=True) for ev in evs]
        await asyncio.gather(*(ev.wait() for evs in started for ev in evs))
        await eventually(lambda: _true(client.connection.mode == "polling"))
        assert sorted(client.connection.pollers) == sorted(j["id"] for j in jobs)
        gate.touch()
        seen = await asyncio.gather(*watchers)

        for job, k in zip(jobs, range(0, 20, 10), strict=True):
            final = await client.job(job["id"])
            assert final["status"] == "completed"
            for states in seen[k:k + 10]:
                assert_gap_free(states, final)
            assert counting.peak[f"/api/jobs/{job['id']}/events"] == 1  # one poller per job

        # The socket works again (a proxy now forwards it): the client switches back.
        async with forward(blocked, server.port):
            job, _ = await client.submit("block", {})
            waiting = asyncio.create_task(client.wait(job["id"]))
            await eventually(lambda: _true(client.connection.mode == "socket"))
            assert client.connection.pollers == {}
            await client.cancel(job["id"])
            with pytest.raises(JobCancelled):
                await waiting


async def _true(value: bool) -> bool:
    return value


@contextlib.asynccontextmanager
async def forward(port: int, target: int) -> AsyncIterator[None]:
    """A TCP proxy from `port` to `target` on localhost."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    proxy = await asyncio.start_server(handle, "127.0.0.1", port, family=socket.AF_INET)
    try:
        yield
    finally:
        proxy.close()


async def test_server_limits_push_jobs_to_polling(procs: Any, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """One subscription per socket and one socket per owner: what does not fit is polled."""
    monkeypatch.setenv("JOBWIRE_MAX_SUBSCRIPTIONS", "1")
    monkeypatch.setenv("JOBWIRE_MAX_CONNECTIONS", "1")
    server: Proc = procs("serve", "--db", f"sqlite:///{tmp_path / 'limits.db'}")
    gate = tmp_path / "gate"
    async with Client(server.url, backoff=FAST, poll_wait=5) as first:
        jobs = [(await first.submit("steps", {"n": 2, "gate": str(gate)}))[0] for _ in range(2)]
        watching = [asyncio.create_task(first.wait(j["id"])) for j in jobs]
        await eventually(lambda: _true(len(first.connection.pollers) == 1))
        assert first.connection.mode == "socket"  # one job on the socket, one polled
        gate.touch()
        assert await asyncio.gather(*watching) == [{"ran": 2}, {"ran": 2}]

        async with Client(server.url, first.token, backoff=FAST, poll_wait=5) as second:
            gate2 = tmp_path / "gate2"
            job, _ = await second.submit("steps", {"n": 2, "gate": str(gate2)})
            waiting = asyncio.create_task(second.wait(job["id"]))
            # The owner's one socket is taken: the server closes the second with 4429.
            await eventually(lambda: _true(second.connection.mode == "polling"))
            gate2.touch()
            assert await waiting == {"ran": 2}


async def test_a_refused_subscription_refused_again_keeps_one_poller(
        procs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job the socket cannot carry is polled; when the server refuses it again (a
    re-subscribe after a resync), the poller already running goes on alone."""
    monkeypatch.setenv("JOBWIRE_MAX_SUBSCRIPTIONS", "1")
    server: Proc = procs("serve", "--db", f"sqlite:///{tmp_path / 'limits.db'}")
    gate = tmp_path / "gate"
    async with Client(server.url, backoff=FAST, poll_wait=5) as jw:
        jobs = [(await jw.submit("steps", {"n": 2, "gate": str(gate)}))[0] for _ in range(2)]
        watching = [asyncio.create_task(jw.wait(j["id"])) for j in jobs]
        await eventually(lambda: _true(len(jw.connection.pollers) == 1))
        [(polled, poller)] = jw.connection.pollers.items()
        jw.connection._send(op="subscribe", job=polled, after=0)  # refused again: 429
        await asyncio.sleep(0.5)
        assert jw.connection.pollers == {polled: poller}
        assert not poller.task.done()
        gate.touch()
        assert await asyncio.gather(*watching) == [{"ran": 2}, {"ran": 2}]


async def test_concurrent_recover_is_one_request(client: Client, server: Proc) -> None:
    jobs = [(await client.submit("block", {}))[0] for _ in range(3)]
    counting = Counting()
    async with Client(server.url, client.token, transport=counting, backoff=FAST) as other:
        results = await asyncio.gather(*(other.recover() for _ in range(10)))
        assert counting.sent["/api/jobs"] == 1
        assert all(r is results[0] for r in results)
        assert sorted(j["id"] for j in results[0]) == sorted(j["id"] for j in jobs)
        assert sorted(other.feeds) == sorted(j["id"] for j in jobs)  # watched from now on
        for job in jobs:
            await other.cancel(job["id"])
        for job in jobs:
            with pytest.raises(JobCancelled):
                await other.wait(job["id"])


async def test_restarted_process_recovers_from_its_state_file(server: Proc,
                                                              tmp_path: Path) -> None:
    state = tmp_path / "client.json"
    gates = tmp_path / "ended", tmp_path / "active"
    async with Client(server.url, state_file=state, backoff=FAST) as first:
        ended, _ = await first.submit("steps", {"n": 2, "gate": str(gates[0])})
        async for _ in first.watch(ended["id"]):
            break  # the process "dies" while the job runs
    async with httpx.AsyncClient(base_url=server.url,
                                 headers={"Authorization": f"Bearer {first.token}"}) as http:
        # Meanwhile the saved job ends, and another job (not in the file) starts.
        gates[0].touch()
        while (await http.get(f"/api/jobs/{ended['id']}")).json()["status"] != "completed":
            await asyncio.sleep(0.05)
        active = (await http.post("/api/jobs", json={
            "task": "steps", "input": {"n": 1, "gate": str(gates[1])}})).json()["job"]
    async with Client(server.url, state_file=state, backoff=FAST) as second:
        assert second.token == first.token
        recovered = await second.recover()
        # It returns the active jobs, and watches those and the saved one, ended or not.
        assert [j["id"] for j in recovered] == [active["id"]]
        assert set(second.feeds) == {ended["id"], active["id"]}
        deadline = time.monotonic() + 10  # the saved job's end is seen: the file forgets it
        while ended["id"] in state.read_text():
            assert time.monotonic() < deadline, state.read_text()
            await asyncio.sleep(0.05)
        assert active["id"] in state.read_text()
        gates[1].touch()
        assert await second.wait(active["id"]) == {"ran": 1}
    assert active["id"] not in state.read_text()  # ended and seen: nothing left to recover


async def test_second_job_sees_none_of_the_first_jobs_state(client: Client) -> None:
    first, _ = await client.submit("steps", {"n": 3, "fail_at": 0})
    second, _ = await client.submit("steps", {"n": 2, "delay": 0.02})
    first_states = await collect(client, first["id"])
    second_states = await collect(client, second["id"])  # right after, same connection

    assert first_states[-1].items["i0"]["status"] == "failed"
    assert sorted(first_states[-1].items) == ["i0", "i1", "i2"]
    for snap in second_states:
        assert snap.id == second["id"] and snap.job["task"] == "steps"
        assert set(snap.items) <= {"i0", "i1"}
        assert all(it["status"] != "failed" for it in snap.items.values())
        assert snap.progress["failed"] == 0 and snap.progress["total"] in (0, 2)
    assert second_states[-1].status == "completed"
    assert second_states[-1].progress == {"total": 2, "done": 2, "failed": 0}


class RecordingLink:
    """Stands in for the connection so the test alone decides what a feed receives."""

    def __init__(self) -> None:
        self.subscribed: list[int] = []

    def subscribe(self, feed: Feed) -> None:
        self.subscribed.append(feed.seq)

    def unsubscribe(self, feed: Feed) -> None:
        pass


async def test_feed_applies_events_in_seq_order_and_resyncs_on_a_gap(
        client: Client, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    job, _ = await client.submit("steps", {"n": 3, "gate": str(gate)})
    other, _ = await client.submit("steps", {"n": 3})
    while "items" not in [e["type"] for e in await client.api.events(job["id"], 0, wait=1)]:
        pass  # the job declared its items and now waits at the gate
    link = RecordingLink()
    feed = Feed(job["id"], client.api, link, Backoff, lambda _: None)
    queue = feed.attach()
    feed.start()
    first = await queue.get()
    assert isinstance(first, Snapshot) and link.subscribed == [first.seq]
    gate.touch()
    await client.wait(job["id"])
    await client.wait(other["id"])
    log = {e["seq"]: e for e in await client.api.events(job["id"], 0)}
    foreign = await client.api.events(other["id"], 0)

    feed.deliver([log[first.seq + 1]])
    feed.deliver([log[first.seq + 1], log[first.seq - 1], *foreign])  # old, dup, other job
    feed.deliver([log[first.seq + 3]])  # seq + 2 is missing: reload from the server
    states = [await queue.get() for _ in range(3)]
    assert isinstance(states[0], Snapshot) and states[0].seq == first.seq + 1
    assert isinstance(states[1], Snapshot) and states[1].event is None  # the reload
    assert states[1].seq == max(log) and states[1].status == "completed"
    assert states[1].items == {it["ref"]: it for it in (await client.api.request(
        "GET", f"/api/jobs/{job['id']}/items")).json()["items"]}
    assert states[2] is None and feed.closed  # terminal: the feed ends its watchers


async def test_job_calls_and_typed_errors(client: Client, server: Proc) -> None:
    job, created = await client.submit("echo", {"x": 1}, key="k1")
    assert created and client.token
    assert await client.wait(job["id"]) == {"x": 1}

    boom, _ = await client.submit("boom")
    with pytest.raises(JobFailed, match="boom on purpose") as failed:
        await client.wait(boom["id"])
    assert failed.value.job["status"] == "failed"

    blocker, _ = await client.submit("block", {}, key="b")
    again, created = await client.submit("block", {}, key="b")
    assert again["id"] == blocker["id"] and not created
    assert [j["id"] for j in await client.jobs("active")] == [blocker["id"]]
    with pytest.raises(JobActive):
        await client.delete(blocker["id"])
    await client.cancel(blocker["id"])
    with pytest.raises(JobCancelled):
        await client.wait(blocker["id"])
    await client.delete(blocker["id"])
    with pytest.raises(JobNotFound):
        await client.job(blocker["id"])

    async with Client(server.url) as stranger:  # another guest sees nothing of ours
        with pytest.raises(JobNotFound):
            await stranger.wait(job["id"])


def test_sync_client(server: Proc) -> None:
    with SyncClient(server.url, backoff=FAST) as client:
        job, _ = client.submit("steps", {"n": 3})
        states = list(client.watch(job["id"]))
        assert states[-1].status == "completed"
        assert client.wait(job["id"]) == {"ran": 3}
        assert [j["id"] for j in client.jobs()] == [job["id"]]


async def test_login_brings_the_guest_jobs_to_the_user(server: Proc, db_url: str,
                                                       tmp_path: Path) -> None:
    from tests.test_cli_server import jobwire

    user_token = jobwire("users", "add", "carol", "--db", db_url).stdout.strip()
    async with Client(server.url, state_file=tmp_path / "state.json") as client:
        job, _ = await client.submit("block", {})
        guest = client.token
        assert await client.login(user_token) == 1
        mine = await client.jobs(status="active")
        assert [j["id"] for j in mine] == [job["id"]] and mine[0]["owner"] == "user:carol"
        await client.cancel(job["id"])
        with pytest.raises(JobCancelled):
            await client.wait(job["id"])
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.get("/api/jobs", headers={"Authorization": f"Bearer {guest}"})
        assert r.status_code == 401, "the claimed guest session is gone"
    async with Client(server.url, state_file=tmp_path / "state.json") as again:
        assert again.token == user_token, "the session file now holds the user's token"
