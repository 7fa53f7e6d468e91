"""The examples as a user runs them: real processes on loopback ports, driven in Chromium.
examples/jwt_sidecar: jobwire as its own service, another origin, verifying the JWTs the
app's backend mints; examples/fastapi_app: jobwire mounted inside the app at /jobs."""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from playwright.sync_api import BrowserContext, Page

from tests.conftest import Proc, free_port

pytestmark = pytest.mark.browser

# Every render of a job card, as "done/total", reported to Python from page load on:
# each value data-done took, also those overwritten before the observer ran (a frame
# that carries several events renders the card once per event, in one task).
RECORDER = """
new MutationObserver((records) => {
  const cards = new Set();
  for (const r of records) {
    if (r.target.dataset.testid !== "job") continue;
    if (cards.has(r.target)) window.recordRender(r.target.dataset.jobId,
                                                 `${r.oldValue}/${r.target.dataset.total}`);
    cards.add(r.target);
  }
  for (const el of cards)
    window.recordRender(el.dataset.jobId, `${el.dataset.done}/${el.dataset.total}`);
}).observe(document, { subtree: true, attributes: true, attributeOldValue: true,
                       attributeFilter: ["data-done"] });
"""


def log_in(context: BrowserContext, url: str, user: str, ready: bool = True) -> Page:
    """A fresh tab logged in to the host app as `user`, its page ready and its WebSocket
    open (unless not `ready`); the tab's `renders` are every progress its job cards
    showed, its `urls` every URL it asked for and every uncaught error."""
    page = context.new_page()
    renders: dict[str, list[str]] = {}
    page.expose_function("recordRender", lambda job, p: renders.setdefault(job, []).append(p))
    page.add_init_script(RECORDER)
    page.renders = renders  # type: ignore[attr-defined]
    urls: list[str] = []  # every URL the tab asked for, the WebSocket's too
    page.on("request", lambda r: urls.append(r.url))
    page.on("websocket", lambda ws: urls.append(ws.url))
    page.on("pageerror", lambda e: urls.append(f"pageerror: {e}"))
    page.urls = urls  # type: ignore[attr-defined]
    page.goto(url + "/")
    page.fill("input[name=user]", user)
    page.fill("input[name=password]", f"{user}-pw")
    page.click("form[action='/login'] button")
    page.wait_for_selector("[data-testid=user]")
    if ready:
        page.wait_for_selector("body[data-ready=true]", state="attached")
        page.wait_for_selector("[data-testid=connection][data-state=live]")
    return page


@contextlib.contextmanager
def held_back(db: Path) -> Iterator[None]:
    """No job of the SQLite database at `db` starts meanwhile: a worker's claim fails, and
    it claims again once this ends (within its poll, a second at most)."""
    conn = sqlite3.connect(db, timeout=10, isolation_level=None)
    conn.execute("CREATE TRIGGER test_held_back BEFORE UPDATE OF status ON jobs "
                 "WHEN NEW.status = 'running' BEGIN SELECT raise(ABORT, 'held back'); END")
    try:
        yield
    finally:
        conn.execute("DROP TRIGGER test_held_back")
        conn.close()


def analyse(page: Page, db: Path) -> str:
    """Clicks "Analyse my liked tracks"; the new job's id once its card shows it queued.
    Until then the job is held back: its three or four tracks take ~50 ms, less than the
    page may take to start watching it, and the page would see only its end."""
    with held_back(db):
        before = page.eval_on_selector_all("[data-testid=job]", "els => els.length")
        page.click("[data-testid=analyse]")
        page.wait_for_function(
            "n => document.querySelectorAll('[data-testid=job]').length > n", arg=before)
        job: str = page.eval_on_selector("[data-testid=job]", "el => el.dataset.jobId")
        page.wait_for_selector(f'[data-job-id="{job}"][data-status=queued]')
    return job


def watch_to_completion(page: Page, job: str, tracks: int) -> None:
    """Waits until the job's card shows every track done, and checks the card showed
    progress on the way there, live, one track at a time or a few."""
    page.wait_for_selector(f'[data-job-id="{job}"][data-status=completed]')
    card = page.locator(f'[data-job-id="{job}"]')
    assert card.get_attribute("data-done") == str(tracks)
    assert card.locator("[data-testid=track][data-status=done]").count() == tracks
    shown = page.renders[job]  # type: ignore[attr-defined]
    assert shown[-1] == f"{tracks}/{tracks}" and len(set(shown)) > 1, shown


