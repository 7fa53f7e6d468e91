"""Server crashes: the API server is SIGKILLed and restarted several times while 50
clients watch jobs over WebSocket, SSE and the Python client. Every watcher resumes
from the last seq it saw and ends with exactly the job's event log: every event once,
in order (the raw watchers fail on the first duplicate or gap they are sent)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import httpx
import pytest

from jobwire.client import Client as JobwireClient
from tests.chaos.conftest import APP, Serve
from tests.chaos.wire import TERMINAL, Log, check_log, parse_sse, take, ws_watch
from tests.conftest import guest

pytestmark = pytest.mark.timeout(300)

JOBS = 10
WS_WATCHERS, SSE_WATCHERS, CLIENT_WATCHERS = 25, 20, 5
RESTARTS = 3


async def sse_watch(base: str, token: str, job: str) -> Log:
    log: Log = []
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(30, connect=5),
                                 headers={"Authorization": f"Bearer {token}"}) as http:
        while True:
            headers = {"Last-Event-ID": str(log[-1]["seq"])} if log else {}
            try:
                async with http.stream("GET", f"/api/jobs/{job}/stream",
                                       headers=headers) as r:
                    if r.status_code == 204:  # ended and we are caught up
                        return log
                    assert r.status_code == 200, r.status_code
                    rest = b""
                    async for chunk in r.aiter_bytes():
                        events, rest = parse_sse(rest + chunk)
                        for ev in events:
                            take(log, ev)
                        if log and log[-1]["type"] in TERMINAL:
                            return log
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)


async def client_watch(base: str, token: str, job: str) -> list[int]:
    """The Python client's states: their seqs, in the order it yielded them."""
    seqs: list[int] = []
    client = JobwireClient(base, token, backoff=(0.1, 1.0), poll_wait=5)
    try:
        async for state in client.watch(job):
            seqs.append(state.seq)
    finally:
        await client.aclose()
    return seqs


async def test_sigkill_server_while_50_clients_watch(serve: Serve, procs: Any,
                                                     db_url: str) -> None:
    srv = serve("--no-workers", db=db_url, max_connections=1000)
    for _ in range(2):
        procs("worker", "--db", db_url, "--app", APP, "--lease", "2", "--concurrency", "10")
    c = await guest(srv.url)
    jobs = [(await c.submit("crunch", {"n": 130, "delay": 0.1}))[0]["id"] for _ in range(JOBS)]

    watchers: list[asyncio.Task[Any]] = []
    for k in range(WS_WATCHERS):
        watchers.append(asyncio.create_task(
            ws_watch(srv.url, c.token, [jobs[k % JOBS], jobs[(k + 3) % JOBS]])))
    for k in range(SSE_WATCHERS):
        watchers.append(asyncio.create_task(sse_watch(srv.url, c.token, jobs[k % JOBS])))
    for k in range(CLIENT_WATCHERS):
        watchers.append(asyncio.create_task(client_watch(srv.url, c.token, jobs[k % JOBS])))

    mid_run = 0
    for _ in range(RESTARTS):
        await asyncio.sleep(1.5)
        mid_run += bool((await c.http.get("/api/jobs", params={"status": "active"})).json())
        srv.kill()
        await asyncio.sleep(0.5)  # down for a while: the workers keep writing events
        await asyncio.to_thread(srv.start)

    try:
        results = await asyncio.wait_for(asyncio.gather(*watchers), 180)
    finally:
        for w in watchers:
            w.cancel()
            with contextlib.suppress(BaseException):
                await w

    # (On a slow machine the last restart may come after the jobs ended.)
    assert mid_run >= 2, "the jobs ended before the crashes: the test would prove nothing"
    truth = {}
    for j in jobs:
        job = await c.wait_terminal(j, timeout=60)
        truth[j] = await c.events(j)
        check_log(truth[j], j)
        assert truth[j][-1]["seq"] == job["seq"] and job["status"] == "completed"
    compare = ("seq", "type", "data")
    ws_results = results[:WS_WATCHERS]
    sse_results = results[WS_WATCHERS:WS_WATCHERS + SSE_WATCHERS]
    for logs in ws_results:
        for j, log in logs.items():
            assert [{k: e[k] for k in compare} for e in log] == [
                {k: e[k] for k in compare} for e in truth[j]]
    for k, log in enumerate(sse_results):
        assert [{x: e[x] for x in compare} for e in log] == [
            {x: e[x] for x in compare} for e in truth[jobs[k % JOBS]]]
    for k, seqs in enumerate(results[WS_WATCHERS + SSE_WATCHERS:]):
        assert seqs == sorted(set(seqs)) and seqs[-1] == truth[jobs[k % JOBS]][-1]["seq"]
    await c.http.aclose()
