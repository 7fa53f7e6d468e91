"""Raw WebSocket and SSE watchers that track their last seq and resume, as a careful
client would; the chaos tests compare what they saw with the server's event log."""

from __future__ import annotations

from typing import Any

import orjson


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
