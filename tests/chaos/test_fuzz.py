"""API fuzzing: schemathesis generates requests from /openapi.json, with and without a
session; no response may be a 5xx or disagree with the schema. Plus the hostile text
it found that PostgreSQL cannot store (NUL, lone surrogates), on every backend."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect

from tests.chaos.conftest import Serve
from tests.chaos.wire import ws_url
from tests.conftest import guest

pytestmark = pytest.mark.timeout(300)

FUZZ_SECONDS = os.environ.get("JOBWIRE_FUZZ_SECONDS", "12")
# Everything but positive_data_acceptance (any string is a valid `task` in the schema,
# but only registered ones are accepted) and allow_header_conformance (FastAPI answers
# an undeclared method with 405 without an Allow header; no client relies on it).
CHECKS = ["--checks", "all", "--exclude-checks",
          "positive_data_acceptance,allow_header_conformance"]


@pytest.mark.parametrize("authenticated", [True, False], ids=["session", "anonymous"])
def test_schemathesis(serve: Serve, db_url: str, tmp_path: Path, authenticated: bool) -> None:
    srv = serve(db=db_url)
    args = [str(Path(sys.executable).with_name("schemathesis")), "run",
            f"{srv.url}/openapi.json", *CHECKS, "--max-time", FUZZ_SECONDS, "--workers", "1"]
    if authenticated:
        token = httpx.post(f"{srv.url}/api/sessions").json()["token"]
        args += ["-H", f"Authorization: Bearer {token}"]
    out = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=240)
    report = out.stdout[-6000:] + out.stderr[-2000:]
    assert out.returncode == 0, report
    assert " passed" in report, report


async def test_text_the_databases_cannot_store(serve: Serve, db_url: str) -> None:
    """NUL and lone surrogates are refused with 422 (or 404 on a socket), never a 5xx."""
    srv = serve(db=db_url)
    c = await guest(srv.url)
    for body in ({"task": "echo", "input": "a\u0000b"},
                 {"task": "echo", "input": {"k\u0000": 1}},
                 {"task": "echo", "key": "k\u0000"},
                 {"task": "echo\u0000"}):
        r = await c.http.post("/api/jobs", json=body)
        assert r.status_code == 422, (body, r.text)
    r = await c.http.post("/api/jobs", content=b'{"task": "echo", "key": "\\ud800"}',
                          headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    for path in ("/api/jobs/a%00b", "/api/jobs/a%00b/items", "/api/jobs/a%00b/events",
                 "/api/jobs/a%00b/stream"):
        r = await c.http.get(path)
        assert r.status_code == 422, (path, r.text)
    assert (await c.http.post("/api/jobs/a%00b/cancel")).status_code == 422
    assert (await c.http.delete("/api/jobs/a%00b")).status_code == 422
    async with connect(ws_url(srv.url, c.token)) as ws:
        await ws.send(orjson.dumps({"op": "subscribe", "job": "a\u0000b"}).decode())
        assert orjson.loads(await ws.recv())["code"] == 404
        await ws.send(orjson.dumps({"op": "subscribe", "job": "fine"}).decode())
        assert orjson.loads(await ws.recv())["code"] == 404  # the socket still works
    job, _ = await c.submit("echo", "still fine")
    assert (await c.wait_terminal(job["id"]))["status"] == "completed"
    await c.http.aclose()
