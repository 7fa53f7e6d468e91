"""Limits: each refusal is a clear 413/429 (or WebSocket 4429/1013), and the server
stays healthy for everyone else while one client misbehaves."""

from __future__ import annotations

import asyncio
import os
import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.chaos.conftest import Serve
from tests.chaos.wire import check_log, parse_sse, ws_url
from tests.conftest import Client, guest
from tests.wsframes import Messages

pytestmark = pytest.mark.timeout(180)


async def next_reply(ws: ClientConnection, op: str | None = None) -> dict[str, Any]:
    """The next control reply (skipping job events), optionally of one op."""
    while True:
        msg = orjson.loads(await ws.recv())  # replies come alone, events maybe in arrays
        if isinstance(msg, dict) and "op" in msg and (
                op is None or msg["op"] == op or msg["op"] == "error"):
            return dict(msg)


async def subscribe(ws: ClientConnection, job: str, after: int = 0) -> dict[str, Any]:
    await ws.send(orjson.dumps({"op": "subscribe", "job": job, "after": after}).decode())
    return await next_reply(ws, "subscribed")


async def close_code(ws: ClientConnection) -> int | None:
    """Read until the server closes; its close code."""
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await ws.recv()
    return closed.value.rcvd.code if closed.value.rcvd else None


async def test_request_body_and_items_per_job(serve: Serve) -> None:
    srv = serve(max_body_bytes=64 * 1024, max_items_per_job=50)
    c = await guest(srv.url)
    r = await c.http.post("/api/jobs", json={"task": "echo", "input": "x" * 100_000})
    assert r.status_code == 413
    assert r.json() == {"detail": "request body too large: the limit is 65536 bytes"}

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
        for _ in range(9):
            yield b" " * 8192

    r = await c.http.post("/api/jobs", content=chunks(),
                          headers={"content-type": "application/json"})
    assert r.status_code == 413 and "65536" in r.json()["detail"]

    # Items: the task declares them, so the job fails with the reason.
    over, _ = await c.submit("steps", {"n": 51})
    under, _ = await c.submit("steps", {"n": 50})
    over = await c.wait_terminal(over["id"])
    assert over["status"] == "failed"
    assert "declared 51 items; the limit is 50 per job" in over["error"]
    assert (await c.wait_terminal(under["id"]))["status"] == "completed"
    assert (await c.http.get("/healthz")).status_code == 200
    await c.http.aclose()


async def test_subscriptions_per_socket_and_connections_per_owner(serve: Serve) -> None:
    srv = serve(max_subscriptions=3, max_connections=2)
    c = await guest(srv.url)
    jobs = [(await c.submit("block", {}))[0]["id"] for _ in range(4)]
    async with connect(ws_url(srv.url, c.token)) as ws:
        for job in jobs[:3]:
            assert (await subscribe(ws, job))["op"] == "subscribed"
        refused = await subscribe(ws, jobs[3])
        assert refused["code"] == 429 and "at most 3 per connection" in refused["error"]
        await ws.send(orjson.dumps({"op": "unsubscribe", "job": jobs[0]}).decode())
        await next_reply(ws, "unsubscribed")
        assert (await subscribe(ws, jobs[3]))["op"] == "subscribed"

        # Second live connection: an SSE stream. The third, of either kind, is refused.
        async with c.http.stream("GET", f"/api/jobs/{jobs[1]}/stream") as sse:
            assert sse.status_code == 200
            r = await c.http.get(f"/api/jobs/{jobs[2]}/stream")
            assert r.status_code == 429
            assert "at most 2 per owner" in r.json()["detail"]
            async with connect(ws_url(srv.url, c.token)) as third:
                assert await close_code(third) == 4429
            # Another owner is not affected.
            other = await guest(srv.url)
            async with connect(ws_url(srv.url, other.token)) as ws2:
                await ws2.send('{"op": "subscribe", "job": "nope"}')
                assert (await next_reply(ws2))["code"] == 404
            await other.http.aclose()
    # Both closed: the slots come back (released when the server sees the hang-up).
    for _ in range(100):
        async with connect(ws_url(srv.url, c.token)) as ws:
            await ws.send(orjson.dumps({"op": "subscribe", "job": jobs[0]}).decode())
            try:
                assert (await next_reply(ws, "subscribed"))["op"] == "subscribed"
                break
            except ConnectionClosed:
                await asyncio.sleep(0.05)
    else:
        raise AssertionError("the owner's connection slots were never released")
    for job in jobs:
        await c.http.post(f"/api/jobs/{job}/cancel")
    await c.http.aclose()


