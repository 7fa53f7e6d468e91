"""Live delivery: WebSocket and SSE resume after a disconnect or a server crash with no
gap and no duplicate, and a subscription only ever carries its own job."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import websockets

from jobwire.api import frames, live
from jobwire.api.live import SocketSession
from jobwire.hub import Hub
from jobwire.model import Event
from jobwire.settings import Settings
from tests.conftest import Client, Proc, guest
from tests.wsframes import Messages

TERMINAL = {"completed", "failed", "cancelled"}


def ws_url(base: str, token: str) -> str:
    return base.replace("http://", "ws://") + f"/api/ws?token={token}"


async def ws_collect(base: str, token: str, job: str, after: int, stop_after: int | None
                     ) -> list[dict[str, Any]]:
    """Subscribe from `after`; return events until terminal, or drop the socket after
    `stop_after` events as a flaky network would."""
    got: list[dict[str, Any]] = []
    async with websockets.connect(ws_url(base, token)) as ws:
        await ws.send(json.dumps({"op": "subscribe", "job": job, "after": after}))
        received = Messages(ws)
        while True:
            msg = await asyncio.wait_for(received.recv(), 20)
            if "op" in msg:
                assert msg["op"] == "subscribed", msg
                continue
            got.append(msg)
            if msg["type"] in TERMINAL or (stop_after is not None and len(got) >= stop_after):
                return got


def assert_complete(events: list[dict[str, Any]], job: str) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), "gap or duplicate"
    assert all(e["job"] == job for e in events)
    assert events[-1]["type"] in TERMINAL


async def test_websocket_resumes_after_disconnect(client: Client, shared_server: Proc) -> None:
    job, _ = await client.submit("steps", {"n": 60, "delay": 0.01})
    events: list[dict[str, Any]] = []
    while not events or events[-1]["type"] not in TERMINAL:
        last = events[-1]["seq"] if events else 0
        events += await ws_collect(shared_server.url, client.token, job["id"], last, 25)
    assert_complete(events, job["id"])
    assert events == await client.events(job["id"]), "live events equal the stored log"


async def test_sse_resumes_from_last_event_id(client: Client) -> None:
    job, _ = await client.submit("steps", {"n": 60, "delay": 0.01})
    events: list[dict[str, Any]] = []
    last_id: str | None = None
    while not events or events[-1]["type"] not in TERMINAL:
        headers = {"Last-Event-ID": last_id} if last_id else {}
        async with client.http.stream("GET", f"/api/jobs/{job['id']}/stream",
                                      headers=headers) as r:
            assert r.status_code == 200
            frame: dict[str, str] = {}
            taken = 0
            async for line in r.aiter_lines():
                if line.startswith(("id:", "event:", "data:")):
                    name, _, value = line.partition(": ")
                    frame[name] = value
                elif line == "" and "data" in frame:
                    ev = json.loads(frame["data"])
                    assert int(frame["id"]) == ev["seq"] and frame["event"] == ev["type"]
                    events.append(ev)
                    last_id, frame, taken = frame["id"], {}, taken + 1
                    if taken == 20:
                        break  # drop the connection mid-stream
    assert_complete(events, job["id"])
    r = await client.http.get(f"/api/jobs/{job['id']}/stream",
                              headers={"Last-Event-ID": last_id or "0"})
    assert r.status_code == 204, "a finished, caught-up stream tells EventSource to stop"


async def test_one_socket_many_jobs_only_subscribed_ones(client: Client,
                                                          shared_server: Proc) -> None:
    a, _ = await client.submit("steps", {"n": 20, "delay": 0.005})
    b, _ = await client.submit("steps", {"n": 20, "delay": 0.005})
    noise, _ = await client.submit("steps", {"n": 20, "delay": 0.005})
    seen: dict[str, list[int]] = {a["id"]: [], b["id"]: []}
    async with websockets.connect(ws_url(shared_server.url, client.token)) as ws:
        for job in (a, b):
            await ws.send(json.dumps({"op": "subscribe", "job": job["id"], "after": 0}))
        ended, received = 0, Messages(ws)
        while ended < 2:
            msg = await asyncio.wait_for(received.recv(), 20)
            if "op" in msg:
                continue
            assert msg["job"] in seen, "an event of a job this socket never subscribed to"
            seen[msg["job"]].append(msg["seq"])
            ended += msg["type"] in TERMINAL
    for seqs in seen.values():
        assert seqs == list(range(1, len(seqs) + 1))
    await client.wait_terminal(noise["id"])


async def test_unsubscribe_stops_events(client: Client, shared_server: Proc) -> None:
    job, _ = await client.submit("steps", {"n": 200, "delay": 0.01})
    async with websockets.connect(ws_url(shared_server.url, client.token)) as ws:
        await ws.send(json.dumps({"op": "subscribe", "job": job["id"], "after": 0}))
        received = Messages(ws)
        while "seq" not in await received.recv():
            pass
        await ws.send(json.dumps({"op": "unsubscribe", "job": job["id"]}))
        while (await received.recv()).get("op") != "unsubscribed":
            pass
        try:
            extra: object = await asyncio.wait_for(received.recv(), 0.5)
        except TimeoutError:
            extra = None
        assert extra is None, f"event after unsubscribe: {extra!r}"
    await client.http.post(f"/api/jobs/{job['id']}/cancel")


async def test_websocket_resumes_across_a_server_crash(procs: Any, db_url: str) -> None:
    """SIGKILL the server mid-job; after restart the client resumes from its last seq and
    ends with the full log. The job itself was retried after its lease ran out."""
    server: Proc = procs("serve", "--db", db_url, "--lease", "1")
    c = await guest(server.url)
    job, _ = await c.submit("steps", {"n": 30, "delay": 0.03})
    events = await ws_collect(server.url, c.token, job["id"], 0, 15)
    server.kill()
    server.start()
    while events[-1]["type"] not in TERMINAL:
        try:
            events += await ws_collect(server.url, c.token, job["id"], events[-1]["seq"], None)
        except (OSError, websockets.ConnectionClosed):
            await asyncio.sleep(0.1)
    assert_complete(events, job["id"])
    assert events[-1]["type"] == "completed"
    assert "retrying" in [e["type"] for e in events]
    async with httpx.AsyncClient(base_url=server.url,
                                 headers={"Authorization": f"Bearer {c.token}"}) as http:
        final = (await http.get(f"/api/jobs/{job['id']}")).json()
    assert final["progress"] == {"total": 30, "done": 30, "failed": 0}
    await c.http.aclose()


class EndingStore:
    """Each job is at seq 1 when first looked up, and its terminal event 2 is committed
    right after: so the hub delivers it while `hub.subscribe` is still starting."""

    def listen(self, hint: Any) -> None:
        pass

    async def get_job(self, job_id: str, owner: str | None = None) -> Any:
        return SimpleNamespace(seq=1)

    async def events(self, job_id: str, after: int, limit: int = 1000) -> list[Event]:
        end = Event(job=job_id, seq=2, type="completed", data={"status": "completed"}, at=0.0)
        return [end] if after < 2 else []


class FakeSocket:
    def __init__(self, settings: Settings, hub: Hub, store: Any,
                 raw: FakeRaw | None = None) -> None:
        runtime = SimpleNamespace(settings=settings, hub=hub, store=store)
        self.app = SimpleNamespace(state=SimpleNamespace(runtime=runtime))
        # Without a raw socket messages go through ASGI (send_text).
        self.scope: dict[str, Any] = {"extensions": {frames.EXTENSION: raw}} if raw else {}
        self.frames: list[Any] = []
        self.closed: int | None = None

    async def send_text(self, text: str) -> None:
        self.frames.append(json.loads(text))

    async def close(self, code: int, reason: str = "") -> None:
        self.closed = code


class FakeRaw:
    """A raw socket (api/frames.py) that keeps the frames written; a slow one's reader
    never reads, so all it was written stays in its backlog."""

    def __init__(self, slow: bool = False) -> None:
        self.written: list[bytes] = []
        self.slow = slow
        self.backlog = 0

    def write(self, frame: bytes) -> bool:
        self.written.append(frame)
        self.backlog += len(frame) if self.slow else 0
        return True

    def pause_above(self, high: int) -> None:
        pass

    async def writable(self) -> None:
        pass

    def frames(self) -> list[Any]:
        """Each frame's JSON, from the header a client reads it by."""
        got = []
        for frame in self.written:
            assert frame[0] == 0x81  # a final text frame
            n, at = frame[1], 2
            if n == 126:
                n, at = int.from_bytes(frame[2:4]), 4
            assert len(frame) == at + n
            got.append(json.loads(frame[at:]))
        return got