# How the example's page reaches jobwire (page.js): `jobwire-url`, and a JWT from `me-url`
# or the app's cookie. Answers the statuses of REST, a WebSocket watch and SSE for a job.
NOT_FOUND = """async (id) => {
  const meta = (n) => document.querySelector(`meta[name="${n}"]`)?.content;
  const base = new URL(meta("jobwire-url"), location.href).href.replace(/\\/$/, "");
  const token = meta("me-url") && (await (await fetch(meta("me-url"))).json()).token;
  const { createClient } = await import(`${base}/static/jobwire.js`);
  const client = createClient({ url: base, token });
  const rest = await client.job(id).then(() => 200, (e) => e.status);
  const ws = await new Promise((resolve) => {
    client.watch(id, () => resolve(200), { onError: (e) => resolve(e.status) });
  });
  const headers = token ? { authorization: `Bearer ${token}` } : {};
  const sse = (await fetch(`${base}/api/jobs/${id}/stream`, { headers })).status;
  return [rest, ws, sse];
}"""


def not_found(page: Page, job: str) -> list[int]:
    statuses: list[int] = page.evaluate(NOT_FOUND, job)
    return statuses


@pytest.fixture
def sidecar(procs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
            ) -> Iterator[tuple[Proc, Proc, str]]:
    """jobwire serving the demo tasks with a JWT secret and the app's origin allowed, and
    the app's backend on a port of its own; returns (jobwire, backend, secret)."""
    secret = secrets.token_urlsafe(32)
    app_port = free_port()
    monkeypatch.setenv("JOBWIRE_JWT_SECRET", secret)
    monkeypatch.setenv("JOBWIRE_ALLOWED_ORIGINS", f"http://127.0.0.1:{app_port}")
    service: Proc = procs("serve", "--db", f"sqlite:///{tmp_path / 'jobwire.db'}",
                          "--app", "jobwire.demo:jobwire")
    monkeypatch.setenv("JOBWIRE_URL", service.url)
    backend = Proc(port=app_port, log=tmp_path / "backend.log",
                   module="examples.jwt_sidecar.backend")
    try:
        backend.start()
        yield service, backend, secret
    finally:
        backend.stop()


def test_sidecar_users_see_their_own_jobs_live_across_origins(
        sidecar: tuple[Proc, Proc, str], context: BrowserContext, tmp_path: Path) -> None:
    service, backend, _ = sidecar
    db = tmp_path / "jobwire.db"
    alice = log_in(context, backend.url, "alice")
    job = analyse(alice, db)  # a cross-origin POST with the JWT: preflight, then the submit
    watch_to_completion(alice, job, tracks=4)
    urls = alice.urls  # type: ignore[attr-defined]
    assert f"{service.url.replace('http', 'ws')}/api/ws?auth=message" in urls
    # The JWT went in headers and the socket's first message: never in a URL (a JWT
    # starts with "eyJ", its JSON header's "{").
    assert not [u for u in urls if "eyJ" in u or u.startswith("pageerror")], urls

    bob_context = context.browser.new_context()  # type: ignore[union-attr]
    try:
        bob = log_in(bob_context, backend.url, "bob")
        assert bob.eval_on_selector_all("[data-testid=job]", "els => els.length") == 0
        bob_job = analyse(bob, db)
        watch_to_completion(bob, bob_job, tracks=3)
        assert bob.locator(f'[data-job-id="{job}"]').count() == 0
        # Alice's job is not found for Bob over REST, the WebSocket and SSE (read by fetch,
        # which can send the bearer header across origins; EventSource cannot).
        assert not_found(bob, job) == [404, 404, 404]
        # Bob's own job streams across origins the same way.
        events = bob.evaluate("""async ([base, id]) => {
          const me = await (await fetch("/me")).json();
          const r = await fetch(`${base}/api/jobs/${id}/stream`,
            { headers: { authorization: `Bearer ${me.token}` } });
          return (await r.text()).match(/^event: .*/gm);
        }""", [service.url, bob_job])
        assert events[0] == "event: created" and events[-1] == "event: completed"
    finally:
        bob_context.close()


def test_sidecar_refuses_forged_and_expired_tokens(sidecar: tuple[Proc, Proc, str]) -> None:
    service, _, secret = sidecar
    now = int(time.time())
    tokens = {
        "token signature invalid": jwt.encode({"sub": "alice", "exp": now + 600},
                                              secrets.token_urlsafe(32), "HS256"),
        "token expired": jwt.encode({"sub": "alice", "exp": now - 120}, secret, "HS256"),
    }
    for detail, token in tokens.items():
        r = httpx.get(service.url + "/api/jobs", headers={"Authorization": f"Bearer {token}"})
        assert (r.status_code, r.json()["detail"]) == (401, detail)
    good = jwt.encode({"sub": "alice", "exp": now + 600}, secret, "HS256")
    assert httpx.get(service.url + "/api/jobs",
                     headers={"Authorization": f"Bearer {good}"}).status_code == 200