async def watch(url: str, token: str, job: str) -> list[dict[str, Any]]:
    """All events of `job` over one WebSocket until its terminal event."""
    got: list[dict[str, Any]] = []
    async with connect(ws_url(url, token)) as ws:
        await subscribe(ws, job)
        async for msg in Messages(ws):
            if "op" not in msg:
                got.append(msg)
                if msg["type"] in ("completed", "failed", "cancelled"):
                    return got


async def test_garbage_and_oversized_frames(serve: Serve) -> None:
    """1,000 hostile frames: binary, invalid UTF-8, over the frame limit, not JSON, wrong
    JSON. Each connection either answers with an error reply or closes with a proper
    code; the server stays healthy and a bystander gets every event of its job."""
    srv = serve()
    c = await guest(srv.url)
    job, _ = await c.submit("steps", {"n": 40, "delay": 0.05})
    bystander = asyncio.create_task(watch(srv.url, c.token, job["id"]))
    rng = random.Random(7)
    closes: list[int | None] = []
    errors = 0
    ws = await connect(ws_url(srv.url, c.token), max_size=None)
    for i in range(1000):
        kind = i % 5
        if kind == 0:
            await ws.send(os.urandom(rng.randrange(1, 2048)))  # binary
        elif kind == 1:
            await ws.send(b"\xff\xfe" + os.urandom(64), text=True)  # invalid UTF-8
        elif kind == 2:
            await ws.send("x" * (64 * 1024 + rng.randrange(1, 4096)))  # over the limit
        elif kind == 3:
            await ws.send("".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(100)))
        else:
            await ws.send(orjson.dumps({"op": rng.choice(["subscribe", "x", None]),
                                        "job": rng.choice([1, None, "zz", [], {}]),
                                        "after": rng.choice([-1, "a", 1.5, None])}).decode())
        if kind in (0, 1, 2):
            closes.append(await close_code(ws))
            ws = await connect(ws_url(srv.url, c.token), max_size=None)
        else:
            assert (await next_reply(ws))["op"] == "error"
            errors += 1
    await ws.close()
    assert set(closes) <= {1003, 1007, 1009}, closes
    assert {1003, 1007, 1009} <= set(closes)
    assert errors == 400
    assert (await c.http.get("/healthz")).status_code == 200
    events = await asyncio.wait_for(bystander, 120)
    check_log(events, job["id"])
    assert events[-1]["type"] == "completed"
    assert [e["seq"] for e in events] == [e["seq"] for e in await c.events(job["id"])]
    await c.http.aclose()


