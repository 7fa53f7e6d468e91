"""A public server: new guest sessions are rate-limited per client address (believing
X-Forwarded-For only from trusted proxies), expired sessions are deleted, live
connections stay under the process's file limit, and another site cannot make a
visitor's browser use (or replace) its session cookie."""

from __future__ import annotations

import asyncio
import resource
import uuid
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from jobwire.api.auth import COOKIE, hash_token
from jobwire.api.public import RateLimit, rate_key
from jobwire.model import now
from jobwire.store import open_store
from tests.chaos.wire import ws_url
from tests.conftest import Proc, cli, free_port, guest

pytestmark = pytest.mark.timeout(120)

DEFAULT_RATE = "30/60s,10"


def serve(procs: Any, monkeypatch: pytest.MonkeyPatch, db: str, **env: str) -> Proc:
    """A server with these JOBWIRE_* variables (and the default session rate unless given)."""
    for name, value in {"session_rate": DEFAULT_RATE, **env}.items():
        monkeypatch.setenv(f"JOBWIRE_{name.upper()}", value)
    proc: Proc = procs("serve", "--db", db, "--lease", "2")
    return proc


async def new_sessions(url: str, n: int, **headers: str) -> list[httpx.Response]:
    """n requests, each as a new visitor (no cookie)."""
    answers = []
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        for _ in range(n):
            answers.append(await http.post("/api/sessions", headers=headers))
            http.cookies.clear()
    return answers


def statuses(answers: list[httpx.Response]) -> list[int]:
    return [r.status_code for r in answers]


