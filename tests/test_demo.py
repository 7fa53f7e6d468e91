"""The demo tasks do real work: audio features that find the synthesized tempo, and
post extraction from the server's own sample posts."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from jobwire.demo.audio import features, synthesize
from tests.conftest import Proc, guest


@pytest.mark.parametrize("track", ["a", "track-17", "spotify:track:4uLU6hMCjMI75M1A2tKUQC"])
def test_tempo_estimate_finds_the_synthesized_tempo(track: str) -> None:
    _, bpm = synthesize(track)
    found = features(track)
    assert abs(found["tempo_bpm"] - bpm) / bpm < 0.05
    assert found == features(track), "deterministic per track id"
    assert -60 < found["loudness_db"] < 0 and 0 < found["zero_crossing_rate"] < 0.5


@pytest.fixture
def demo(procs: Any, tmp_path: Path) -> Proc:
    proc: Proc = procs("serve", "--db", f"sqlite:///{tmp_path / 'demo.db'}",
                       "--app", "jobwire.demo:jobwire")
    return proc


async def test_analyze_tracks_one_item_per_track(demo: Proc) -> None:
    c = await guest(demo.url)
    tracks = [f"t{k}" for k in range(12)]
    job, _ = await c.submit("analyze_tracks", {"tracks": tracks})
    ended = await c.wait_terminal(job["id"])
    assert ended["status"] == "completed"
    assert ended["progress"] == {"total": 12, "done": 12, "failed": 0}
    assert ended["result"]["tracks"] == 12
    items = (await c.http.get(f"/api/jobs/{job['id']}/items")).json()["items"]
    assert [i["ref"] for i in items] == tracks
    assert all(set(i["result"]) == {"loudness_db", "zero_crossing_rate", "tempo_bpm"}
               for i in items)
    await c.http.aclose()


async def test_extract_post_same_url_is_one_job(demo: Proc) -> None:
    c = await guest(demo.url)
    url = f"{demo.url}/demo/posts/2"
    (a, a_new), (b, b_new) = await asyncio.gather(
        c.submit("extract_post", {"url": url}), c.submit("extract_post", {"url": url}))
    assert a["id"] == b["id"] and a_new != b_new
    ended = await c.wait_terminal(a["id"])
    assert ended["status"] == "completed", ended["error"]
    assert ended["result"]["title"] == "Resuming a WebSocket from a sequence number"
    assert f"{demo.url}/demo/posts/0" in ended["result"]["links"]
    bad = await c.http.post("/api/jobs", json={"task": "extract_post",
                                               "input": {"url": "file:///etc/passwd"}})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "input", "url"]
    await c.http.aclose()
