"""jobwire inside a host FastAPI app: mounted at /jobs, started by the host's lifespan,
callers named by the host's own cookie, jobs submitted from the host's own routes, all
served by a real uvicorn on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import websockets
from fastapi import FastAPI, HTTPException, Request
from starlette.requests import HTTPConnection

import jobwire
from jobwire import Settings
from jobwire.client import Client
from tests import tasks
from tests.conftest import free_port
from tests.wsframes import Messages

HOST_COOKIE = "host_session"  # the host app's own sign-in (a real app would sign it)


def authenticate(conn: HTTPConnection) -> str | None:
    name = conn.cookies.get(HOST_COOKIE)
    return f"user:{name}" if name else None


def host_app(db_url: str, registry: jobwire.Jobwire = tasks.jobwire, *, start: bool = True,
             builtin_auth: bool | None = None, **settings: Any
             ) -> tuple[FastAPI, jobwire.Embedded]:
    """The host: its own lifespan starts jobwire (unless `start` is False: the mistake),
    its own route submits for the signed-in user."""
    jobs = jobwire.asgi(registry, Settings(db=db_url, concurrency=4, lease_seconds=5,
                                           **settings),
                        authenticate=authenticate, builtin_auth=builtin_auth)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with jobs.lifespan():  # beside the host's own resources
            yield

    app = FastAPI(lifespan=lifespan if start else None)
    app.mount("/jobs", jobs)

    @app.post("/reports")
    async def start_report(request: Request) -> dict[str, Any]:
        user = request.cookies.get(HOST_COOKIE)
        if not user:
            raise HTTPException(401)
        body = await request.json()
        job, created = await jobs.submit(f"user:{user}", "steps", body)
        return {"job": job.id, "created": created}

    return app, jobs


class Served:
    """An ASGI app under a real uvicorn on a loopback port, in a thread of its own."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning",
            ws_per_message_deflate=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn exited"
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(20)


@pytest.fixture
def host(db_url: str) -> Iterator[Served]:
    app, _ = host_app(db_url, builtin_auth=True)  # users by cookie, API clients as guests
    with Served(app) as served:
        yield served


def as_user(name: str) -> dict[str, str]:
    return {"Cookie": f"{HOST_COOKIE}={name}"}


async def ws_events(url: str, headers: dict[str, str], job: str, until: str
                    ) -> list[dict[str, Any]]:
    """Events of `job` over the WebSocket until one of type `until`."""
    got: list[dict[str, Any]] = []
    async with websockets.connect(url, additional_headers=headers) as ws:
        await ws.send(json.dumps({"op": "subscribe", "job": job, "after": 0}))
        received = Messages(ws)
        while not got or got[-1]["type"] != until:
            msg = await asyncio.wait_for(received.recv(), 20)
            if msg.get("op") == "subscribed":
                continue
            assert "op" not in msg, msg
            got.append(msg)
    return got


async def sse_events(http: httpx.AsyncClient, job: str) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    async with http.stream("GET", f"/api/jobs/{job}/stream") as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                got.append(json.loads(line[6:]))
    return got


