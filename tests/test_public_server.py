"""Hardening for a server open to the public: security headers, a token for /metrics,
one log line per failing job, and JSON nested too deep refused with a clear 422."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect

from jobwire.api.headers import CSP
from tests.chaos.wire import ws_url
from tests.conftest import Client, Proc, guest, new_id

HEADERS = {"x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
           "x-frame-options": "DENY", "content-security-policy": CSP}


async def test_pages_static_files_and_api_carry_the_security_headers(
        client: Client, shared_server: Proc) -> None:
    for path in ("/", "/demo/posts/1", "/static/dashboard.js", "/static/dashboard.css",
                 "/static/missing.js", "/api/jobs", "/healthz", "/metrics"):
        r = await client.http.get(path)
        assert {k: r.headers.get(k) for k in HEADERS} == HEADERS, (path, r.status_code)
        # An answer without CORS headers (no Origin) must not be served from a shared
        # cache to a partner origin's page, which needs them.
        assert r.headers.get("vary") == "Origin", (path, r.headers.get("vary"))
    # BodyLimit's own 413, refused by the announced length before any body is sent.
    reader, writer = await asyncio.open_connection("127.0.0.1", shared_server.port)
    writer.write(b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 9999999\r\n\r\n")
    head = (await reader.readuntil(b"\r\n\r\n")).decode().lower()
    writer.close()
    assert head.startswith("http/1.1 413") and "x-frame-options: deny" in head, head
    # Swagger UI runs an inline script from a CDN: /docs keeps working, framing still denied.
    r = await client.http.get("/docs")
    assert r.status_code == 200 and "content-security-policy" not in r.headers
    assert r.headers["x-frame-options"] == "DENY"


def test_metrics_need_the_token_when_one_is_set(procs: Any, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    db = f"sqlite:///{tmp_path / 'jobwire.db'}"
    open_server: Proc = procs("serve", "--db", db)
    assert httpx.get(open_server.url + "/metrics").status_code == 200  # unset: open
    monkeypatch.setenv("JOBWIRE_METRICS_TOKEN", "s3cret-scraper")
    srv: Proc = procs("serve", "--db", db)
    for headers in ({}, {"Authorization": "Bearer s3cret-scrape"},
                    {"Authorization": "Bearer s3cret-scraper-and-more"},
                    {"Authorization": "Basic s3cret-scraper"}):
        r = httpx.get(srv.url + "/metrics", headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert "JOBWIRE_METRICS_TOKEN" in r.json()["detail"]
        assert "jobwire_jobs" not in r.text
    r = httpx.get(srv.url + "/metrics", headers={"Authorization": "Bearer s3cret-scraper"})
    assert r.status_code == 200 and "jobwire_jobs{" in r.text
    assert httpx.get(srv.url + "/healthz").status_code == 200  # health checks stay open


async def test_a_failing_job_logs_one_warning_line(procs: Any, tmp_path: Path) -> None:
    srv: Proc = procs("serve", "--db", f"sqlite:///{tmp_path / 'jobwire.db'}")
    c = await guest(srv.url)
    error = "\x1b]2;pwned\x07\x1b[2K\rjob completed\n" + "x" * 500
    job, _ = await c.submit("hostile", {"names": ["a", "b"], "error": error})
    assert (await c.wait_terminal(job["id"]))["error"] == f"RuntimeError: {error}"
    await c.http.aclose()
    log = srv.log.read_text()
    lines = [line for line in log.splitlines() if " jobwire." in line and job["id"] in line]
    assert len(lines) == 1, lines
    (line,) = lines
    assert " WARNING jobwire.worker: " in line
    assert line.endswith("(hostile) failed: RuntimeError: \\x1b]2;pwned\\x07\\x1b[2K\\r"
                         "job completed\\n" + "x" * (200 - error.index("x")) + "…"), line
    assert "Traceback" not in log and "\x1b" not in log


TOO_DEEP = "JSON nested too deep: at most 64 levels"


@pytest.mark.parametrize("shape", ["array", "object"])
async def test_json_nested_too_deep_is_a_422_saying_so(client: Client, shared_server: Proc,
                                                       shape: str) -> None:
    def nest(depth: int) -> str:
        return ("[" * depth + "]" * depth if shape == "array"
                else '{"a":' * depth + "1" + "}" * depth)

    for body in (nest(10_000), f'{{"task":"echo","input":{nest(10_000)}}}',
                 f'{{"task":"echo","input":{nest(64)}}}'):
        r = await client.http.post("/api/jobs", content=body,
                                   headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        assert r.json() == {"detail": [{"loc": ["body"], "msg": TOO_DEEP,
                                        "type": "json_too_deep"}]}
    # An input one level shallower fits: the body is the 64th level.
    job, _ = await client.submit("echo", orjson.loads(nest(63)))
    assert (await client.wait_terminal(job["id"]))["result"] == orjson.loads(nest(63))

    async with connect(ws_url(shared_server.url, client.token)) as ws:
        for depth in (10_000, 65):
            frame = f'{{"op":"subscribe","job":"x","after":0,"deep":{nest(depth - 1)}}}'
            await ws.send(frame)
            assert orjson.loads(await ws.recv()) == {"op": "error", "error": TOO_DEEP}
        await ws.send(orjson.dumps({"op": "subscribe", "job": new_id()}).decode())
        assert orjson.loads(await ws.recv())["code"] == 404  # the socket still works