class LogStore:
    """Jobs' committed events; each commit hints the hub with its event."""

    def __init__(self) -> None:
        self.log: dict[str, list[Event]] = {}
        self.hint: Any = None

    def listen(self, hint: Any) -> None:
        self.hint = hint

    async def get_job(self, job_id: str, owner: str | None = None) -> Any:
        return SimpleNamespace(seq=len(self.log.get(job_id, [])))

    async def events(self, job_id: str, after: int, limit: int = 1000) -> list[Event]:
        return self.log.get(job_id, [])[after:after + limit]

    def commit(self, job: str, type: str = "progress") -> None:
        log = self.log.setdefault(job, [])
        ev = Event(job=job, seq=len(log) + 1, type=type, data={"pad": "x" * 60}, at=0.0)
        log.append(ev)
        self.hint(job, ev.seq, ev)


async def test_terminal_event_during_subscribe_frees_the_subscription() -> None:
    """However the race falls, a WebSocket subscription ends with its job's terminal
    event: it no longer counts toward the socket's limit nor the subscriptions metric."""
    store = EndingStore()
    hub = Hub(store)  # type: ignore[arg-type]
    ws = FakeSocket(Settings(max_subscriptions=1), hub, store)
    session = SocketSession(ws, "owner")  # type: ignore[arg-type]
    await session.subscribe("a", 1)
    assert session.subs == {} and hub.subscriptions == 0
    await session.subscribe("b", 1)  # the limit of one is free again
    while session.flusher.task is not None or session.pump is not None:
        await asyncio.sleep(0)
    replies = [m.get("op") for m in ws.frames if isinstance(m, dict) and "op" in m]
    assert replies == ["subscribed", "subscribed"], ws.frames
    ends = [m for m in ws.frames if isinstance(m, dict) and m.get("type") == "completed"]
    assert [e["job"] for e in ends] == ["a", "b"], "each terminal event delivered once"
    assert session.subs == {} and hub.subscriptions == 0