async def test_new_sessions_are_rate_limited_per_address(
        procs: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    srv = serve(procs, monkeypatch, f"sqlite:///{tmp_path / 'a.db'}")
    # The burst of 10, then one token every 2 s.
    assert statuses(await new_sessions(srv.url, 11)) == [201] * 10 + [429]
    refused = (await new_sessions(srv.url, 1))[0]
    assert refused.status_code == 429
    assert refused.headers["retry-after"] in ("1", "2")
    assert "at most 10 at once, then 30 per 60 s" in refused.json()["detail"]
    # 127.0.0.1 is no trusted proxy here: naming another address changes nothing.
    spoofed = await new_sessions(srv.url, 3, **{"X-Forwarded-For": "10.9.9.9"})
    assert statuses(spoofed) == [429] * 3
    await asyncio.sleep(int(refused.headers["retry-after"]) + 0.1)
    assert statuses(await new_sessions(srv.url, 2)) == [201, 429]
    # Everything else still answers for that address.
    async with httpx.AsyncClient(base_url=srv.url) as http:
        assert (await http.get("/healthz")).status_code == 200

    # Behind a trusted proxy each client has its own bucket; the rightmost address the
    # proxy did not add itself is the client (anything left of it the client wrote).
    behind = serve(procs, monkeypatch, f"sqlite:///{tmp_path / 'b.db'}",
                   trusted_proxies="127.0.0.0/8")
    assert statuses(await new_sessions(behind.url, 11)) == [201] * 10 + [429]
    alice = {"X-Forwarded-For": "10.1.2.3"}
    assert statuses(await new_sessions(behind.url, 11, **alice)) == [201] * 10 + [429]
    forged = {"X-Forwarded-For": "10.7.7.7, 10.1.2.3"}
    assert statuses(await new_sessions(behind.url, 1, **forged)) == [429]
    assert statuses(await new_sessions(behind.url, 1, **{"X-Forwarded-For": "10.4.4.4"})) == [201]


async def test_session_cookie_is_secure_over_https(
        procs: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    https = {"X-Forwarded-Proto": "https"}
    plain = serve(procs, monkeypatch, f"sqlite:///{tmp_path / 'a.db'}")
    behind = serve(procs, monkeypatch, f"sqlite:///{tmp_path / 'b.db'}",
                   trusted_proxies="127.0.0.1")
    always = serve(procs, monkeypatch, f"sqlite:///{tmp_path / 'c.db'}", secure_cookies="1")

    async def cookie(url: str, **headers: str) -> str:
        r = (await new_sessions(url, 1, **headers))[0]
        assert r.status_code == 201
        return r.headers["set-cookie"].lower()

    assert "secure" not in await cookie(plain.url)
    assert "secure" not in await cookie(plain.url, **https)  # not from a trusted proxy
    assert "secure" not in await cookie(behind.url)
    assert "; secure" in await cookie(behind.url, **https)
    assert "; secure" in await cookie(always.url)


def test_idle_buckets_are_forgotten() -> None:
    clock = [0.0]
    limit = RateLimit(30, 60, 10, max_keys=1000, clock=lambda: clock[0])
    for i in range(1000):
        assert limit.take(f"10.0.{i // 256}.{i % 256}") == 0
    assert len(limit) == 1000
    assert limit.take("10.9.9.9") == 0 and len(limit) == 1000  # at most max_keys
    for _ in range(9):
        assert limit.take("10.9.9.9") == 0
    assert limit.take("10.9.9.9") == pytest.approx(2.0)
    clock[0] = 19.9  # 10 tokens at 0.5/s: an emptied bucket is full again after 20 s
    assert limit.take("10.8.8.8") == 0 and len(limit) == 1000  # the oldest went early
    clock[0] = 20.0  # every bucket but 10.8.8.8's is full: forgotten
    assert limit.take("10.8.8.8") == 0 and len(limit) == 1
    assert [limit.take("10.9.9.9") for _ in range(11)] == [0] * 10 + [2.0]
    assert len(limit) == 2


def test_ipv6_clients_are_counted_by_their_64() -> None:
    assert rate_key("2001:db8:1:2:aaaa::1") == rate_key("2001:db8:1:2:ffff::9") == (
        "2001:db8:1:2::/64")
    assert rate_key("2001:db8:1:3::1") != rate_key("2001:db8:1:2::1")
    assert rate_key("10.1.2.3") == "10.1.2.3" != rate_key("10.1.2.4")


def raw_sessions(db: str) -> set[str]:
    if db.startswith("sqlite"):
        import sqlite3

        with sqlite3.connect(db.removeprefix("sqlite:///")) as conn:
            return {r[0] for r in conn.execute("SELECT token_hash FROM sessions")}
    import psycopg

    with psycopg.connect(db) as conn:
        return {r[0] for r in conn.execute("SELECT token_hash FROM sessions")}


async def test_expired_sessions_are_deleted(procs: Any, db_url: str) -> None:
    expired = [uuid.uuid4().hex for _ in range(3)]
    store = open_store(db_url)
    await store.open()
    try:
        for token in expired:
            await store.add_session(hash_token(token), f"guest:{token[:16]}", now() - 1)
    finally:
        await store.close()
    srv: Proc = procs("serve", "--db", db_url, "--retention", "1")
    live = await guest(srv.url)
    expired_hashes = {hash_token(t) for t in expired}
    for _ in range(100):
        if not raw_sessions(db_url) & expired_hashes:
            break
        await asyncio.sleep(0.1)
    sessions = raw_sessions(db_url)
    assert not sessions & expired_hashes, "expired sessions were never deleted"
    assert hash_token(live.token) in sessions
    assert (await live.http.get("/api/jobs")).status_code == 200
    await live.http.aclose()


async def test_live_connections_stay_under_the_file_limit(procs: Any, tmp_path: Any) -> None:
    """Three guests open 100 WebSockets each (their per-owner limit) against a process
    allowed 256 files: past 256 - 64 the sockets are refused with 1013, and health
    checks, the page and REST keep answering."""
    srv: Proc = procs("serve", "--db", f"sqlite:///{tmp_path / 'jobwire.db'}", start=False)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    srv.preexec = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    srv.start()
    guests = [await guest(srv.url) for _ in range(3)]
    job, _ = await guests[0].submit("block", {})
    held: list[ClientConnection] = []
    codes: list[int | None] = []
    try:
        for g in guests:
            for _ in range(100):
                ws = await connect(ws_url(srv.url, g.token), open_timeout=5)
                try:
                    await ws.send('{"op": "subscribe", "job": "nope"}')
                    assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["code"] == 404
                    held.append(ws)
                    codes.append(None)
                except ConnectionClosed as exc:
                    codes.append(exc.rcvd.code if exc.rcvd else None)
                    assert exc.rcvd and "at most 192 live connections" in exc.rcvd.reason
        assert len(held) == 192 and codes.count(1013) == 300 - 192, codes
        async with httpx.AsyncClient(base_url=srv.url, timeout=5) as http:
            assert (await http.get("/healthz")).status_code == 200
            assert (await http.get("/")).status_code == 200
            r = await http.get("/api/jobs", headers={"Authorization": f"Bearer {guests[1].token}"})
            assert r.status_code == 200
            r = await http.get(f"/api/jobs/{job['id']}/stream",
                               headers={"Authorization": f"Bearer {guests[0].token}"})
            assert r.status_code == 503 and "at most 192 live" in r.json()["detail"]
    finally:
        await asyncio.gather(*(ws.close() for ws in held))
        for g in guests:
            await g.http.aclose()


async def test_cookie_is_kept_and_not_usable_from_other_sites(
        procs: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    partner = "https://partner.example"
    srv = serve(procs, monkeypatch, f"sqlite:///{tmp_path / 'a.db'}",
                session_rate="1000/1s,1000", allowed_origins=f"{partner}, http://x.test:81")
    own = srv.url
    sibling = f"http://127.0.0.1:{srv.port + 1}"  # another port: a sibling subdomain
    browser = httpx.AsyncClient(base_url=srv.url, timeout=10)  # keeps cookies, like one
    created = await browser.post("/api/sessions", headers={"Origin": own})
    assert created.status_code == 201
    victim, token = created.json()["owner"], browser.cookies[COOKIE]

    # A valid session is kept: the same owner, no new cookie, the cookie's token not shown.
    again = await browser.post("/api/sessions", headers={"Origin": own})
    assert again.status_code == 200 and again.json() == {"token": None, "owner": victim}
    assert "set-cookie" not in again.headers and browser.cookies[COOKIE] == token
    by_bearer = await browser.post("/api/sessions", headers={"Authorization": f"Bearer {token}"})
    assert by_bearer.status_code == 200 and by_bearer.json() == {"token": token, "owner": victim}
    # Another site's form cannot even try to replace it.
    forged = await browser.post("/api/sessions", headers={"Origin": "http://evil.test"})
    assert forged.status_code == 403 and "set-cookie" not in forged.headers
    assert "Origin" in forged.json()["detail"]

    r = await browser.post("/api/jobs", json={"task": "block", "input": {}},
                           headers={"Origin": own})
    assert r.status_code == 201
    job = r.json()["job"]["id"]
    cancel = f"/api/jobs/{job}/cancel"
    for headers in ({"Origin": sibling}, {"Origin": "null"}, {"Sec-Fetch-Site": "same-site"},
                    {"Sec-Fetch-Site": "cross-site"}):
        r = await browser.post(cancel, headers=headers)
        assert r.status_code == 403, (headers, r.text)
        assert (await browser.delete(f"/api/jobs/{job}", headers=headers)).status_code == 403
    state = (await browser.get(f"/api/jobs/{job}")).json()
    assert state["status"] == "running" and not state["cancel_requested"]

    # With a bearer token and no cookie the Origin does not matter (no browser sends one
    # by itself); a partner origin may use the cookie.
    async with httpx.AsyncClient(base_url=srv.url, timeout=10) as api:
        r = await api.post("/api/jobs", json={"task": "echo", "input": 1},
                           headers={"Origin": "http://evil.test",
                                    "Authorization": f"Bearer {token}"})
        assert r.status_code == 201
    assert (await browser.get("/api/jobs", headers={"Origin": "http://evil.test"})
            ).status_code == 200  # reads change nothing and a foreign page cannot see them
    r = await browser.post("/api/jobs", json={"task": "echo", "input": 2},
                           headers={"Origin": partner + "/"})
    assert r.status_code == 201

    cookie = {"Cookie": f"{COOKIE}={token}"}
    for origin in ("http://evil.test", sibling):
        async with connect(ws_url(srv.url), origin=origin,  # type: ignore[arg-type]
                           additional_headers=cookie) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403
    for origin in (own, partner, "http://x.test:81"):
        async with connect(ws_url(srv.url), origin=origin,  # type: ignore[arg-type]
                           additional_headers=cookie) as ws:
            await ws.send(orjson.dumps({"op": "subscribe", "job": job}).decode())
            reply = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
            assert reply["op"] == "subscribed", origin
    # The dashboard's own calls (Origin = the server's) still work.
    r = await browser.post(cancel, headers={"Origin": own})
    assert r.status_code == 200 and r.json()["cancel_requested"]
    await browser.aclose()


@pytest.mark.parametrize(("name", "value"), [("session_rate", "30 a minute"),
                                              ("trusted_proxies", "10.0.0.0/8, proxy.lan"),
                                              ("allowed_origins", "app.example.com")])
def test_a_setting_that_makes_no_sense_stops_the_server(name: str, value: str) -> None:
    out = cli("serve", "--db", "sqlite:///:memory:", "--port", str(free_port()),
              env={f"JOBWIRE_{name.upper()}": value})
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"JOBWIRE_{name.upper()}" in out.stderr and repr(value.split(", ")[-1]) in out.stderr
