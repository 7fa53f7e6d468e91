"""Access control: every route of /openapi.json and every WebSocket op, called with no
token, a bad token, an expired session of the job's own owner, another guest's token and
another user's token, is refused (401/404) without revealing the job; tokens are stored
hashed; a guest session can be claimed into a user and its jobs follow."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from jobwire.api.auth import hash_token
from jobwire.model import now
from jobwire.store import open_store
from tests.chaos.conftest import Serve
from tests.chaos.wire import ws_url
from tests.conftest import Client, assert_alike, cli, guest

pytestmark = pytest.mark.timeout(300)  # every route, seven callers each

PUBLIC = {("post", "/api/sessions"), ("get", "/healthz"), ("get", "/metrics")}
BODIES: dict[str, Any] = {"/api/jobs": {"task": "echo", "input": 1},
                          "/api/sessions/claim": {"token": "not-a-guest-token"},
                          "/api/sessions/signin": {"token": "not-a-user-token"}}


def add_user(db: str, name: str) -> str:
    out = cli("users", "add", name, "--db", db)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


async def as_user(base: str, token: str) -> Client:
    http = httpx.AsyncClient(base_url=base, timeout=30,
                             headers={"Authorization": f"Bearer {token}"})
    owner = (await http.get("/api/jobs")).status_code
    assert owner == 200
    return Client(http, token, "user")


async def expired_token(db: str, owner: str) -> str:
    """A session of `owner` that expired a minute ago, written as the server would."""
    token = uuid.uuid4().hex
    store = open_store(db)
    await store.open()
    try:
        await store.add_session(hash_token(token), owner, now() - 60)
    finally:
        await store.close()
    return token


def stored_sessions(db: str) -> list[tuple[Any, ...]]:
    if db.startswith("sqlite"):
        import sqlite3

        with sqlite3.connect(db.removeprefix("sqlite:///")) as conn:
            return conn.execute("SELECT * FROM sessions").fetchall()
    import psycopg

    with psycopg.connect(db) as conn:
        return conn.execute("SELECT * FROM sessions").fetchall()


async def call(http: httpx.AsyncClient, method: str, path: str,
               headers: dict[str, str]) -> httpx.Response:
    body = BODIES.get(path) if method in ("post", "put", "patch") else None
    if path == "/api/jobs/stream":  # the owner feed never ends by itself: its answer is enough
        async with http.stream(method.upper(), path, headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                return r
            return httpx.Response(200, headers=r.headers)  # its first frame is the list
    return await http.request(method.upper(), path, json=body, headers=headers)


async def test_every_route_and_op_refuses_strangers(serve: Serve, db_url: str) -> None:
    srv = serve(db=db_url)
    victim = await guest(srv.url)
    job, _ = await victim.submit("block", {})
    jid = job["id"]
    other = await guest(srv.url)
    mallory = add_user(db_url, "mallory")
    expired = await expired_token(db_url, victim.owner)
    http = httpx.AsyncClient(base_url=srv.url, timeout=30)

    routes = [(m, p) for p, ops in (await http.get("/openapi.json")).json()["paths"].items()
              for m in ops]
    assert ("get", "/api/jobs/{job_id}/stream") in routes and len(routes) >= 10
    anonymous = {"none": {}, "bad": {"Authorization": "Bearer not-a-token"},
                 "expired": {"Authorization": f"Bearer {expired}"},
                 "bad cookie": {"Cookie": "jobwire_token=not-a-token"}}
    strangers = {"other guest": {"Authorization": f"Bearer {other.token}"},
                 "other user": {"Authorization": f"Bearer {mallory}"},
                 "other guest's cookie": {"Cookie": f"jobwire_token={other.token}"}}
    for method, template in routes:
        if (method, template) in PUBLIC:
            continue
        path = template.replace("{job_id}", jid)
        missing = template.replace("{job_id}", uuid.uuid4().hex)
        for who, headers in anonymous.items():
            r = await call(http, method, path, headers)
            assert r.status_code == 401, (who, method, path, r.text)
            assert jid not in r.text
        for who, headers in strangers.items():
            r = await call(http, method, path, headers)
            assert jid not in r.text, (who, method, path)
            if template.startswith("/api/admin/"):  # the service key's alone
                assert r.status_code == 403, (who, method, path, r.text)
            elif "{job_id}" in template:
                # Exactly what a job that does not exist answers: nothing to tell them apart.
                r_missing = await call(http, method, missing, headers)
                assert r.status_code == 404, (who, method, path, r.text)
                assert_alike(r, r_missing)
            elif template == "/api/sessions/claim":
                # Guests cannot claim; a user names a guest token that does not exist.
                assert r.status_code == (404 if who == "other user" else 403), (who, r.text)
            elif template == "/api/sessions/signin":
                # The token in the body is the credential: an unknown one, whoever sends it.
                assert r.status_code == 401, (who, r.text)
            else:  # their own list, their own new job
                assert r.status_code == {"get": 200, "post": 201}[method], (who, path, r.text)
    # SSE and WebSocket also take ?token=.
    for token in (other.token, mallory):
        r = await http.get(f"/api/jobs/{jid}/stream", params={"token": token})
        assert r.status_code == 404 and jid not in r.text
    for token in ("not-a-token", expired):
        r = await http.get(f"/api/jobs/{jid}/stream", params={"token": token})
        assert r.status_code == 401

    # WebSocket: strangers cannot connect; other owners cannot tell the job exists.
    for token in (None, "not-a-token", expired):
        async with connect(ws_url(srv.url, token)) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
    for token in (other.token, mallory):
        async with connect(ws_url(srv.url, token)) as ws:
            replies = []
            for job_id in (jid, "0" * 32):
                await ws.send(orjson.dumps({"op": "subscribe", "job": job_id}).decode())
                replies.append(orjson.loads(await ws.recv()))
            assert {**replies[0], "job": "x"} == {**replies[1], "job": "x"}
            assert replies[0]["code"] == 404
            await ws.send(orjson.dumps({"op": "unsubscribe", "job": jid}).decode())
            assert orjson.loads(await ws.recv()) == {"op": "unsubscribed", "job": jid}
            await ws.send('{"op": "subscribe", "job": "nope"}')  # the next message is this
            assert orjson.loads(await ws.recv())["job"] == "nope"  # reply, not a job event

    # The job is untouched (nobody cancelled or deleted it) and its owner still sees it.
    mine = await victim.job(jid)
    assert mine["status"] in ("queued", "running") and not mine["cancel_requested"]
    assert [e["type"] for e in await victim.events(jid)][:1] == ["created"]

    # Tokens are stored only as SHA-256 hashes.
    rows = stored_sessions(db_url)
    flat = " ".join(str(v) for row in rows for v in row)
    for token in (victim.token, other.token, mallory, expired):
        assert token not in flat
        assert hash_token(token) in flat
    await victim.http.post(f"/api/jobs/{jid}/cancel")
    for c in (victim, other):
        await c.http.aclose()
    await http.aclose()


async def test_guest_session_claimed_into_a_user(serve: Serve, db_url: str) -> None:
    srv = serve(db=db_url)
    g = await guest(srv.url)
    alice = await as_user(srv.url, add_user(db_url, "alice"))
    done, _ = await g.submit("echo", "hello")
    await g.wait_terminal(done["id"])
    keyed, _ = await g.submit("block", {}, key="k1")
    hers, _ = await alice.submit("block", {}, key="k1")

    # A guest cannot claim; a bogus guest token is not found.
    r = await g.http.post("/api/sessions/claim", json={"token": g.token})
    assert r.status_code == 403
    r = await alice.http.post("/api/sessions/claim", json={"token": "bogus"})
    assert r.status_code == 404
    # Both have an active (block, k1) job: refused, naming it, and nothing moved.
    r = await alice.http.post("/api/sessions/claim", json={"token": g.token})
    assert r.status_code == 409 and keyed["id"] in r.json()["detail"]
    assert (await g.job(keyed["id"]))["owner"] == g.owner

    await alice.http.post(f"/api/jobs/{hers['id']}/cancel")
    await alice.wait_terminal(hers["id"])
    r = await alice.http.post("/api/sessions/claim", json={"token": g.token})
    assert r.status_code == 200 and r.json() == {"owner": "user:alice", "moved": 2}
    # The jobs followed, with their history; the guest token no longer works.
    for job in (done, keyed):
        mine = await alice.job(job["id"])
        assert mine["owner"] == "user:alice"
        assert (await alice.events(job["id"]))[0]["seq"] == 1
    listed = {j["id"] for j in (await alice.http.get("/api/jobs")).json()}
    assert {done["id"], keyed["id"], hers["id"]} <= listed
    assert (await g.http.get("/api/jobs")).status_code == 401
    # The dedup key now belongs to alice: submitting it again joins the moved job.
    again, created = await alice.submit("block", {}, key="k1")
    assert not created and again["id"] == keyed["id"]
    r = await alice.http.post("/api/sessions/claim", json={"token": g.token})
    assert r.status_code == 404
    await alice.http.post(f"/api/jobs/{keyed['id']}/cancel")
    for c in (g, alice):
        await c.http.aclose()


async def test_racing_claims_move_the_jobs_once(serve: Serve, db_url: str) -> None:
    """Two users claiming one guest session at once: one gets its jobs, the other 404."""
    srv = serve(db=db_url)
    g = await guest(srv.url)
    jobs = [(await g.submit("echo", k))[0]["id"] for k in range(5)]
    claimers = [await as_user(srv.url, add_user(db_url, name)) for name in ("ann", "bob")]
    answers = await asyncio.gather(*(u.http.post("/api/sessions/claim", json={"token": g.token})
                                     for u in claimers))
    assert sorted(r.status_code for r in answers) == [200, 404]
    winner = claimers[[r.status_code for r in answers].index(200)]
    assert answers[[r.status_code for r in answers].index(200)].json()["moved"] == 5
    for job_id in jobs:
        assert (await winner.http.get(f"/api/jobs/{job_id}")).status_code == 200
    for c in (g, *claimers):
        await c.http.aclose()
