"""The HTTP API against a real server process, on every backend."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
import websockets

from tests.conftest import Client, Proc, assert_alike, cli, guest

TERMINAL = {"completed", "failed", "cancelled"}


async def test_dedup_storm_yields_one_job(client: Client) -> None:
    """200 concurrent submits of one key answer one job, created once, and the key is
    free again once it ends. What this proves is the API's answer, not the database's
    dedup: in one server process same-key submits are coalesced (`_submits` in
    runtime.py) into one store call, so a check-then-insert race cannot show here.
    The races are in test_store.py::test_dedup_storm_across_processes and
    test_postgres.py::test_dedup_storm_split_across_servers."""
    # `block` stays active until cancelled, so every submit of the storm meets it.
    results = await asyncio.gather(*(client.submit("block", {}, key="k") for _ in range(200)))
    assert len({job["id"] for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    job_id = results[0][0]["id"]
    await client.http.post(f"/api/jobs/{job_id}/cancel")
    assert (await client.wait_terminal(job_id))["status"] == "cancelled"
    again, created = await client.submit("block", {}, key="k")
    assert created and again["id"] != job_id, "a finished job's key must start a new job"
    await client.http.post(f"/api/jobs/{again['id']}/cancel")


async def test_same_key_for_another_owner_is_another_job(client: Client,
                                                          shared_server: Proc) -> None:
    other = await guest(shared_server.url)
    mine, _ = await client.submit("block", {}, key="shared-key")
    theirs, created = await other.submit("block", {}, key="shared-key")
    assert created and theirs["id"] != mine["id"]
    for c, job in ((client, mine), (other, theirs)):
        await c.http.post(f"/api/jobs/{job['id']}/cancel")
        assert (await c.wait_terminal(job["id"]))["status"] == "cancelled"


@pytest.mark.parametrize(("body", "field"), [
    ({}, ["body", "task"]),
    ({"task": 5}, ["body", "task"]),
    ({"task": "no_such_task"}, ["body", "task"]),
    ({"task": "steps", "input": {"n": "many"}}, ["body", "input", "n"]),
    ({"task": "steps", "input": {"n": -1}}, ["body", "input", "n"]),
    ({"task": "steps", "input": {}}, ["body", "input", "n"]),
    ({"task": "steps", "input": {"n": 1}, "key": ""}, ["body", "key"]),
    ({"task": "steps", "input": {"n": 1}, "key": "x" * 501}, ["body", "key"]),
    ({"task": "steps", "input": {"n": 1}, "key": "a\u0000b"}, ["body", "key"]),
    ({"task": "steps", "input": {"n": 1}, "colour": "red"}, ["body", "colour"]),
])
async def test_bad_bodies_are_422_naming_the_field(client: Client, body: dict[str, Any],
                                                   field: list[str]) -> None:
    r = await client.http.post("/api/jobs", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == field
    assert (await client.http.get("/api/jobs")).json() == [], "nothing was stored"


async def test_malformed_json_and_bad_query_are_422(client: Client) -> None:
    r = await client.http.post("/api/jobs", content=b"{not json",
                               headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = await client.http.get("/api/jobs", params={"status": "sleeping"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "status"]
    r = await client.http.get("/api/jobs", params={"limit": 0})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "limit"]


async def test_foreign_jobs_are_404_everywhere(client: Client, shared_server: Proc) -> None:
    job, _ = await client.submit("block", {})
    other = await guest(shared_server.url)
    jid = job["id"]
    missing = "0" * 32
    for method, path in [("GET", "/api/jobs/{}"), ("GET", "/api/jobs/{}/items"),
                         ("GET", "/api/jobs/{}/events"), ("GET", "/api/jobs/{}/stream"),
                         ("POST", "/api/jobs/{}/cancel"), ("DELETE", "/api/jobs/{}")]:
        foreign = await other.http.request(method, path.format(jid))
        absent = await other.http.request(method, path.format(missing))
        assert foreign.status_code == 404 and foreign.json() == {"detail": "job not found"}
        assert_alike(foreign, absent)  # a foreign id looks exactly like a missing one
    assert all(j["id"] != jid for j in (await other.http.get("/api/jobs")).json())
    async with websockets.connect(ws_url(shared_server, other.token)) as ws:
        await ws.send(json.dumps({"op": "subscribe", "job": jid, "after": 0}))
        reply = json.loads(await ws.recv())
        assert reply["op"] == "error" and reply["code"] == 404
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.5)  # and no event of that job, ever
    assert (await client.job(jid))["status"] == "running", "the other guest changed nothing"
    await client.http.post(f"/api/jobs/{jid}/cancel")
    await client.wait_terminal(jid)


async def test_no_token_is_401(shared_server: Proc) -> None:
    async with httpx.AsyncClient(base_url=shared_server.url) as anon:
        for method, path in [("GET", "/api/jobs"), ("POST", "/api/jobs"),
                             ("GET", "/api/jobs/x"), ("GET", "/api/jobs/x/events"),
                             ("GET", "/api/jobs/x/stream"), ("DELETE", "/api/jobs/x")]:
            assert (await anon.request(method, path)).status_code == 401, path
        r = await anon.get("/api/jobs", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401
    # A first frame other than auth is refused at once (waiting for none is test_tokens').
    async with websockets.connect(shared_server.url.replace("http", "ws") + "/api/ws") as ws:
        await ws.send('{"op": "subscribe", "job": "x", "after": 0}')
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401


async def test_cookie_session_works_for_browsers(shared_server: Proc) -> None:
    async with httpx.AsyncClient(base_url=shared_server.url) as browser:
        assert (await browser.post("/api/sessions")).status_code == 201
        r = await browser.post("/api/jobs", json={"task": "echo", "input": 1})
        assert r.status_code == 201


async def test_active_list_never_shows_terminal_jobs(client: Client) -> None:
    ids = [(await client.submit("steps", {"n": 2, "delay": 0.01 * k}))[0]["id"]
           for k in range(8)]
    seen_active: set[str] = set()
    while True:
        active = (await client.http.get("/api/jobs", params={"status": "active"})).json()
        assert all(j["status"] in ("queued", "running") for j in active), active
        seen_active |= {j["id"] for j in active}
        if not active:
            break
    assert seen_active <= set(ids)
    finished = (await client.http.get("/api/jobs", params={"status": "completed"})).json()
    assert {j["id"] for j in finished} == set(ids)
    newest_first = [j["id"] for j in (await client.http.get("/api/jobs")).json()]
    assert newest_first == ids[::-1]


async def test_second_job_starts_clean(client: Client) -> None:
    first, _ = await client.submit("steps", {"n": 5}, key="same-input")
    done = await client.wait_terminal(first["id"])
    assert done["progress"] == {"total": 5, "done": 5, "failed": 0}
    second, created = await client.submit("steps", {"n": 5}, key="same-input")
    assert created and second["id"] != first["id"]
    assert second["seq"] == 1 and second["progress"] == {"total": 0, "done": 0, "failed": 0}
    assert second["result"] is None and second["finished_at"] is None
    events = await client.events(second["id"])
    assert events[0]["seq"] == 1 and events[0]["type"] == "created"
    assert all(e["job"] == second["id"] for e in events)


async def test_failures_are_reported(client: Client) -> None:
    job, _ = await client.submit("boom", None)
    failed = await client.wait_terminal(job["id"])
    assert failed["status"] == "failed" and "boom on purpose" in failed["error"]
    job, _ = await client.submit("steps", {"n": 3, "fail_at": 1})
    partial = await client.wait_terminal(job["id"])
    assert partial["status"] == "completed"
    assert partial["progress"] == {"total": 3, "done": 2, "failed": 1}
    items = (await client.http.get(f"/api/jobs/{job['id']}/items")).json()
    assert [i["status"] for i in items["items"]] == ["done", "failed", "done"]
    assert items["seq"] == partial["seq"]


@pytest.mark.parametrize("cooperative", [True, False])
async def test_cancel_running_job(client: Client, cooperative: bool) -> None:
    job, _ = await client.submit("block", {"cooperative": cooperative})
    while (await client.job(job["id"]))["status"] != "running":
        await asyncio.sleep(0.02)
    r = await client.http.post(f"/api/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    ended = await client.wait_terminal(job["id"], timeout=10)
    assert ended["status"] == "cancelled"
    types = [e["type"] for e in await client.events(job["id"])]
    assert types[-2:] == ["cancel_requested", "cancelled"]


async def test_delete_only_when_finished(client: Client) -> None:
    job, _ = await client.submit("block", {})
    assert (await client.http.delete(f"/api/jobs/{job['id']}")).status_code == 409
    await client.http.post(f"/api/jobs/{job['id']}/cancel")
    await client.wait_terminal(job["id"])
    assert (await client.http.delete(f"/api/jobs/{job['id']}")).status_code == 204
    assert (await client.http.get(f"/api/jobs/{job['id']}")).status_code == 404
    assert (await client.http.get(f"/api/jobs/{job['id']}/events")).status_code == 404


async def test_long_poll_waits_for_the_next_event(client: Client) -> None:
    job, _ = await client.submit("steps", {"n": 1, "delay": 0.3})
    seen = [e["seq"] for e in await client.events(job["id"])]
    while True:
        batch = await client.events(job["id"], after=seen[-1], wait=5)
        assert batch, "a long-poll that returns must return events until the job ends"
        seen += [e["seq"] for e in batch]
        if batch[-1]["type"] in TERMINAL:
            break
    assert seen == list(range(1, seen[-1] + 1))


async def test_metrics_and_health(shared_server: Proc) -> None:
    async with httpx.AsyncClient(base_url=shared_server.url) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        text = (await http.get("/metrics")).text
        for name in ("jobwire_jobs{status=\"completed\"}", "jobwire_subscriptions",
                     "jobwire_events_delivered_total"):
            assert name in text


def ws_url(server: Proc, token: str) -> str:
    return server.url.replace("http://", "ws://") + f"/api/ws?token={token}"


async def test_items_in_flight_when_a_job_ends_are_not_left_running(client: Client) -> None:
    job, _ = await client.submit("steps", {"n": 3, "delay": 5})
    while not any(e["type"] == "item" for e in await client.events(job["id"])):
        await asyncio.sleep(0.02)
    await client.http.post(f"/api/jobs/{job['id']}/cancel")
    ended = await client.wait_terminal(job["id"])
    assert ended["status"] == "cancelled"
    items = (await client.http.get(f"/api/jobs/{job['id']}/items")).json()["items"]
    assert [i["status"] for i in items] == ["pending"] * 3
    last = (await client.events(job["id"]))[-1]
    assert last["type"] == "cancelled" and last["data"]["reset"] == ["i0"]


async def test_claimed_guest_token_fails_at_once_even_mid_storm(server: Proc,
                                                                 db_url: str) -> None:
    """Concurrent requests with one token share session lookups; a request sent after the
    claim answered must still be refused, never served by a lookup made before it."""
    user = cli("users", "add", "dora", "--db", db_url).stdout.strip()
    g = await guest(server.url)
    job, _ = await g.submit("block", {}, key="k")
    body = {"task": "block", "input": {}, "key": "k"}
    stop = asyncio.Event()

    async def storm() -> None:
        while not stop.is_set():
            r = await g.http.post("/api/jobs", json=body)
            assert r.status_code in (200, 201, 401), r.text

    storms = [asyncio.create_task(storm()) for _ in range(20)]
    await asyncio.sleep(0.3)
    async with httpx.AsyncClient(base_url=server.url,
                                 headers={"Authorization": f"Bearer {user}"}) as u:
        r = await u.post("/api/sessions/claim", json={"token": g.token})
        assert r.status_code == 200 and r.json()["moved"] == 1, r.text
        after = await asyncio.gather(*(g.http.post("/api/jobs", json=body) for _ in range(50)))
        assert {r.status_code for r in after} == {401}
        stop.set()
        await asyncio.gather(*storms)
        assert (await u.post(f"/api/jobs/{job['id']}/cancel")).status_code == 200
    await g.http.aclose()
