"""Raw WebSocket and SSE watchers that track their last seq and resume, as a careful
client would; the chaos tests compare what they saw with the server's event log."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake, WebSocketException

from tests.wsframes import Messages

TERMINAL = ("completed", "failed", "cancelled")
Log = list[dict[str, Any]]


def ws_url(base: str, token: str | None = None) -> str:
    url = base.replace("http://", "ws://", 1) + "/api/ws"
    return url if token is None else f"{url}?token={token}"


def check_log(events: list[dict[str, Any]], job: str) -> None:
    """seq 1, 2, 3, ... with no gap and no duplicate."""
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), f"job {job}: seqs {seqs[:50]}..."


def parse_sse(buffer: bytes) -> tuple[list[dict[str, Any]], bytes]:
    """Complete SSE frames in `buffer` as events, and the incomplete rest."""
    events = []
    *frames, rest = buffer.split(b"\n\n")
    for frame in frames:
        for line in frame.split(b"\n"):
            if line.startswith(b"data: "):
                events.append(orjson.loads(line[6:]))
    return events, rest


def take(log: Log, ev: dict[str, Any]) -> None:
    """Append the next event; the server must never send a duplicate or skip one."""
    expected = log[-1]["seq"] + 1 if log else 1
    assert ev["seq"] == expected, f"job {ev['job']}: got seq {ev['seq']}, expected {expected}"
    log.append(ev)


async def ws_watch(base: str, token: str, jobs: list[str]) -> dict[str, Log]:
    logs: dict[str, Log] = {j: [] for j in jobs}
    open_jobs = set(jobs)
    while open_jobs:
        try:
            async with connect(ws_url(base, token), open_timeout=5) as ws:
                for j in open_jobs:
                    after = logs[j][-1]["seq"] if logs[j] else 0
                    await ws.send(orjson.dumps({"op": "subscribe", "job": j,
                                                "after": after}).decode())
                async for msg in Messages(ws):
                    if "op" in msg:
                        if msg["op"] == "error" and msg.get("code") == 503:
                            break  # its database is away: resubscribe on a new socket
                        assert msg["op"] == "subscribed", msg
                        continue
                    take(logs[msg["job"]], msg)
                    if msg["type"] in TERMINAL:
                        open_jobs.discard(msg["job"])
                        if not open_jobs:
                            return logs
        except (OSError, WebSocketException, InvalidHandshake, TimeoutError):
            pass  # the server is down: retry from the last seq seen
        await asyncio.sleep(0.2)
    return logs