async def test_pending_events_share_a_frame_and_replies_come_alone() -> None:
    """What is pending for a socket goes out as one frame: a JSON array of its events in
    order, at most a frame's size of them (one event alone is a plain object), while a
    reply is always a frame of its own, in its place."""
    store = EndingStore()
    events = [Event(job="a", seq=n, type="progress", data={"pad": "x" * 100}, at=0.0)
              for n in range(1, 6)]
    frame_bytes = 2 * len(events[0].wire) + 10  # room for two events per frame
    ws = FakeSocket(Settings(ws_max_frame_bytes=frame_bytes), Hub(store), store)  # type: ignore[arg-type]
    session = SocketSession(ws, "owner")  # type: ignore[arg-type]
    session.reply(op="subscribed", job="a", after=0)
    for ev in events[:3]:
        session.send(ev)
    session.reply(op="unsubscribed", job="a")
    for ev in events[3:]:
        session.send(ev)
    while session.flusher.task is not None or session.pump is not None:
        await asyncio.sleep(0)

    def shape(frame: Any) -> Any:  # an array's seqs, a lone event's seq, a reply's op
        if isinstance(frame, list):
            return [e["seq"] for e in frame]
        return frame["op"] if "op" in frame else frame["seq"]

    assert [shape(f) for f in ws.frames] == ["subscribed", [1, 2], 3, "unsubscribed", [4, 5]]


