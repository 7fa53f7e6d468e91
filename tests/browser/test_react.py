"""jobwire-react's hooks in <StrictMode> in headless Chromium against a real server: shared
subscriptions, a switched id, a reload, a second run, a double click, the owner feed."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Request, Route, sync_playwright

from tests.browser.conftest import ARGS, CHROMIUM, WAIT_MS, HeldPage, subscriptions
from tests.conftest import ROOT, Proc

pytestmark = pytest.mark.browser

HARNESS = ROOT / "tests" / "browser" / "react"
INDEX = b"""<!doctype html><html><head><meta charset="utf-8"><link rel="icon" href="data:,">
<script type="module" src="app.js"></script></head><body><div id="root"></div></body></html>"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Chromium that lets the test page, which Playwright serves (so it has no address),
    open a WebSocket to the server on loopback; a page the server served needs no flag."""
    if not CHROMIUM.exists():
        pytest.skip(f"browser tests need Debian's chromium at {CHROMIUM} (`make chromium`)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM),
                               args=[*ARGS, "--disable-features=LocalNetworkAccessChecks"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test page (tests/browser/react/app.jsx) bundled with React by esbuild."""
    node = shutil.which("node")
    if node is None or not (HARNESS / "node_modules" / "esbuild").is_dir():
        pytest.skip("the React tests need node and `npm ci` in tests/browser/react "
                    "(`make test` runs it)")
    out = tmp_path_factory.mktemp("react")
    subprocess.run([node, str(HARNESS / "build.mjs"), str(out)], check=True, timeout=60)
    (out / "index.html").write_bytes(INDEX)
    return out


