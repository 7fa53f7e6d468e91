"""A server on the open internet: no token in any log line, WebSocket authentication by
first message, live connections that end with their session, and token management."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Any

import httpx
import jwt
import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from jobwire.client import Client as JobwireClient
from jobwire.client import TokenError
from tests.conftest import Client, Proc, cli, guest

pytestmark = pytest.mark.timeout(120)

ENDED = "session ended: sign in again"
EXPIRED = "token expired: reconnect with a fresh token"
JWT_SECRET = "j" * 40
SERVICE_KEY = "s" * 40


def ws_base(server: Proc) -> str:
    return server.url.replace("http://", "ws://") + "/api/ws"


async def authed_socket(server: Proc, token: str) -> ClientConnection:
    """A WebSocket authenticated by its first message, as jobwire.js opens it."""
    ws = await websockets.connect(ws_base(server))
    await ws.send(json.dumps({"op": "auth", "token": token}))
    reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert reply["op"] == "authenticated", reply
    return ws


async def closed_with(ws: ClientConnection, within: float) -> int | None:
    """Read until the server closes the socket, within `within` seconds (events may still
    arrive meanwhile); the close code."""
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(within):
            while True:
                await ws.recv()
    return ws.close_code


async def sse_ended(params: dict[str, str], server: Proc, job: str, within: float,
                    opened: asyncio.Semaphore, started: asyncio.Event) -> float:
    """Stream the job's events (authenticated by `params`) until the server ends the
    stream, releasing `opened` once it is open; how long the end took after `started`."""
    async with httpx.AsyncClient(timeout=30) as http, http.stream(
            "GET", f"{server.url}/api/jobs/{job}/stream", params=params) as r:
        assert r.status_code == 200
        lines = r.aiter_lines()
        await anext(lines)
        opened.release()
        await started.wait()
        start = time.monotonic()
        async with asyncio.timeout(within):
            async for _ in lines:
                pass
        return time.monotonic() - start


async def user(db: str, name: str, server: Proc) -> Client:
    out = cli("users", "add", name, "--db", db)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    http = httpx.AsyncClient(base_url=server.url, timeout=30,
                             headers={"Authorization": f"Bearer {token}"})
    return Client(http, token, f"user:{name}")


# -- logs


async def test_no_token_reaches_the_log(procs: Any, tmp_path: Any) -> None:
    server: Proc = procs("serve", "--db", f"sqlite:///{tmp_path / 'jobwire.db'}")
    c = await guest(server.url)
    job, _ = await c.submit("echo", 1)
    await c.wait_terminal(job["id"])
    stream = f"{server.url}/api/jobs/{job['id']}/stream"
    secrets = [c.token, "Upper-Case-Name", "Encoded-Name", "Bad-Token-Value"]
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(stream, params={"token": c.token})).status_code == 200
        await http.get(f"{stream}?after=0&TOKEN=Upper-Case-Name")
        await http.get(f"{stream}?%74oken=Encoded-Name&after=0")
    ws = await websockets.connect(f"{ws_base(server)}?token={c.token}")
    await ws.send(json.dumps({"op": "subscribe", "job": job["id"], "after": 0}))
    assert json.loads(await ws.recv())["op"] == "subscribed"
    await ws.close()
    async with websockets.connect(f"{ws_base(server)}?token=Bad-Token-Value") as ws:
        await closed_with(ws, 10)
    server.stop()  # the access log (stdout) is flushed on exit
    log = server.log.read_text()
    for secret in secrets:
        assert secret not in log
    # The lines are there, with the token's place marked.
    assert f"/api/jobs/{job['id']}/stream?token=[redacted] HTTP/1.1\" 200" in log
    assert "?after=0&TOKEN=[redacted] HTTP/1.1\" 401" in log
    assert "?%74oken=[redacted]&after=0 HTTP/1.1\" 401" in log
    assert '"WebSocket /api/ws?token=[redacted]" [accepted]' in log


@pytest.mark.parametrize("off", [["--no-access-log"], ["JOBWIRE_ACCESS_LOG=0"]])
async def test_access_log_can_be_turned_off(procs: Any, tmp_path: Any,
                                            monkeypatch: pytest.MonkeyPatch,
                                            off: list[str]) -> None:
    """A busy server may drop its line per request (~10% of a small request's CPU); errors
    and the start-up lines are still logged."""
    if off[0].startswith("JOBWIRE_"):
        monkeypatch.setenv(*off[0].split("="))
        off = []
    server: Proc = procs("serve", "--db", f"sqlite:///{tmp_path / 'jobwire.db'}", *off)
    c = await guest(server.url)
    job, _ = await c.submit("echo", 1)
    await c.wait_terminal(job["id"])
    server.stop()
    log = server.log.read_text()
    assert "Uvicorn running on" in log
    assert "/api/jobs" not in log and "HTTP/1.1" not in log


# -- WebSocket authentication by first message


async def test_websocket_authenticates_with_its_first_message(
        procs: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBWIRE_WS_AUTH_SECONDS", "1")
    server: Proc = procs("serve", "--db", f"sqlite:///{tmp_path / 'jobwire.db'}")
    c = await guest(server.url)
    job, _ = await c.submit("steps", {"n": 3, "delay": 0})
    await c.wait_terminal(job["id"])

    async with await authed_socket(server, c.token) as ws:
        await ws.send(json.dumps({"op": "subscribe", "job": job["id"], "after": 0}))
        events: list[dict[str, Any]] = []
        while not events or events[-1]["type"] != "completed":
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            for msg in frame if isinstance(frame, list) else [frame]:
                if "op" in msg:
                    assert msg["op"] == "subscribed", msg
                else:
                    events.append(msg)
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))

    refusals = [
        ({"op": "auth", "token": "not-a-token"}, "invalid or expired token"),
        ({"op": "subscribe", "job": job["id"], "after": 0}, 'send {"op": "auth"'),
        ({"op": "auth"}, 'send {"op": "auth"'),
        (None, "no token within 1 s"),  # nothing sent
    ]
    for first, reason in refusals:
        async with websockets.connect(ws_base(server)) as ws:
            if first is not None:
                await ws.send(json.dumps(first))
            started = time.monotonic()
            code = await closed_with(ws, 10)
            assert code == 4401 and ws.close_reason is not None, (first, code)
            assert reason in ws.close_reason, (first, ws.close_reason)
            if first is None:
                assert 0.9 < time.monotonic() - started < 5
    # With ?auth=message the first frame wins over a session cookie (a page's token does),
    # so the cookie's same-origin check does not apply either.
    other = await guest(server.url)
    cookie = {"Cookie": f"jobwire_token={other.token}"}
    async with websockets.connect(f"{ws_base(server)}?auth=message",
                                  additional_headers=cookie,
                                  origin="http://elsewhere.example") as ws:
        await ws.send(json.dumps({"op": "auth", "token": c.token}))
        assert json.loads(await ws.recv()) == {"op": "authenticated", "owner": c.owner}
    async with websockets.connect(ws_base(server), additional_headers=cookie) as ws:
        await ws.send(json.dumps({"op": "subscribe", "job": job["id"], "after": 0}))
        assert json.loads(await ws.recv())["code"] == 404  # the cookie's owner: not c


async def test_a_ticket_opens_one_stream(procs: Any, tmp_path: Any,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBWIRE_TICKET_SECONDS", "2")
    server: Proc = procs("serve", "--db", f"sqlite:///{tmp_path / 'jobwire.db'}")
    c = await guest(server.url)
    job, _ = await c.submit("echo", 1)
    await c.wait_terminal(job["id"])
    stream = f"{server.url}/api/jobs/{job['id']}/stream"

    async def ticket() -> str:
        r = await c.http.post("/api/tickets")
        assert r.status_code == 201 and r.json()["expires_in"] == 2, r.text
        return str(r.json()["ticket"])

    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.post(f"{server.url}/api/tickets")).status_code == 401
        used = await ticket()
        r = await http.get(stream, params={"ticket": used})
        assert r.status_code == 200 and '"type":"completed"' in r.text
        for bad in (used, "not-a-ticket"):
            r = await http.get(stream, params={"ticket": bad})
            assert r.status_code == 401, r.text
            assert r.json()["detail"] == "invalid, used or expired ticket"
        late = await ticket()
        await asyncio.sleep(2.5)
        assert (await http.get(stream, params={"ticket": late})).status_code == 401


# -- JWTs and the service key (docs/identity.md) on live connections


def a_jwt(sub: str, lifetime: float, secret: str = JWT_SECRET) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + lifetime)}, secret, "HS256")


def jwt_server(procs: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Proc:
    monkeypatch.setenv("JOBWIRE_JWT_SECRET", JWT_SECRET)
    monkeypatch.setenv("JOBWIRE_SERVICE_KEY", SERVICE_KEY)
    monkeypatch.setenv("JOBWIRE_JWT_LEEWAY_SECONDS", "0")
    proc: Proc = procs("serve", "--db", f"sqlite:///{tmp_path / 'jobwire.db'}")
    return proc


def bearer(token: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **headers}


async def test_jwts_and_the_service_key_authenticate_websockets(
        procs: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    server = jwt_server(procs, tmp_path, monkeypatch)
    alice = a_jwt("alice", 3600)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        r = await http.post("/api/jobs", json={"task": "echo", "input": 1},
                            headers=bearer(alice))
        assert r.status_code == 201, r.text
        job = r.json()["job"]["id"]

    async def first_event(ws: ClientConnection) -> dict[str, Any]:
        await ws.send(json.dumps({"op": "subscribe", "job": job, "after": 0}))
        assert json.loads(await ws.recv())["op"] == "subscribed"
        frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
        return dict(frame[0] if isinstance(frame, list) else frame)

    async with await authed_socket(server, alice) as ws:  # the JWT as the first message
        assert (await first_event(ws))["job"] == job
    for token, reason in [(a_jwt("alice", 3600, "x" * 40), "token signature invalid"),
                          (a_jwt("alice", -60), "token expired")]:
        async with websockets.connect(ws_base(server)) as ws:
            await ws.send(json.dumps({"op": "auth", "token": token}))
            assert await closed_with(ws, 10) == 4401 and ws.close_reason == reason
    # The service key acting as alice in the handshake's header, the key sent either way.
    as_alice = {"X-Jobwire-Owner": "user:alice"}
    async with websockets.connect(ws_base(server),
                                  additional_headers=bearer(SERVICE_KEY, **as_alice)) as ws:
        assert (await first_event(ws))["job"] == job
    async with websockets.connect(f"{ws_base(server)}?auth=message",
                                  additional_headers=as_alice) as ws:
        await ws.send(json.dumps({"op": "auth", "token": SERVICE_KEY}))
        assert json.loads(await ws.recv()) == {"op": "authenticated", "owner": "user:alice"}
        assert (await first_event(ws))["job"] == job
    async with websockets.connect(ws_base(server),
                                  additional_headers=bearer(alice, **as_alice)) as ws:
        assert await closed_with(ws, 10) == 4403  # only the service key names an owner


async def test_tickets_are_for_sessions_only(procs: Any, tmp_path: Any,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    server = jwt_server(procs, tmp_path, monkeypatch)
    c = await guest(server.url)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        for headers in (bearer(a_jwt("alice", 3600)), bearer(SERVICE_KEY),
                        bearer(SERVICE_KEY, **{"X-Jobwire-Owner": "user:alice"})):
            r = await http.post("/api/tickets", headers=headers)
            assert r.status_code == 400, r.text
            assert "tickets stand in for session tokens only" in r.json()["detail"]
    assert (await c.http.post("/api/tickets")).status_code == 201


async def test_jwt_connections_end_at_its_expiry(procs: Any, tmp_path: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A socket and an SSE stream opened with a JWT end when it expires (leeway 0), while
    a session's socket beside them stays open."""
    server = jwt_server(procs, tmp_path, monkeypatch)
    exp = int(time.time()) + 4  # (whole seconds: 3 to 4 s from now)
    token = jwt.encode({"sub": "alice", "exp": exp}, JWT_SECRET, "HS256")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        r = await http.post("/api/jobs", json={"task": "steps",
                                               "input": {"n": 200, "delay": 0.1}},
                            headers=bearer(token))
        assert r.status_code == 201, r.text
        job = r.json()["job"]["id"]
    c = await guest(server.url)
    opened, started = asyncio.Semaphore(0), asyncio.Event()
    sse = asyncio.create_task(sse_ended({"token": token}, server, job, 15, opened, started))
    await opened.acquire()
    started.set()
    t0 = time.time()
    async with await authed_socket(server, token) as ws, await authed_socket(
            server, c.token) as bystander:
        await ws.send(json.dumps({"op": "subscribe", "job": job, "after": 0}))
        assert await closed_with(ws, 15) == 4401 and ws.close_reason == EXPIRED
        assert exp - 0.3 < time.time() < exp + 1.5, time.time() - exp
        assert exp - 0.3 < t0 + await sse < exp + 1.5, t0 + await sse - exp
        await bystander.send(json.dumps({"op": "subscribe", "job": "nope", "after": 0}))
        assert json.loads(await bystander.recv())["code"] == 404  # still open
    async with httpx.AsyncClient(timeout=10) as http:  # and it cannot come back
        r = await http.get(f"{server.url}/api/jobs/{job}/stream", params={"token": token})
        assert r.status_code == 401 and r.json()["detail"] == "token expired"


# -- live connections end with their session


@pytest.mark.timeout(180)
async def test_claim_closes_the_guests_live_connections_on_every_server(
        procs: Any, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The claiming server checks sessions too rarely to matter: it must close at once.
    monkeypatch.setenv("JOBWIRE_SESSION_CHECK_SECONDS", "600")
    here: Proc = procs("serve", "--db", db_url, "--lease", "2")
    monkeypatch.delenv("JOBWIRE_SESSION_CHECK_SECONDS")
    there: Proc = procs("serve", "--db", db_url, "--no-workers")
    g = await guest(here.url)
    dave = await user(db_url, "dave", here)
    job, _ = await g.submit("block", {})  # runs until cancelled
    sockets = []
    for server in (here, there):
        ws = await authed_socket(server, g.token)
        await ws.send(json.dumps({"op": "subscribe", "job": job["id"], "after": 0}))
        sockets.append(ws)
    opened, claimed = asyncio.Semaphore(0), asyncio.Event()
    r = await g.http.post("/api/tickets")  # a ticket from one server works on any
    assert r.status_code == 201, r.text
    sse = [asyncio.create_task(sse_ended(params, s, job["id"], 10, opened, claimed))
           for s, params in ((here, {"token": g.token}), (there, {"ticket": r.json()["ticket"]}))]
    for _ in sse:
        await opened.acquire()

    r = await dave.http.post("/api/sessions/claim", json={"token": g.token})
    assert r.status_code == 200 and r.json()["moved"] == 1, r.text
    claimed.set()
    code = await closed_with(sockets[0], 1)  # the claiming server: at once
    assert (code, sockets[0].close_reason) == (4401, ENDED)
    code = await closed_with(sockets[1], 5)  # another server: within the bound
    assert (code, sockets[1].close_reason) == (4401, ENDED)
    took_here, took_there = await asyncio.gather(*sse)
    assert took_here < 1 and took_there < 5
    # The job goes on, for its new owner alone.
    assert (await g.http.get(f"/api/jobs/{job['id']}")).status_code == 401
    assert (await dave.job(job["id"]))["status"] in ("queued", "running")
    await dave.http.post(f"/api/jobs/{job['id']}/cancel")


async def test_revoked_user_loses_rest_and_live_connections(procs: Any, db_url: str) -> None:
    server: Proc = procs("serve", "--db", db_url, "--lease", "2")
    erin = await user(db_url, "erin", server)
    job, _ = await erin.submit("block", {})
    headers = {"Authorization": f"Bearer {erin.token}"}
    ws = await websockets.connect(ws_base(server), additional_headers=headers)
    await ws.send(json.dumps({"op": "subscribe", "job": job["id"], "after": 0}))
    out = cli("users", "revoke", "erin", "--db", db_url)
    assert out.returncode == 0 and "revoked 1 token" in out.stdout, out.stderr
    code = await closed_with(ws, 5)  # the CLI is another process: the periodic check
    assert (code, ws.close_reason) == (4401, ENDED)
    assert (await erin.http.get("/api/jobs")).status_code == 401
    async with websockets.connect(ws_base(server), additional_headers=headers) as again:
        assert await closed_with(again, 5) == 4401


# -- token management


def test_users_add_tokens_and_new_token(tmp_path: Any) -> None:
    db = f"sqlite:///{tmp_path / 'jobwire.db'}"
    first = cli("users", "add", "frank", "--db", db)
    assert first.returncode == 0, first.stderr
    again = cli("users", "add", "frank", "--db", db)
    assert again.returncode == 2 and "user frank exists" in again.stderr
    assert "--new-token" in again.stderr and "Traceback" not in again.stderr
    assert again.stdout == ""
    second = cli("users", "add", "frank", "--new-token", "--db", db)
    assert second.returncode == 0, second.stderr
    tokens = [first.stdout.strip(), second.stdout.strip()]
    assert tokens[0] != tokens[1]

    listed = cli("users", "tokens", "frank", "--db", db)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    ids = {hashlib.sha256(t.encode()).hexdigest()[:8] for t in tokens}
    assert {line.split()[0] for line in lines} == ids and len(lines) == 2
    assert all("created 20" in line for line in lines)
    for t in tokens:
        assert t not in listed.stdout and hashlib.sha256(t.encode()).hexdigest() not in \
            listed.stdout

    assert "revoked 2 token(s)" in cli("users", "revoke", "frank", "--db", db).stdout
    assert cli("users", "tokens", "frank", "--db", db).stdout.strip() == "frank has no tokens"
    assert "revoked 0 token(s)" in cli("users", "revoke", "frank", "--db", db).stdout


# -- the tickets table's migration


@pytest.mark.parametrize("third", ["periodic_ticks", "tickets"])
async def test_a_database_at_either_version_3_upgrades(db_url: str, third: str) -> None:
    """Migration 3 is main's periodic_ticks; the tickets branch had made tickets its 3
    before it followed. A database at either 3 ends with both tables."""
    from jobwire.store import open_store, pg_schema, sqlite

    tickets_3 = ("CREATE TABLE tickets (ticket_hash TEXT PRIMARY KEY, token_hash TEXT NOT NULL,"
                 " expires_at REAL NOT NULL); CREATE INDEX tickets_expiry ON tickets "
                 "(expires_at);")
    if db_url.startswith("sqlite"):
        import sqlite3

        with sqlite3.connect(sqlite._path_of(db_url)) as conn:
            for script in [*sqlite.MIGRATIONS[:2], tickets_3 if third == "tickets"
                           else sqlite.MIGRATIONS[2]]:
                conn.executescript(script)
            conn.execute("PRAGMA user_version = 3")
    else:
        import psycopg

        with psycopg.connect(db_url, autocommit=True) as pg:
            for script in [*pg_schema.MIGRATIONS[:2], tickets_3 if third == "tickets"
                           else pg_schema.MIGRATIONS[2]]:
                pg.execute(script.replace("REAL", "double precision").encode())
            pg.execute("CREATE TABLE jobwire_migrations (version integer PRIMARY KEY, "
                       "applied_at double precision NOT NULL)")
            pg.execute("INSERT INTO jobwire_migrations VALUES (1, 0), (2, 0), (3, 0)")
    store = open_store(db_url)
    await store.open()
    try:
        await store.add_session("h", "guest:g", None)
        await store.add_ticket("t", "h", time.time() + 30)
        assert await store.use_ticket("t") == ("guest:g", "h")
        fired = await store.submit_tick("system:periodic", "echo", 1, 1, 60.0)
        assert fired is not None and fired[1]
    finally:
        await store.close()


async def test_a_client_with_a_token_function_outlives_its_short_tokens(
        procs: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tokens of at most 3 s, a job of ~8 s: the server closes the socket at each expiry
    (4401) and the client reconnects with a fresh token, resuming from its seq."""
    server = jwt_server(procs, tmp_path, monkeypatch)
    minted: list[str] = []

    def get_token() -> str:  # what an identity SDK's getToken does
        minted.append(a_jwt("alice", 3))
        return minted[-1]

    async with JobwireClient(server.url, get_token) as c:
        job, _ = await c.submit("steps", {"n": 60, "delay": 0.12})
        states = [state async for state in c.watch(str(job["id"]))]
        mode = c.connection.mode
    seqs = [state.seq for state in states]
    assert seqs == list(range(seqs[0], seqs[-1] + 1)), seqs  # every seq, once, in order
    assert states[-1].status == "completed" and len(seqs) > 60
    assert len(minted) >= 3, minted  # it was renewed at least twice on the way
    assert mode == "socket"


async def test_a_token_function_that_raises_leaves_the_watch_alive(
        procs: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The host's getToken fails twice (offline, say) as the socket opens: the client
    long-polls meanwhile with the token it has and opens the socket once it works again,
    and a call that needs a token says what failed."""
    server = jwt_server(procs, tmp_path, monkeypatch)
    calls: list[int] = []

    def get_token() -> str:
        calls.append(len(calls))
        if len(calls) in (2, 3):
            raise LookupError("no token cached and the identity provider is down")
        return a_jwt("alice", 60)

    async with JobwireClient(server.url, get_token, backoff=(0.1, 0.5)) as c:
        job, _ = await c.submit("steps", {"n": 30, "delay": 0.1})
        states = await asyncio.wait_for(_collect(c.watch(str(job["id"]))), 60)
        mode = c.connection.mode
    seqs = [state.seq for state in states]
    assert seqs == list(range(seqs[0], seqs[-1] + 1)) and states[-1].status == "completed"
    assert len(calls) >= 4 and mode == "socket"

    def broken() -> str:
        raise RuntimeError("signed out")

    async with JobwireClient(server.url, broken) as c:
        with pytest.raises(TokenError, match="signed out"):
            await c.submit("steps", {"n": 1})


async def _collect(states: Any) -> list[Any]:
    return [state async for state in states]


async def test_no_token_starts_with_a_dash() -> None:
    """One URL-safe token in 64 began with "-", and `jobwire login <token>` then read it as
    an option ("the following arguments are required")."""
    from jobwire.api.auth import new_session

    class Sessions:
        async def add_session(self, *args: object) -> None:
            pass

    tokens = [(await new_session(Sessions()))[0] for _ in range(2000)]  # type: ignore[arg-type]
    assert not [t for t in tokens if t.startswith("-")]