# A round keeps frames for other sockets up to a budget: all it built, or some.
@pytest.mark.parametrize("room", [live.ROUND_FRAMES_BYTES, 3000])
async def test_many_sockets_on_one_job_each_get_every_event_once_and_in_order(
        room: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sockets following the same job share each round's frames; whatever else each has
    pending (another job's events, a reply, a catch-up from the store, more than a frame's
    size of events), every socket gets each event once, in order, and its replies alone in
    their place; one that does not read is dropped with 1013 while the others go on."""
    monkeypatch.setattr(live, "ROUND_FRAMES_BYTES", room)
    store = LogStore()
    hub = Hub(store)  # type: ignore[arg-type]
    settings = Settings(buffer_bytes=16 << 10, ws_max_frame_bytes=1000)  # ~9 events a frame
    sockets: list[tuple[SocketSession, FakeRaw, tuple[str, ...], int]] = []

    async def connect(*jobs: str, slow: bool = False, after: int = 0) -> None:
        raw = FakeRaw(slow)
        session = SocketSession(FakeSocket(settings, hub, store, raw), "owner")  # type: ignore[arg-type]
        for job in jobs:
            await session.subscribe(job, after)
        sockets.append((session, raw, jobs, after))

    async def settle() -> None:
        while any(s.flusher.task or s.pump for s, *_ in sockets):
            await asyncio.sleep(0)

    async def round_of(*batches: tuple[str, int]) -> None:
        """The batches' events pending at once, then written by a flusher round."""
        for job, n in batches:
            for _ in range(n):
                store.commit(job)
        await settle()

    await connect("a", slow=True)
    for jobs in [("a",)] * 4 + [("b",)] * 2 + [("a", "b")] * 3:
        await connect(*jobs)
    await round_of(("a", 1))
    await round_of(("a", 4), ("b", 4))  # as many events of each job
    await round_of(("a", 20))
    await connect("a", after=30)  # ahead of the job: nothing up to 30
    await settle()
    await connect("a", "b")  # catches up from the store while events come, then live
    store.commit("a")
    sockets[1][0].reply(op="ping")  # in the middle of events pending for the next round
    await round_of(("a", 11), ("b", 1), ("a", 2))
    await round_of(("b", 30), ("a", 30))
    await round_of(("a", 70))
    store.commit("a", "completed")
    await settle()
    store.commit("b", "completed")
    await settle()

    def received(raw: FakeRaw) -> tuple[dict[str, list[int]], list[tuple[str, int]]]:
        """The seqs of each job received, and each reply with the events before it."""
        seqs: dict[str, list[int]] = {}
        replies = []
        for frame in raw.frames():
            for msg in frame if isinstance(frame, list) else [frame]:
                if "op" in msg:
                    assert not isinstance(frame, list), "a reply inside an event array"
                    replies.append((msg["op"], sum(map(len, seqs.values()))))
                else:
                    seqs.setdefault(msg["job"], []).append(msg["seq"])
        return seqs, replies

    every = {job: list(range(1, len(log) + 1)) for job, log in store.log.items()}
    (slow, slow_raw, *_), *others = sockets
    for session, raw, jobs, after in others:
        seqs, replies = received(raw)
        assert seqs == {job: every[job][after:] for job in jobs}, "a gap, duplicate or disorder"
        assert session.ws.frames == []  # type: ignore[attr-defined]  # (all written raw)
        assert [op for op, _ in replies] == ["subscribed"] * len(jobs) + (
            ["ping"] if session is sockets[1][0] else [])
        assert session.subs == {} and session.ws.closed is None  # type: ignore[attr-defined]
    assert received(sockets[1][1])[1][-1] == ("ping", 26), "the reply out of its place"
    # The one that never read: a gap-free start of the job, then closed with 1013.
    seqs, _ = received(slow_raw)
    assert 0 < len(seqs["a"]) < len(every["a"]) and seqs["a"] == every["a"][:len(seqs["a"])]
    assert slow.ws.closed == 1013  # type: ignore[attr-defined]
    assert hub.subscriptions == 0


async def test_events_of_another_process_on_one_sqlite_file_arrive_within_half_a_second(
        procs: Any, tmp_path: Path) -> None:
    """A worker process writes; another process's WebSocket subscriber gets each event
    within half a second (a ring, at worst ten polls of the file), measured from the
    event's own time."""
    db = f"sqlite:///{tmp_path / 'jobwire.db'}"
    api: Proc = procs("serve", "--db", db, "--no-workers")
    procs("worker", "--db", db)
    c = await guest(api.url)
    gate = tmp_path / "gate"
    job, _ = await c.submit("steps", {"n": 40, "delay": 0.02, "gate": str(gate)})
    lags = []
    async with websockets.connect(ws_url(api.url, c.token)) as ws:
        await ws.send(json.dumps({"op": "subscribe", "job": job["id"], "after": 0}))
        received = Messages(ws)
        while (await received.recv()).get("op") != "subscribed":
            pass
        gate.touch()  # items start now: their events are written after we subscribed
        while (msg := await asyncio.wait_for(received.recv(), 20))["type"] not in TERMINAL:
            if msg["type"] == "item":
                lags.append(time.time() - datetime.fromisoformat(msg["at"]).timestamp())
    assert len(lags) == 80  # running and done, 40 items
    assert max(lags) <= 0.5, sorted(lags)[-5:]
