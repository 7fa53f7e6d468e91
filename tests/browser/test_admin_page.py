"""The operator view at /admin in headless Chromium, against a real `jobwire serve` with a
service key: jobs of two guests, filters, older pages, a live cancel and a retry, all
under the server's CSP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import BrowserContext, Page

from tests.browser.test_csp import VIOLATIONS
from tests.conftest import Proc

pytestmark = pytest.mark.browser

SERVICE_KEY = "svc-" + "k" * 40


@pytest.fixture
def ops(procs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Proc:
    monkeypatch.setenv("JOBWIRE_SERVICE_KEY", SERVICE_KEY)  # the server inherits it
    proc: Proc = procs("serve", "--db", f"sqlite:///{tmp_path / 'jobwire.db'}")
    return proc


def guest(base_url: str) -> tuple[httpx.Client, str]:
    http = httpx.Client(base_url=base_url, timeout=30)
    data = http.post("/api/sessions").json()
    http.headers["Authorization"] = f"Bearer {data['token']}"
    http.cookies.clear()
    return http, data["owner"]


def submit(http: httpx.Client, task: str, input: Any) -> str:
    r = http.post("/api/jobs", json={"task": task, "input": input})
    assert r.status_code == 201, r.text
    job_id: str = r.json()["job"]["id"]
    return job_id


def wait_status(http: httpx.Client, job_id: str, *statuses: str) -> None:
    for _ in range(600):  # bounded: 60 s
        if http.get(f"/api/jobs/{job_id}").json()["status"] in statuses:
            return
        http.get(f"/api/jobs/{job_id}/events", params={"after": 0, "wait": 0.1})
    raise AssertionError(f"{job_id} never reached {statuses}")


def rows(page: Page) -> list[dict[str, str]]:
    found: list[dict[str, str]] = page.eval_on_selector_all(
        "[data-testid=row]", "els => els.map(e => ({...e.dataset}))")
    return found


def wait_rows(page: Page, n: int) -> None:
    page.wait_for_function(
        "n => document.querySelectorAll('[data-testid=row]').length === n", arg=n)


def row(page: Page, job_id: str) -> Any:
    return page.locator(f'[data-testid=row][data-job-id="{job_id}"]')


def test_the_operator_sees_pages_filters_and_acts_on_jobs_of_every_owner(
        ops: Proc, context: BrowserContext) -> None:
    (a, owner_a), (b, owner_b) = guest(ops.url), guest(ops.url)
    done_a = [submit(a, "echo", k) for k in range(5)]
    done_b = [submit(b, "echo", k) for k in range(3)]
    failed = submit(a, "boom", 1)
    running = submit(b, "block", {"cooperative": True})
    for job_id in [*done_a, failed]:
        wait_status(a, job_id, "completed", "failed")
    for job_id in done_b:
        wait_status(b, job_id, "completed")
    wait_status(b, running, "running")
    every = set(done_a + done_b + [failed, running])

    page = context.new_page()
    violations: list[str] = []
    problems: list[str] = []
    page.expose_function("recordViolation", lambda v: violations.append(v))
    page.add_init_script(VIOLATIONS)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("dialog", lambda d: d.accept())
    page.goto(ops.url + "/admin")
    page.wait_for_selector("body[data-ready=true]", state="attached")

    # A wrong key reads as such, and asks again.
    page.fill("[data-testid=key]", "x" * 40)
    page.click("[data-testid=use-key]")
    page.wait_for_selector("[data-testid=error]:has-text('service key was refused')")
    assert page.is_visible("[data-testid=key-form]")
    page.fill("[data-testid=key]", SERVICE_KEY)
    page.click("[data-testid=use-key]")
    wait_rows(page, len(every))
    assert {r["jobId"] for r in rows(page)} == every
    assert {r["owner"] for r in rows(page)} == {owner_a, owner_b}
    assert SERVICE_KEY not in page.url
    assert page.evaluate("sessionStorage.getItem('jobwire.serviceKey')") == SERVICE_KEY
    counts = dict(page.eval_on_selector_all(
        "[data-testid=counts] li", "els => els.map(e => [e.dataset.status, +e.dataset.count])"))
    assert counts == {"queued": 0, "running": 1, "completed": 8, "failed": 1, "cancelled": 0}

    # Filters: one owner, then one status.
    page.fill("[data-testid=filter-owner]", owner_a)
    page.click("[data-testid=apply]")
    wait_rows(page, 6)
    assert {r["owner"] for r in rows(page)} == {owner_a}
    page.select_option("[data-testid=filter-status]", "failed")
    page.click("[data-testid=apply]")
    wait_rows(page, 1)
    assert [r["jobId"] for r in rows(page)] == [failed]

    # Pages of 4, older and older, every job once.
    page.fill("[data-testid=filter-owner]", "")
    page.select_option("[data-testid=filter-status]", "")
    page.fill("[data-testid=page-size]", "4")
    page.click("[data-testid=apply]")
    wait_rows(page, 4)
    for shown in (8, 10):
        page.click("[data-testid=older]")
        wait_rows(page, shown)
    assert page.is_hidden("[data-testid=older]")
    ids = [r["jobId"] for r in rows(page)]
    assert len(ids) == len(set(ids)) == len(every) and set(ids) == every

    # Cancel the running job: it shows cancelled without a reload.
    row(page, running).locator("[data-testid=cancel]").click()
    page.wait_for_selector(f'[data-testid=row][data-job-id="{running}"][data-status=cancelled]')
    assert b.get(f"/api/jobs/{running}").json()["status"] == "cancelled"

    # A job an owner submits meanwhile shows up by itself, and the counts with it.
    late = submit(a, "block", {"cooperative": True})
    page.wait_for_selector(f'[data-testid=row][data-job-id="{late}"]')
    page.wait_for_selector("[data-testid=counts] li[data-status=running][data-count='1']")

    # Retry the failed one: a new job of the same owner, named on the old row.
    row(page, failed).locator("[data-testid=retry]").click()
    note = row(page, failed).locator("[data-testid=note]")
    note.filter(has_text="retried as").wait_for()
    new = [j["id"] for j in a.get("/api/jobs").json() if j["id"] not in every | {late}]
    assert len(new) == 1 and note.inner_text() == f"retried as {new[0][:8]}"
    page.wait_for_selector(f'[data-testid=row][data-job-id="{new[0]}"][data-owner="{owner_a}"]')

    assert violations == [] and problems == []