async def test_a_job_from_the_hosts_route_reaches_its_user_live_and_nobody_else(
        host: Served, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    async with httpx.AsyncClient(base_url=host.url, headers=as_user("alice"),
                                 timeout=20) as alice:
        r = await alice.post("/reports", json={"n": 3, "gate": str(gate)})
        assert r.status_code == 200, r.text
        job = r.json()["job"]
        ws_url = host.url.replace("http://", "ws://") + "/jobs/api/ws"
        ws = asyncio.create_task(ws_events(ws_url, as_user("alice"), job, "completed"))
        async with httpx.AsyncClient(base_url=host.url + "/jobs", headers=as_user("alice"),
                                     timeout=20) as http:
            sse = asyncio.create_task(sse_events(http, job))
            # The job waits at its gate until both are subscribed: what follows is live.
            async with httpx.AsyncClient(base_url=host.url + "/jobs", timeout=20) as probe:
                deadline = time.monotonic() + 20
                while "jobwire_subscriptions 2.0" not in (await probe.get("/metrics")).text:
                    assert time.monotonic() < deadline, "never subscribed"
                    await asyncio.sleep(0.05)
            gate.touch()
            by_ws, by_sse = await asyncio.wait_for(asyncio.gather(ws, sse), 30)
    for events in (by_ws, by_sse):
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert events[-1]["type"] == "completed" and events[-1]["job"] == job
        assert events[-1]["data"]["progress"] == {"total": 3, "done": 3, "failed": 0}

    async with httpx.AsyncClient(base_url=host.url + "/jobs", headers=as_user("bob"),
                                 timeout=20) as bob:
        assert (await bob.get(f"/api/jobs/{job}")).status_code == 404
        assert (await bob.get(f"/api/jobs/{job}/stream")).status_code == 404
        assert (await bob.get("/api/jobs")).json() == []
        async with websockets.connect(ws_url, additional_headers=as_user("bob")) as ws:
            await ws.send(json.dumps({"op": "subscribe", "job": job, "after": 0}))
            reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert reply["op"] == "error" and "not found" in reply["error"], reply
        # The host's cookie is sent whichever page opens a socket: another site's is refused.
        with pytest.raises(websockets.ConnectionClosed) as closed:
            async with websockets.connect(ws_url, origin="http://evil.example",  # type: ignore[arg-type]
                                          additional_headers=as_user("alice")) as ws:
                await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403


async def test_the_python_client_works_under_the_prefix(host: Served) -> None:
    async with Client(host.url + "/jobs") as jw:
        # Slow enough that the job is still running when the socket opens (a job done
        # first is read over REST and never needs it).
        job, created = await jw.submit("steps", {"n": 2, "delay": 0.5}, key="k1")
        assert created
        seqs = [s.seq async for s in jw.watch(job["id"])]
        assert seqs and seqs == sorted(seqs)
        assert jw.connection.mode == "socket"  # /jobs/api/ws, not a long-poll fallback
        result = await asyncio.wait_for(jw.wait(job["id"]), 20)
        assert result is not None
        assert (await jw.submit("steps", {"n": 2}, key="k1"))[1] is True  # it ended: a new job
    async with httpx.AsyncClient(base_url=host.url, timeout=20) as http:
        spec = (await http.get("/jobs/openapi.json")).json()
        assert "/api/jobs" in spec["paths"]
        assert "/jobs/openapi.json" in (await http.get("/jobs/docs")).text
        assert (await http.get("/jobs")).headers.get("location", "").endswith("/jobs/")


async def test_mounted_sockets_end_with_their_session(db_url: str) -> None:
    """The mounted runtime re-checks the sessions of its live connections, as `jobwire
    serve` does: a guest's socket closes when the guest session expires. A socket the
    hook names needs no auth frame, even when it offers one (`?auth=message`)."""
    app, _ = host_app(db_url, builtin_auth=True, guest_ttl_seconds=1.5,
                      session_check_seconds=0.2)
    with Served(app) as served:
        async with httpx.AsyncClient(base_url=served.url + "/jobs", timeout=20) as http:
            token = (await http.post("/api/sessions")).json()["token"]
        ws_url = served.url.replace("http://", "ws://") + "/jobs/api/ws"
        async with websockets.connect(ws_url + "?auth=message",
                                      additional_headers=as_user("alice")) as ws:
            await ws.send(json.dumps({"op": "subscribe", "job": "nope", "after": 0}))
            reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert reply["op"] == "error" and reply["code"] == 404, reply  # authenticated
        started = time.monotonic()
        with pytest.raises(websockets.ConnectionClosed) as closed:
            async with websockets.connect(
                    ws_url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
                await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
        assert closed.value.rcvd.reason == "session ended: sign in again"
        assert time.monotonic() - started < 5


async def test_a_forgotten_lifespan_fails_loudly(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    app, jobs = host_app(f"sqlite:///{tmp_path / 'jobwire.db'}", start=False)
    message = ("jobwire was mounted but never started: enter `jobs.lifespan()` in your "
               "app's lifespan")
    with caplog.at_level(logging.ERROR, logger="jobwire"), Served(app) as served:
        async with httpx.AsyncClient(base_url=served.url, headers=as_user("alice"),
                                     timeout=20) as http:
            r = await http.get("/jobs/api/jobs")
            assert r.status_code == 503 and r.json() == {"detail": message}
            r = await http.post("/reports", json={"n": 1})  # the host's own route
            assert r.status_code == 500
        ws_url = served.url.replace("http://", "ws://") + "/jobs/api/ws"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            async with websockets.connect(ws_url, additional_headers=as_user("alice")) as ws:
                await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.reason == message
    assert message in caplog.text
    with pytest.raises(jobwire.NotStarted, match="never started"):
        await jobs.submit("user:alice", "steps", {"n": 1})


async def test_the_in_process_api_has_the_routes_rules(db_url: str) -> None:
    async with jobwire.Runtime(tasks.jobwire, Settings(db=db_url, concurrency=0)) as rt:
        with pytest.raises(jobwire.InputError) as bad:
            await rt.submit("user:alice", "nope", {})
        assert bad.value.loc == ("task",)
        with pytest.raises(jobwire.InputError) as bad:
            await rt.submit("user:alice", "steps", {"n": -1})
        assert bad.value.loc == ("input", "n")
        with pytest.raises(jobwire.InputError) as bad:
            await rt.submit("user:alice", "steps", {"n": 1}, key="a\nb")
        assert bad.value.loc == ("key",)
        for owner in ("alice", "user:", "user:a\x1b[2J", "admin:x", "user:" + "a" * 201):
            with pytest.raises(jobwire.InputError) as bad:
                await rt.submit(owner, "steps", {"n": 1})
            assert bad.value.loc == ("owner",)
        deep: Any = 1
        for _ in range(rt.settings.max_json_depth + 1):
            deep = [deep]
        with pytest.raises(jobwire.InputError, match="too deep"):
            await rt.submit("user:alice", "echo", deep)
        with pytest.raises(jobwire.InputError) as bad:  # past JOBWIRE_MAX_DELAY_SECONDS
            await rt.submit("user:alice", "steps", {"n": 1}, delay=1e12)
        assert bad.value.loc == ("delay",)
        with pytest.raises(jobwire.InputError) as bad:  # a naive time names no zone
            await rt.submit("user:alice", "steps", {"n": 1}, run_at=datetime(2030, 1, 1))
        assert bad.value.loc == ("run_at",)
        later, _ = await rt.submit("user:alice", "steps", {"n": 1},
                                   run_at=datetime.now(UTC) + timedelta(hours=1))
        assert later.run_at is not None and later.run_at > time.time() + 3500
        await rt.cancel("user:alice", later.id)

        job, created = await rt.submit("user:alice", "steps", {"n": 1}, key="k")
        again, created_again = await rt.submit("user:alice", "steps", {"n": 1}, key="k")
        assert created and not created_again and again.id == job.id
        assert (await rt.get("user:alice", job.id)).id == job.id
        with pytest.raises(jobwire.NotFound):
            await rt.get("user:bob", job.id)
        assert [j.id for j in await rt.list("user:alice", "active")] == [job.id]
        assert await rt.list("user:bob") == []
        with pytest.raises(jobwire.JobActive):
            await rt.delete("user:alice", job.id)
        with pytest.raises(jobwire.NotFound):
            await rt.cancel("user:bob", job.id)
        assert (await rt.cancel("user:alice", job.id)).status == "cancelled"
        await rt.delete("user:alice", job.id)
        with pytest.raises(jobwire.NotFound):
            await rt.get("user:alice", job.id)

    # The per-owner cap on active jobs holds for in-process submits as for POST /api/jobs.
    settings = Settings(db=db_url, concurrency=0, max_active_jobs=2)
    async with jobwire.Runtime(tasks.jobwire, settings) as rt:
        for _ in range(2):
            await rt.submit("user:carol", "steps", {"n": 1})
        with pytest.raises(jobwire.TooManyActive):
            await rt.submit("user:carol", "steps", {"n": 1})
        await rt.submit("user:dave", "steps", {"n": 1})  # another owner's own cap


async def test_the_hook_decides_and_its_owners_are_checked(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    answers: dict[str, str | None] = {}

    async def hook(conn: HTTPConnection) -> str | None:  # an async hook
        return answers.get(conn.headers.get("x-user", ""))

    jobs = jobwire.asgi(tasks.jobwire, Settings(db=f"sqlite:///{tmp_path / 'j.db'}",
                                                concurrency=0), authenticate=hook)
    answers.update(alice="user:alice", bad="user:evil\x1b[2J", odd="admin")
    transport = httpx.ASGITransport(app=jobs)
    async with jobs.lifespan(), httpx.AsyncClient(transport=transport,
                                                  base_url="http://t") as http:
        r = await http.post("/api/jobs", json={"task": "steps", "input": {"n": 1}},
                            headers={"x-user": "alice"})
        assert r.status_code == 201 and r.json()["job"]["owner"] == "user:alice"
        # With a hook, jobwire's own guest sessions are off unless the app keeps them.
        assert (await http.get("/api/jobs")).status_code == 401
        assert (await http.post("/api/sessions")).status_code == 403
        with caplog.at_level(logging.ERROR, logger="jobwire"):
            for who in ("bad", "odd"):
                r = await http.get("/api/jobs", headers={"x-user": who})
                assert r.status_code == 500, r.text
                assert "invalid owner" in r.json()["detail"]
        assert "authenticate returned" in caplog.text
