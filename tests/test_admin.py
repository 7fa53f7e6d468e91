"""The operator's side of the API (the page at /admin): `GET /api/jobs` paged by cursor
and filtered, counts and retry under /api/admin, for the service key alone."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest

from tests.conftest import BACKENDS, Client, Proc, free_port, fresh_db, guest

SERVICE_KEY = "svc-" + "k" * 40
JWT_SECRET = "a-jwt-secret-of-at-least-32-characters!!"


@pytest.fixture(scope="module", params=BACKENDS)
def ops(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Proc]:
    """A server with a service key and JWTs, per backend."""
    directory = tmp_path_factory.mktemp("admin")
    with fresh_db(request.param, directory) as url:
        with pytest.MonkeyPatch.context() as mp:  # the server inherits these, not this process
            mp.setenv("JOBWIRE_SERVICE_KEY", SERVICE_KEY)
            mp.setenv("JOBWIRE_JWT_SECRET", JWT_SECRET)
            proc = Proc("serve", "--app", "tests.tasks:jobwire", "--db", url, "--lease", "2",
                        port=free_port(), log=directory / "serve.log").start()
        yield proc
        proc.stop()


def http(server: Proc, token: str | None = None, **headers: str) -> httpx.AsyncClient:
    auth = {} if token is None else {"Authorization": f"Bearer {token}"}
    return httpx.AsyncClient(base_url=server.url, timeout=30, headers={**auth, **headers})


async def page_through(svc: httpx.AsyncClient, **params: Any) -> list[str]:
    """Every id of a listing, page by page by X-Next-Cursor."""
    ids: list[str] = []
    cursor: str | None = None
    for _ in range(1000):  # bounded: a cursor that never ends fails the test
        r = await svc.get("/api/jobs", params={**params, **(
            {} if cursor is None else {"before": cursor})})
        assert r.status_code == 200, r.text
        ids += [j["id"] for j in r.json()]
        cursor = r.headers.get("x-next-cursor")
        if cursor is None:
            return ids
    raise AssertionError("the cursor never ran out")


async def test_pages_return_every_job_once_while_jobs_are_inserted(ops: Proc) -> None:
    a, b = await guest(ops.url), await guest(ops.url)
    before = [(await c.submit("echo", {"n": k}))[0]["id"] for k in range(20) for c in (a, b)]
    inserting = True

    async def insert() -> list[str]:
        added = []
        while inserting and len(added) < 60:  # (under the active-job cap)
            added.append((await a.submit("echo", {"late": len(added)}))[0]["id"])
        return added

    async with http(ops, SERVICE_KEY) as svc:
        writer = asyncio.create_task(insert())
        await asyncio.sleep(0.05)
        owners = [a.owner, b.owner]
        seen = [i for owner in owners
                for i in await page_through(svc, owner=owner, limit=3)]
        everyone = await page_through(svc, limit=4)
        inserting = False
        late = await writer
    assert late, "jobs were inserted while paging"
    assert len(seen) == len(set(seen)), "no job twice"
    assert set(before) <= set(seen) and set(seen) <= set(before) | set(late)
    assert len(everyone) == len(set(everyone)) and set(before) <= set(everyone)


async def test_filters_by_task_status_owner_and_time(ops: Proc) -> None:
    a, b = await guest(ops.url), await guest(ops.url)
    t0 = time.time()
    ok = (await a.submit("echo", 1))[0]
    bad = (await a.submit("boom", 1))[0]
    await asyncio.sleep(0.05)
    t1 = time.time()
    other = (await b.submit("echo", 2))[0]
    for job in (ok, bad, other):
        await a.wait_terminal(job["id"]) if job is not other else await b.wait_terminal(
            job["id"])
    async with http(ops, SERVICE_KEY) as svc:
        async def ids(**params: Any) -> list[str]:
            return await page_through(svc, **params)
        assert await ids(owner=a.owner, task="echo") == [ok["id"]]
        assert await ids(owner=a.owner, status="failed") == [bad["id"]]
        assert await ids(since=t0, until=t1) == [bad["id"], ok["id"]]
        assert await ids(since=t1, task="echo") == [other["id"]]
        counts = (await svc.get("/api/admin/counts", params={"owner": a.owner})).json()
        assert counts == {"queued": 0, "running": 0, "completed": 1, "failed": 1,
                          "cancelled": 0}
        assert (await svc.get("/api/admin/counts")).json()["failed"] >= 1
        for params, field in [({"since": "nan"}, "since"), ({"until": "-1"}, "until"),
                              ({"since": 5, "until": 5}, "until"), ({"task": "a\0b"}, "task"),
                              ({"task": "x" * 201}, "task"), ({"since": "yesterday"}, "since")]:
            r = await svc.get("/api/jobs", params=params)
            assert r.status_code == 422, (params, r.text)
            assert [e["loc"] for e in r.json()["detail"]] == [["query", field]], r.text


def cursor_of(value: bytes) -> str:
    return base64.urlsafe_b64encode(value).decode()


@pytest.mark.parametrize("cursor", [
    "not base64!", "é", "x" * 301, cursor_of(b"{}"), cursor_of(b"[1]"), cursor_of(b"[true,\"a\"]"),
    cursor_of(b"[1e999,\"a\"]"), cursor_of(b"[1,\"\"]"), cursor_of(b"[1,\"a\\u0000\"]"),
    cursor_of(b"[\"1\",\"a\"]"), cursor_of(b"\xff\xfe"), cursor_of(b"[1,2]")])
async def test_a_tampered_cursor_is_422_not_a_500(ops: Proc, cursor: str) -> None:
    async with http(ops, SERVICE_KEY) as svc:
        r = await svc.get("/api/jobs", params={"before": cursor})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["query", "before"]


async def test_admin_routes_are_the_service_keys_alone(ops: Proc) -> None:
    someone = await guest(ops.url)
    job = (await someone.submit("boom", 1))[0]
    await someone.wait_terminal(job["id"])
    user_jwt = jwt.encode({"sub": "alice", "exp": time.time() + 600}, JWT_SECRET, "HS256")
    refused = [(None, {}, 401), ("not-a-token", {}, 401), (someone.token, {}, 403),
               (user_jwt, {}, 403), ("a.b.c", {}, 401),
               (SERVICE_KEY, {"X-Jobwire-Owner": someone.owner}, 403),
               (user_jwt, {"X-Jobwire-Owner": someone.owner}, 403)]
    for token, headers, code in refused:
        async with http(ops, token, **headers) as api:
            for method, path in [("GET", "/api/admin/counts"),
                                 ("POST", f"/api/admin/jobs/{job['id']}/retry")]:
                r = await api.request(method, path)
                assert r.status_code == code, (token, headers, path, r.text)
    assert len(await page_through(someone.http)) == 1, "no refused retry made a job"


async def test_retry_submits_the_job_again_as_its_owner(ops: Proc) -> None:
    someone = await guest(ops.url)
    said = {"names": ["a", "b"], "error": f"said {uuid.uuid4().hex}"}
    failed = (await someone.submit("hostile", said, key="k1"))[0]
    await someone.wait_terminal(failed["id"])
    done = (await someone.submit("echo", 1))[0]
    await someone.wait_terminal(done["id"])
    async with http(ops, SERVICE_KEY) as svc:
        r = await svc.post(f"/api/admin/jobs/{failed['id']}/retry")
        assert r.status_code == 201, r.text
        new = r.json()["job"]
        assert r.json()["retried"] == failed["id"] and r.json()["created"] is True
        assert new["id"] != failed["id"]
        assert (new["owner"], new["task"], new["key"]) == (someone.owner, "hostile", "k1")
        again = await someone.wait_terminal(new["id"])  # the owner's own job, its input kept
        assert (again["status"], again["info"]) == ("failed", {"stage": said["error"]})
        assert (await someone.job(failed["id"]))["status"] == "failed", "kept as it ended"
        r = await svc.post(f"/api/admin/jobs/{done['id']}/retry")
        assert r.status_code == 409 and "completed" in r.json()["detail"]
        r = await svc.post(f"/api/admin/jobs/{uuid.uuid4().hex}/retry")
        assert r.status_code == 404
        # A job its submitter gave a priority (queued for later, then cancelled) is
        # retried with that priority, not the task's default.
        r = await someone.http.post("/api/jobs", json={"task": "ranked", "input": 1,
                                                       "priority": 7, "delay": 600})
        urgent = r.json()["job"]
        assert (await someone.http.post(f"/api/jobs/{urgent['id']}/cancel")).status_code == 200
        await someone.wait_terminal(urgent["id"])
        r = await svc.post(f"/api/admin/jobs/{urgent['id']}/retry")
        assert r.status_code == 201 and r.json()["job"]["priority"] == 7, r.text


async def test_an_owners_list_stays_a_list_and_pages_too(ops: Proc) -> None:
    someone: Client = await guest(ops.url)
    made = [(await someone.submit("echo", k))[0]["id"] for k in range(5)]
    r = await someone.http.get("/api/jobs", params={"limit": 2})
    assert isinstance(r.json(), list) and "x-next-cursor" in r.headers
    assert await page_through(someone.http, limit=2) == made[::-1]
    r = await someone.http.get("/api/jobs", params={"limit": 10})
    assert "x-next-cursor" not in r.headers, "a page that is not full is the last"
