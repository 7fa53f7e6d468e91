"""The dashboard's rough edges a new user met: raw errors, double submits, a failed step
shown grey, jobs beyond the first page, no timestamps, a 401 on the first visit, no way
to sign in, and a guest session that ended without a word."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import BrowserContext

from tests.browser.conftest import Dashboard, HeldPage
from tests.conftest import Proc, cli

pytestmark = pytest.mark.browser


def user_token(tmp_path: Path, name: str) -> str:
    out = cli("users", "add", name, "--db", f"sqlite:///{tmp_path / 'jobwire.db'}")
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_errors_read_as_words_and_a_lost_server_stops_being_reported_once_back(
        app: Proc, context: BrowserContext) -> None:
    dash = Dashboard(context.new_page(), app.url).open()
    error = dash.page.get_by_test_id("form-error")
    dash.page.fill("[data-testid=post-url]", "ftp://example.com/post")  # a valid type=url
    dash.page.click("[data-testid=start-post]")
    error.wait_for()
    assert error.inner_text() == "url: must be an http:// or https:// address"

    app.stop()
    dash.page.click("[data-testid=start-tracks]")
    dash.page.wait_for_function(
        "() => document.querySelector('[data-testid=form-error]').textContent"
        ".startsWith('cannot reach the server')")
    app.start()
    dash.wait_connection("live")
    error.wait_for(state="hidden")  # gone without another click


def test_double_click_is_one_job_and_a_repeat_says_already_running(
        app: Proc, context: BrowserContext, held_page: HeldPage) -> None:
    dash = Dashboard(context.new_page(), app.url).open()
    dash.page.fill("[data-testid=tracks-count]", "2")
    dash.page.dblclick("[data-testid=start-tracks]")
    dash.page.wait_for_selector("[data-testid=job]")
    dash.page.wait_for_function(
        "() => !document.querySelector('[data-testid=start-tracks]').disabled")
    assert len(context.request.get(app.url + "/api/jobs").json()) == 1
    assert dash.page.get_by_test_id("when").inner_text().startswith("created ")

    job = dash.start_post(held_page.url)
    note = dash.page.get_by_test_id("form-note")
    assert note.is_hidden()
    dash.page.click("[data-testid=start-post]")  # the same URL while it runs: one job
    note.wait_for()
    assert note.inner_text() == f"already running: job {job[:8]}"
    held_page.release.set()
    dash.wait_job(job, "d.status === 'completed'")
    assert "finished " in dash.card(job).get_by_test_id("when").inner_text()


def test_a_failed_extract_shows_the_step_that_failed_and_why(
        app: Proc, context: BrowserContext) -> None:
    dash = Dashboard(context.new_page(), app.url).open()
    job = dash.start_post("http://xn--/")  # the URL parser itself raises on this host
    dash.wait_job(job, "d.status === 'failed'")
    card = dash.card(job)
    chips = card.locator("[data-testid=items] li")
    assert chips.evaluate_all("els => els.map(e => [e.textContent, e.dataset.state])") == [
        ["fetch", "failed"], ["extract", "pending"]]
    assert "Punycode" in (chips.first.get_attribute("title") or "")
    assert "1 failed" in card.get_by_test_id("counts").inner_text()
    assert card.get_by_test_id("error").get_attribute("data-kind") == ""  # red: failed


def test_older_jobs_beyond_the_first_page_show_on_request(
        app: Proc, context: BrowserContext) -> None:
    dash = Dashboard(context.new_page(), app.url).open()
    for i in range(32):
        r = context.request.post(app.url + "/api/jobs",
                                 data={"task": "analyze_tracks", "input": {"tracks": [f"t{i}"]}})
        assert r.status == 201, r.text()
    # (The feed may announce the last jobs after 30 cards are already done.)
    dash.page.wait_for_function(
        "() => document.querySelectorAll('[data-testid=job][data-status=completed]').length"
        " === 30 && document.querySelector('[data-testid=older]').innerText"
        " === 'Older jobs (2)'")
    older = dash.page.get_by_test_id("older")
    assert older.is_visible()
    older.click()
    dash.page.wait_for_function(
        "() => document.querySelectorAll('[data-testid=job]').length === 32")
    assert older.is_hidden()


def test_first_visit_fails_no_request_and_signing_in_keeps_the_guest_jobs(
        app: Proc, context: BrowserContext, tmp_path: Path) -> None:
    page = context.new_page()
    failed: list[str] = []
    page.on("response", lambda r: r.status >= 400 and failed.append(f"{r.status} {r.url}"))
    page.on("console", lambda m: m.type == "error" and failed.append(m.text))
    dash = Dashboard(page, app.url).open()
    assert dash.page.get_by_test_id("who").inner_text() == "guest"
    job = dash.start_tracks(2)
    dash.wait_job(job, "d.status === 'completed'")
    assert failed == []

    form = page.get_by_test_id("signin-form")
    page.fill("[data-testid=signin-token]", "not-a-token")
    page.click("[data-testid=signin]")
    page.get_by_test_id("form-error").wait_for()
    assert page.get_by_test_id("form-error").inner_text() == "invalid or expired token"

    page.fill("[data-testid=signin-token]", user_token(tmp_path, "alice"))
    with page.expect_navigation():
        page.click("[data-testid=signin]")
    dash.wait_ready()
    assert page.get_by_test_id("who").inner_text() == "signed in as alice"
    assert form.is_hidden()
    assert dash.job_ids() == [job]  # the guest's job moved along
    assert [j["owner"] for j in context.request.get(app.url + "/api/jobs").json()] == [
        "user:alice"]


def test_a_claimed_guest_session_says_so_on_the_next_visit(
        app: Proc, context: BrowserContext, tmp_path: Path) -> None:
    dash = Dashboard(context.new_page(), app.url).open()
    notice = dash.page.get_by_test_id("session-notice")
    assert notice.is_hidden()
    (cookie,) = [c for c in context.cookies() if c["name"] == "jobwire_token"]
    r = httpx.post(app.url + "/api/sessions/claim", json={"token": cookie["value"]},
                   headers={"Authorization": f"Bearer {user_token(tmp_path, 'bob')}"})
    assert r.status_code == 200, r.text
    dash.page.reload()
    dash.wait_ready()
    notice.wait_for()
    assert "a user signed in with it, or it expired" in notice.inner_text()
    assert "bob" not in notice.inner_text()
    assert dash.page.get_by_test_id("who").inner_text() == "guest"
    dash.page.reload()  # the new guest session is valid: nothing more to say
    dash.wait_ready()
    assert notice.is_hidden()


def test_sign_in_refuses_other_sites_guest_tokens_and_tokens_it_does_not_know(
        app: Proc, tmp_path: Path) -> None:
    alice = user_token(tmp_path, "alice")
    guest = httpx.post(app.url + "/api/sessions")
    cookie = {"jobwire_token": guest.json()["token"]}
    signin = app.url + "/api/sessions/signin"

    def post(token: str, **headers: Any) -> httpx.Response:
        return httpx.post(signin, json={"token": token}, cookies=cookie, headers=headers)

    # Another site cannot sign a visitor's browser in as its own user (login CSRF).
    assert post(alice, Origin="https://evil.example").status_code == 403
    assert post(alice, **{"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert post(guest.json()["token"]).status_code == 403  # a guest's token is no user's
    assert post("x" * 43).status_code == 401
    assert post("x" * 501).status_code == 422
    # The refusals changed nothing: the guest session is still there.
    assert httpx.get(app.url + "/api/jobs", cookies=cookie).status_code == 200
    ok = post(alice, Origin=app.url)
    assert ok.status_code == 200 and ok.json() == {"owner": "user:alice", "moved": 0}
    assert ok.cookies["jobwire_token"] == alice
    assert httpx.get(app.url + "/api/jobs", cookies=cookie).status_code == 401  # claimed




def test_a_worker_stopped_cleanly_shows_its_job_requeued_not_failed(
        procs: Any, context: BrowserContext, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'jobwire.db'}"
    demo = ("--app", "jobwire.demo:jobwire", "--db", db)
    api: Proc = procs("serve", *demo, "--no-workers")
    worker: Proc = procs("worker", *demo, "--lease", "60")
    dash = Dashboard(context.new_page(), api.url).open()
    job = dash.start_tracks(3000)
    dash.wait_job(job, "d.status === 'running' && d.done > 0")
    worker.stop()  # SIGTERM: a deploy
    dash.wait_job(job, "d.status === 'queued'")
    error = dash.card(job).get_by_test_id("error")
    assert error.inner_text() == "worker stopped; requeued"
    assert error.get_attribute("data-kind") == "requeued"
    assert error.evaluate("e => getComputedStyle(e).color") != "rgb(209, 67, 67)"  # no red
    assert "attempt 0" in dash.card(job).get_by_test_id("counts").inner_text()
    procs("worker", *demo, "--lease", "60")
    dash.wait_job(job, "d.status === 'running'")
    assert "attempt 1" in dash.card(job).get_by_test_id("counts").inner_text()
