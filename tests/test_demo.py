"""The demo tasks do real work: audio features that find the synthesized tempo, and
post extraction from the server's own sample posts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from jobwire.demo.audio import features, synthesize
from tests.conftest import Proc, guest
from tests.rawhttp import head, page, serve


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


async def test_extract_post_same_url_is_one_job(procs: Any, tmp_path: Path) -> None:
    """Two submits of one URL at once: one job, `created` for exactly one of them. Workers
    start only after both answered: the demo's own page is extracted in milliseconds, so
    a worker could end the job between the two, and the second rightly start another."""
    db = f"sqlite:///{tmp_path / 'demo.db'}"
    demo: Proc = procs("serve", "--db", db, "--app", "jobwire.demo:jobwire", "--no-workers")
    c = await guest(demo.url)
    url = f"{demo.url}/demo/posts/2"
    (a, a_new), (b, b_new) = await asyncio.gather(
        c.submit("extract_post", {"url": url}), c.submit("extract_post", {"url": url}))
    assert a["id"] == b["id"] and a_new != b_new
    procs("worker", "--db", db, "--app", "jobwire.demo:jobwire")
    ended = await c.wait_terminal(a["id"])
    assert ended["status"] == "completed", ended["error"]
    assert ended["result"]["title"] == "Resuming a WebSocket from a sequence number"
    assert f"{demo.url}/demo/posts/0" in ended["result"]["links"]
    bad = await c.http.post("/api/jobs", json={"task": "extract_post",
                                               "input": {"url": "file:///etc/passwd"}})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "input", "url"]
    await c.http.aclose()


async def test_extract_post_refuses_what_is_not_public(demo: Proc) -> None:
    """By default a guest cannot make the server fetch its own network, in any spelling."""
    c = await guest(demo.url)
    port = demo.url.rsplit(":", 1)[1]
    urls = [f"{demo.url}/docs", f"http://localhost:{port}/docs",
            f"http://2130706433:{port}/docs", f"http://[::ffff:127.0.0.1]:{port}/docs"]
    jobs = [job for job, _ in await asyncio.gather(
        *(c.submit("extract_post", {"url": url}) for url in urls))]
    for job, url in zip(jobs, urls, strict=True):
        ended = await c.wait_terminal(job["id"])
        assert ended["status"] == "failed" and ended["result"] is None
        assert ended["error"].startswith(f"Refused: refused to fetch {url}: ")
        assert "a loopback address" in ended["error"]
        items = (await c.http.get(f"/api/jobs/{job['id']}/items")).json()["items"]
        assert [(i["ref"], i["status"], i["result"]) for i in items] == [
            ("fetch", "failed", None), ("extract", "pending", None)]
        assert items[0]["error"] == ended["error"].removeprefix("Refused: ")
        events = await c.events(job["id"])
        assert "Swagger" not in str(events)  # nothing of the page, anywhere
    await c.http.aclose()


async def test_credentials_in_a_url_reach_no_log_and_no_error(demo: Proc) -> None:
    c = await guest(demo.url)
    secret = "hunter2-s3cret"
    for path in ["/demo/posts/1", "/docs"]:
        url = demo.url.replace("http://", f"http://alice:{secret}@") + path
        job, _ = await c.submit("extract_post", {"url": url})
        ended = await c.wait_terminal(job["id"])
        assert ended["status"] == "failed"
        assert ended["error"] == (f"Refused: refused to fetch {demo.url.replace('//', '//***@')}"
                                  f"{path}: URLs with credentials are not fetched")
        items = (await c.http.get(f"/api/jobs/{job['id']}/items")).json()
        assert secret not in str(items) and secret not in str(await c.events(job["id"]))
    await c.http.aclose()
    demo.stop()
    log = demo.log.read_text()
    assert "URLs with credentials are not fetched" in log and secret not in log


async def test_extract_post_settings_come_from_the_environment(
        procs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """JOBWIRE_FETCH_ALLOW_PRIVATE lets the task fetch loopback; JOBWIRE_FETCH_DEADLINE
    cuts a page that drips forever."""
    async def drip(host: str) -> AsyncIterator[bytes]:
        yield head()
        for _ in range(120):  # a minute at most, should the deadline fail
            yield b"<p>drip</p>"
            await asyncio.sleep(0.5)

    monkeypatch.setenv("JOBWIRE_FETCH_ALLOW_PRIVATE", "1")
    monkeypatch.setenv("JOBWIRE_FETCH_DEADLINE", "2")
    demo: Proc = procs("serve", "--db", f"sqlite:///{tmp_path / 'demo.db'}",
                       "--app", "jobwire.demo:jobwire")
    c = await guest(demo.url)
    async with serve({"/": drip, "/page": page(b"<title>Inside</title><p>hello</p>")}) as base:
        submitted = time.monotonic()
        (fine, _), (slow, _) = await asyncio.gather(
            c.submit("extract_post", {"url": f"{base}/page"}),
            c.submit("extract_post", {"url": f"{base}/"}))
        done = await c.wait_terminal(fine["id"])
        assert done["status"] == "completed", done["error"]
        assert (done["result"]["title"], done["result"]["text"]) == ("Inside", "hello")
        cut = await c.wait_terminal(slow["id"], timeout=15)
    assert cut["error"] == f"FetchError: gave up on {base}/: the fetch took longer than 2 s"
    assert time.monotonic() - submitted < 8
    await c.http.aclose()


async def test_extract_post_retries_a_503_and_fails_a_404_at_once(
        procs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What may pass (5xx) is retried with backoff; what would not (a 404) fails on the
    first attempt, its fetch item failed."""
    answers = ["503 Service Unavailable", "503 Service Unavailable", "200 OK"]

    async def flaky(host: str) -> AsyncIterator[bytes]:
        async for data in page(b"<title>Back</title><p>up</p>", answers.pop(0))(host):
            yield data

    monkeypatch.setenv("JOBWIRE_FETCH_ALLOW_PRIVATE", "1")
    demo: Proc = procs("serve", "--db", f"sqlite:///{tmp_path / 'demo.db'}",
                       "--app", "jobwire.demo:jobwire")
    c = await guest(demo.url)
    async with serve({"/flaky": flaky, "/gone": page(b"", "404 Not Found")}) as base:
        (back, _), (gone, _) = await asyncio.gather(
            c.submit("extract_post", {"url": f"{base}/flaky"}),
            c.submit("extract_post", {"url": f"{base}/gone"}))
        missing = await c.wait_terminal(gone["id"])
        done = await c.wait_terminal(back["id"])
    assert (missing["status"], missing["attempt"]) == ("failed", 1)
    assert missing["error"] == f"FetchError: {base}/gone answered 404 Not Found"
    assert "retrying" not in [e["type"] for e in await c.events(gone["id"])]
    items = (await c.http.get(f"/api/jobs/{gone['id']}/items")).json()["items"]
    assert [(i["ref"], i["status"]) for i in items] == [("fetch", "failed"), ("extract", "pending")]

    assert (done["status"], done["attempt"], done["result"]["title"]) == ("completed", 3, "Back")
    retries = [e["data"] for e in await c.events(back["id"]) if e["type"] == "retrying"]
    assert [(r["attempt"], r["error"]) for r in retries] == [
        (n, f"Unavailable: {base}/flaky answered 503 Service Unavailable") for n in (1, 2)]
    items = (await c.http.get(f"/api/jobs/{back['id']}/items")).json()["items"]
    assert [(i["ref"], i["status"]) for i in items] == [("fetch", "done"), ("extract", "done")]
    await c.http.aclose()