class ReactPage:
    """The test page in one tab, served at the jobwire server's origin under /react/ (so
    its session cookie and WebSocket are same-origin), with what it rendered and sent."""

    def __init__(self, page: Page, base_url: str, query: str = "") -> None:
        self.page = page
        self.base_url = base_url
        self.query = query
        self.renders: list[dict[str, Any]] = []
        self.sent: list[dict[str, Any]] = []  # every op sent on any WebSocket
        self.requests: list[tuple[str, str]] = []  # (method, path) of every API request
        page.expose_function("recordRender", lambda render: self.renders.append(render))
        page.on("websocket", lambda ws: ws.on("framesent", lambda f: self.sent.append(
            json.loads(f))))
        page.on("request", self._request)

    def _request(self, request: Request) -> None:
        if request.url.startswith(self.base_url + "/api/"):
            self.requests.append((request.method, request.url[len(self.base_url):]))

    def open(self) -> ReactPage:
        self.page.goto(f"{self.base_url}/react/index.html{self.query}")
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        self.page.wait_for_selector("body[data-ready=true]", state="attached")
        self.page.wait_for_function("window.app !== undefined")

    def submit(self, url: str, *, verdict: str = "started") -> str:
        self.page.fill("[data-testid=url]", url)
        self.page.click("[data-testid=submit]")
        return self.wait_verdict(verdict)

    def wait_verdict(self, verdict: str) -> str:
        self.page.wait_for_selector(f"[data-testid=verdict]:text-is('{verdict}')")
        job = self.page.get_attribute("[data-testid=verdict]", "data-job-id")
        assert job
        return job

    def watch(self, *ids: str) -> None:
        self.page.evaluate("ids => window.app.watch(ids)", list(ids))

    def wait_views(self, name: str, job: str, status: str, count: int = 1) -> None:
        selector = (f'[data-testid=job][data-name^="{name}"][data-job-id="{job}"]'
                    f'[data-status="{status}"]')
        self.page.wait_for_function("([s, n]) => document.querySelectorAll(s).length === n",
                                    arg=[selector, count])

    def ops(self, op: str, job: str) -> int:
        return sum(1 for f in self.sent if f.get("op") == op and f.get("job") == job)

    def wait_ops(self, op: str, job: str, count: int) -> None:
        for _ in range(WAIT_MS // 50):
            if self.ops(op, job) >= count:
                return
            self.page.wait_for_timeout(50)
        raise AssertionError(f"no {op} of {job} sent: {self.sent}")


@pytest.fixture
def react_page(bundle: Path, app: Proc, context: BrowserContext
               ) -> Iterator[Callable[..., ReactPage]]:
    def serve(route: Route) -> None:
        route.fulfill(path=bundle / route.request.url.rsplit("/", 1)[-1].split("?")[0])

    context.route(f"{app.url}/react/*", serve)
    yield lambda query="": ReactPage(context.new_page(), app.url, query).open()


def test_five_components_watching_one_job_make_one_watch_and_one_subscription(
        app: Proc, react_page: Callable[..., ReactPage], held_page: HeldPage) -> None:
    tab = react_page()
    first = tab.submit(held_page.url)
    tab.wait_views("submitted", first, "running")
    tab.submit(held_page.url + "2")  # the submitter follows another job now, not `first`
    tab.wait_ops("unsubscribe", first, 1)
    loads_before = tab.requests.count(("GET", f"/api/jobs/{first}"))
    subscribes_before = tab.ops("subscribe", first)
    unsubscribes_before = tab.ops("unsubscribe", first)

    # Mounted on a live socket, StrictMode runs each one's effects twice: one alone, whose
    # store entry must survive its unsubscribe-subscribe, then four more beside it.
    tab.watch(first)
    tab.wait_views("view", first, "running", 1)
    tab.watch(*[first] * 5)
    tab.wait_views("view", first, "running", 5)
    assert tab.requests.count(("GET", f"/api/jobs/{first}")) == loads_before + 1, \
        "one jw.watch for five components"
    assert tab.ops("subscribe", first) == subscribes_before + 1
    assert tab.ops("unsubscribe", first) == unsubscribes_before
    assert subscriptions(app.url) == 2  # `first` and the submitter's job

    tab.watch()  # all five unmount: the subscription goes with them
    tab.wait_ops("unsubscribe", first, unsubscribes_before + 1)
    assert subscriptions(app.url) == 1
    held_page.release.set()


def test_switching_the_id_drops_the_old_job(app: Proc, react_page: Callable[..., ReactPage],
                                            held_page: HeldPage) -> None:
    tab = react_page()
    old = tab.submit(held_page.url)
    new = tab.submit(held_page.url + "2")  # the submitter now follows `new` alone
    tab.watch(old)
    tab.wait_views("view0", old, "running")

    tab.watch(new)  # the same component instance gets another id
    tab.wait_views("view0", new, "running")
    held_page.release.set()  # both jobs finish: `old` keeps sending events meanwhile
    tab.wait_views("view0", new, "completed")
    tab.wait_views("submitted", new, "completed")

    view = [r for r in tab.renders if r["name"] == "view0"]
    switched = next(i for i, r in enumerate(view) if r["prop"] == new)
    assert all(r["prop"] == new and r["id"] in (None, new) for r in view[switched:]), \
        "never the old job after the switch"
    tab.wait_ops("unsubscribe", old, 1)


def test_reload_recovers_the_active_jobs(app: Proc, react_page: Callable[..., ReactPage],
                                         held_page: HeldPage) -> None:
    tab = react_page()
    job = tab.submit(held_page.url)
    tab.wait_views("submitted", job, "running")

    tab.page.reload()
    tab.wait_ready()
    tab.wait_views("recovered", job, "running")
    held_page.release.set()
    tab.wait_views("recovered", job, "completed")
    recovered = [r for r in tab.renders if r["name"] == "recovered"]
    assert {r["id"] for r in recovered} <= {None, job}
    assert tab.page.get_attribute("[data-testid=recovered]", "data-count") == "1"


def test_second_run_of_a_key_starts_clean(app: Proc, react_page: Callable[..., ReactPage],
                                          held_page: HeldPage) -> None:
    tab = react_page()
    held_page.release.set()
    first = tab.submit(held_page.url)
    tab.wait_views("submitted", first, "completed")
    before = len(tab.renders)

    second = tab.submit(held_page.url)  # same URL, so same key: a new run, the first ended
    tab.wait_views("submitted", second, "completed")
    assert second != first
    after = [r for r in tab.renders[before:] if r["name"] == "submitted"]
    assert after and all(r["id"] in (None, second) for r in after), \
        "nothing of the first run once the second is submitted"
    assert next(r["seq"] for r in after if r["id"]) == 1, "the second run starts at seq 1"


def test_double_click_submits_once_and_a_resubmit_says_already_running(
        app: Proc, react_page: Callable[..., ReactPage], context: BrowserContext,
        held_page: HeldPage) -> None:
    tab = react_page()
    tab.page.fill("[data-testid=url]", held_page.url)
    tab.page.dblclick("[data-testid=submit]")
    tab.page.wait_for_function(
        "() => document.querySelector('[data-testid=verdict]').dataset.jobId")
    assert tab.page.inner_text("[data-testid=verdict]") == "started", "the job the click made"
    job = tab.wait_verdict("started")
    assert tab.requests.count(("POST", "/api/jobs")) == 1

    tab.page.click("[data-testid=submit]")  # the job is still running
    assert tab.wait_verdict("already running") == job
    tab.wait_views("submitted", job, "running")
    assert [j["id"] for j in context.request.get(app.url + "/api/jobs").json()] == [job]
    held_page.release.set()


def test_a_job_started_in_one_tab_appears_in_the_other_via_use_jobs(
        app: Proc, react_page: Callable[..., ReactPage], held_page: HeldPage) -> None:
    feed = react_page("?feed")
    feed.page.wait_for_selector("[data-testid=feed][data-ready=true], "
                                "[data-testid=boundary-error]", state="attached")
    if feed.page.locator("[data-testid=boundary-error]").count():
        pytest.skip(feed.page.inner_text("[data-testid=boundary-error]"))
    job = react_page().submit(held_page.url)
    feed.page.wait_for_selector(f'[data-testid=feed-job][data-job-id="{job}"]')
    held_page.release.set()
    feed.page.wait_for_selector(f'[data-testid=feed-job][data-job-id="{job}"]',
                                state="detached")
