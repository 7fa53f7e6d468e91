"""Fixtures for the dashboard tests: Debian's headless Chromium, a demo server on SQLite,
and a page helper that records every value the dashboard renders."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from tests.conftest import ROOT, Proc
from tests.pageserver import PageServer

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]
ARTIFACTS = ROOT / "test-artifacts"
WAIT_MS = 60_000  # an upper bound for jobs to move on a busy machine, not a timing assertion

# Every render of a job card or of the connection indicator, reported to Python
# (an exposed function survives reloads, so one list spans them).
RECORDER = """
new MutationObserver((records) => {
  const seen = new Set(records.map((r) => r.target));
  for (const el of seen) {
    if (el.dataset.testid === "connection") window.recordRender({ connection: el.dataset.state });
    else if (el.dataset.testid === "job" && el.dataset.seq)
      window.recordRender({ id: el.dataset.jobId, status: el.dataset.status,
        seq: +el.dataset.seq, done: +el.dataset.done, failed: +el.dataset.failed,
        total: +el.dataset.total });
  }
}).observe(document, { subtree: true, attributes: true,
  attributeFilter: ["data-state", "data-seq", "data-status", "data-done", "data-total"] });
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"browser tests need Debian's chromium at {CHROMIUM} (`make chromium`)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    """One browser profile: its tabs share the session cookie."""
    ctx = browser.new_context(viewport={"width": 1100, "height": 800})
    ctx.set_default_timeout(WAIT_MS)
    yield ctx
    ctx.close()


@pytest.fixture
def app(procs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Proc:
    """A server with in-process workers running the demo tasks, on a fresh SQLite file."""
    monkeypatch.setenv("JOBWIRE_FETCH_ALLOW_PRIVATE", "1")  # held_page is on loopback
    proc: Proc = procs("serve", "--db", f"sqlite:///{tmp_path / 'jobwire.db'}",
                       "--app", "jobwire.demo:jobwire", "--lease", "2")
    return proc


class Dashboard:
    """The dashboard in one tab, with every rendered job state and connection state."""

    def __init__(self, page: Page, base_url: str) -> None:
        self.page = page
        self.base_url = base_url
        self.renders: list[dict[str, Any]] = []
        page.expose_function("recordRender", self._record)
        page.add_init_script(RECORDER)

    def _record(self, render: dict[str, Any]) -> None:
        self.renders.append(render)

    def open(self) -> Dashboard:
        self.page.goto(self.base_url + "/")
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        self.page.wait_for_selector("body[data-ready=true]", state="attached")

    def card(self, job_id: str) -> Any:
        return self.page.locator(f'[data-testid=job][data-job-id="{job_id}"]')

    def job_ids(self) -> list[str]:
        ids: list[str] = self.page.eval_on_selector_all(
            "[data-testid=job]", "els => els.map(e => e.dataset.jobId)")
        return ids

    def _submit(self, button: str) -> str:
        before = set(self.job_ids())
        self.page.click(f"[data-testid={button}]")
        self.page.wait_for_function(
            "n => document.querySelectorAll('[data-testid=job]').length > n", arg=len(before))
        (new,) = set(self.job_ids()) - before
        return new

    def start_tracks(self, n: int) -> str:
        self.page.fill("[data-testid=tracks-count]", str(n))
        return self._submit("start-tracks")

    def start_post(self, url: str) -> str:
        self.page.fill("[data-testid=post-url]", url)
        return self._submit("start-post")

    def wait_job(self, job_id: str, condition: str) -> None:
        """Wait until `condition` (JS over the card's dataset `d`) holds."""
        self.page.wait_for_function(
            f"""id => {{
              const el = document.querySelector(`[data-testid=job][data-job-id="${{id}}"]`);
              const d = el && el.dataset.seq ? {{...el.dataset, seq: +el.dataset.seq,
                done: +el.dataset.done, failed: +el.dataset.failed, total: +el.dataset.total}}
                : null;
              return d !== null && ({condition});
            }}""", arg=job_id)

    def wait_connection(self, *states: str) -> None:
        self.page.wait_for_function(
            "states => states.includes(document.querySelector('[data-testid=connection]')"
            ".dataset.state)", arg=list(states))

    def job_renders(self, job_id: str) -> list[dict[str, Any]]:
        return [r for r in self.renders if r.get("id") == job_id]

    def connection_renders(self) -> list[str]:
        return [r["connection"] for r in self.renders if "connection" in r]


def subscriptions(base_url: str) -> int:
    """Live subscriptions the server holds, from its Prometheus metrics."""
    text = httpx.get(base_url + "/metrics").text
    found = re.search(r"^jobwire_subscriptions (\S+)$", text, re.M)
    assert found, text
    return int(float(found.group(1)))


class HeldPage:
    """A web page on localhost whose response is held until released, so an
    extract_post job of its URL stays running as long as a test needs."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.server = PageServer(self._answer)
        self.url = f"{self.server.base}/post"

    def _answer(self) -> tuple[bytes, str]:
        self.release.wait(WAIT_MS / 1000)
        return (b"<html><head><title>Held</title></head><body><p>Released.</p></body></html>",
                "text/html")

    def close(self) -> None:
        self.release.set()
        self.server.close()


@pytest.fixture
def held_page() -> Iterator[HeldPage]:
    page = HeldPage()
    yield page
    page.close()