def test_cors_answers_listed_origins_only(sidecar: tuple[Proc, Proc, str],
                                          context: BrowserContext) -> None:
    service, backend, _ = sidecar
    listed, unlisted = backend.url, backend.url.replace("127.0.0.1", "localhost")

    def preflight(origin: str) -> httpx.Response:
        return httpx.options(service.url + "/api/jobs", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})

    ok = preflight(listed)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == listed
    assert "access-control-allow-credentials" not in ok.headers
    refused = preflight(unlisted)
    assert refused.status_code == 400
    assert not [h for h in refused.headers if h.startswith("access-control-")], refused.headers
    asset = httpx.get(service.url + "/static/jobwire.js", headers={"Origin": unlisted})
    assert "access-control-allow-origin" not in asset.headers

    # The app's page on an unlisted origin (the same backend, reached as localhost):
    # the browser blocks importing jobwire.js and reading any answer.
    page = log_in(context, unlisted, "alice", ready=False)
    blocked = page.evaluate(f"""async () => {{
      const imported = await import("{service.url}/static/jobwire.js").then(() => "ok",
                                                                          (e) => e.name);
      const me = await (await fetch("/me")).json();
      const read = await fetch("{service.url}/api/jobs",
        {{ headers: {{ authorization: `Bearer ${{me.token}}` }} }}).then(() => "ok",
                                                                       (e) => e.name);
      return [imported, read];
    }}""")
    assert blocked == ["TypeError", "TypeError"]

    # A cookie is never accepted across origins: with jobwire's own session cookie in
    # the browser (the dashboard set it), the listed origin's credentialed calls fail,
    # and no job was submitted with it.
    dash = context.new_page()
    dash.goto(service.url + "/")
    dash.wait_for_selector("body[data-ready=true]", state="attached")
    page = log_in(context, listed, "alice")
    tried = page.evaluate(f"""() => Promise.all([
      fetch("{service.url}/api/jobs", {{ credentials: "include" }}),
      fetch("{service.url}/api/jobs", {{ method: "POST", credentials: "include",
        headers: {{ "content-type": "application/json" }},
        body: JSON.stringify({{ task: "analyze_tracks", input: {{ tracks: ["x"] }} }}) }}),
    ].map((p) => p.then((r) => r.status, (e) => e.name)))""")
    assert tried == ["TypeError", "TypeError"]
    assert dash.evaluate("fetch('/api/jobs').then((r) => r.json())") == []



@pytest.fixture
def mounted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Proc]:
    """examples/fastapi_app: the host app with jobwire mounted at /jobs."""
    monkeypatch.setenv("JOBWIRE_DB", f"sqlite:///{tmp_path / 'app.db'}")
    app = Proc(port=free_port(), log=tmp_path / "app.log", module="examples.fastapi_app.app")
    try:
        yield app.start()
    finally:
        app.stop()


def test_mounted_app_submits_in_process_and_users_see_their_own_jobs_live(
        mounted: Proc, context: BrowserContext, tmp_path: Path) -> None:
    assert httpx.get(mounted.url + "/jobs/api/jobs").status_code == 401  # not logged in
    alice = log_in(context, mounted.url, "alice")
    db = tmp_path / "app.db"
    job = analyse(alice, db)  # the app's POST /analyse submits in-process; the page watches it
    watch_to_completion(alice, job, tracks=4)

    others = context.browser.new_context()  # type: ignore[union-attr]
    try:
        bob = log_in(others, mounted.url, "bob")
        assert bob.eval_on_selector_all("[data-testid=job]", "els => els.length") == 0
        assert not_found(bob, job) == [404, 404, 404]
        bob.click("text=Log out")
        bob.click("[data-testid=guest]")
        bob.wait_for_selector("[data-testid=connection][data-state=live]")
        assert (bob.text_content("[data-testid=user]") or "").startswith("guest:")
        assert bob.eval_on_selector_all("[data-testid=job]", "els => els.length") == 0
        watch_to_completion(bob, analyse(bob, db), tracks=3)
        assert not_found(bob, job) == [404, 404, 404]
    finally:
        others.close()