async def subscriptions(c: Client) -> float:
    text = (await c.http.get("/metrics")).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("jobwire_subscriptions "))


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# Events in bursts of 100 pile up before they are written; one at a time each is written
# at once, and what the client leaves unread piles up in the connection instead.
@pytest.mark.parametrize("batch", [100, 1])
async def test_client_that_never_reads(serve: Serve, tmp_path: Path, batch: int) -> None:
    """A subscriber that stops reading while its job writes 64 MB of events: the server
    keeps at most its buffer for it, then closes with 1013; it resumes by seq later."""
    srv = serve(buffer_bytes=256 * 1024)
    assert srv.proc is not None
    c = await guest(srv.url)
    warm, _ = await c.submit("chatter", {"n": 200, "size": 16_000})  # warm caches first
    await c.wait_terminal(warm["id"])
    before = rss_kib(srv.proc.pid)

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", srv.port or 0))
    sock.setblocking(False)
    # No compression: the test data would shrink to nothing and fit in kernel buffers.
    ws = await connect(ws_url(srv.url, c.token), sock=sock, max_size=None, max_queue=1,
                       compression=None)
    gate = tmp_path / "go"
    job, _ = await c.submit("chatter", {"n": 4000, "size": 16_000, "gate": str(gate),
                                        "batch": batch})
    await ws.send(orjson.dumps({"op": "subscribe", "job": job["id"], "after": 0}).decode())
    while await subscriptions(c) == 0:  # live before the job writes its events
        await asyncio.sleep(0.05)
    gate.touch()
    done = await c.wait_terminal(job["id"], timeout=120)  # the client reads nothing meanwhile
    assert done["status"] == "completed"
    # The server has dealt with every event once the subscription is gone: dropped for
    # being too slow (or, without a bound, after queueing the terminal event).
    while await subscriptions(c) > 0:
        await asyncio.sleep(0.1)
    grown_mib = (rss_kib(srv.proc.pid) - before) / 1024
    assert grown_mib < 32, f"server RSS grew {grown_mib:.0f} MiB for a client that never reads"

    # Now it reads: a gap-free prefix, then the server's 1013.
    seen: list[dict[str, Any]] = []
    received = Messages(ws)
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            msg = await received.recv()
            if "op" not in msg:
                seen.append(msg)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
    check_log(seen, job["id"])
    assert 0 < len(seen) < done["seq"]

    # Resuming from its last seq, at its own pace, it gets the rest: no gap, no duplicate.
    async with connect(ws_url(srv.url, c.token), max_size=None) as again:
        await subscribe(again, job["id"], after=seen[-1]["seq"])
        received = Messages(again)
        while seen[-1]["type"] != "completed":
            msg = await received.recv()
            if "op" not in msg:
                seen.append(msg)
    check_log(seen, job["id"])
    assert seen[-1]["seq"] == done["seq"]
    await c.http.aclose()


async def test_sse_client_that_never_reads(serve: Serve, tmp_path: Path) -> None:
    """The same for Server-Sent Events: a stream that is not read holds at most its buffer
    (then ends, to be resumed with Last-Event-ID); a stream that is read gets a long
    replay whole, paced to the reader."""
    srv = serve(buffer_bytes=256 * 1024)
    assert srv.proc is not None
    c = await guest(srv.url)
    warm, _ = await c.submit("chatter", {"n": 200, "size": 16_000})
    await c.wait_terminal(warm["id"])
    before = rss_kib(srv.proc.pid)

    gate = tmp_path / "go"
    job, _ = await c.submit("chatter", {"n": 4000, "size": 16_000, "gate": str(gate)})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", srv.port or 0))
    sock.setblocking(False)
    _, writer = await asyncio.open_connection(sock=sock)  # never read
    writer.write(f"GET /api/jobs/{job['id']}/stream HTTP/1.1\r\nHost: x\r\n"
                 f"Authorization: Bearer {c.token}\r\n\r\n".encode())
    while await subscriptions(c) == 0:
        await asyncio.sleep(0.05)
    gate.touch()
    done = await c.wait_terminal(job["id"], timeout=120)
    while await subscriptions(c) > 0:  # dropped for falling behind
        await asyncio.sleep(0.1)
    grown_mib = (rss_kib(srv.proc.pid) - before) / 1024
    assert grown_mib < 32, f"server RSS grew {grown_mib:.0f} MiB for a stream nobody reads"
    writer.close()

    seen: list[dict[str, Any]] = []
    async with c.http.stream("GET", f"/api/jobs/{job['id']}/stream") as r:
        rest = b""
        async for chunk in r.aiter_bytes():
            events, rest = parse_sse(rest + chunk)
            seen.extend(events)
    check_log(seen, job["id"])
    assert seen[-1]["seq"] == done["seq"]  # 64 MB in one stream: never too slow
    await c.http.aclose()
