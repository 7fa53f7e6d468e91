"""The dashboard under its Content-Security-Policy in headless Chromium: it works with no
violation reported, and a page of another origin cannot frame it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import BrowserContext, ConsoleMessage

from tests.browser.conftest import Dashboard
from tests.conftest import Proc
from tests.pageserver import PageServer

pytestmark = pytest.mark.browser

# Reports every violation the page sees (an exposed function survives reloads).
VIOLATIONS = """
document.addEventListener("securitypolicyviolation", (e) =>
  window.recordViolation(`${e.violatedDirective} blocked ${e.blockedURI}`));
"""


def test_the_dashboard_works_under_its_csp_with_no_violation(app: Proc,
                                                             context: BrowserContext) -> None:
    page = context.new_page()
    violations: list[str] = []
    console: list[str] = []
    page.expose_function("recordViolation", lambda v: violations.append(v))
    page.add_init_script(VIOLATIONS)
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))

    dash = Dashboard(page, app.url).open()
    assert "frame-ancestors 'none'" in (page.evaluate(
        "fetch('/').then((r) => r.headers.get('content-security-policy'))") or "")
    job = dash.start_tracks(5)
    dash.wait_connection("live")  # the WebSocket got through connect-src
    dash.wait_job(job, "d.status === 'completed' && d.done === 5")
    # The bar is sized by script (CSSOM): allowed, and it shows.
    fill = dash.card(job).locator(".bar .done").bounding_box()
    assert fill is not None and fill["width"] > 0
    page.goto(app.url + "/demo/posts/2")
    assert page.locator("h1").inner_text().startswith("Resuming a WebSocket")

    assert violations == []
    # (The page's first 401, before it has a session, is a console error of its own.)
    assert [m for m in console if "Content Security Policy" in m or "pageerror" in m] == []


@pytest.fixture
def framing_page(app: Proc) -> Iterator[str]:
    """A page on another loopback port (another origin) that frames the dashboard."""
    body = f'<!doctype html><iframe id="f" src="{app.url}/"></iframe>'.encode()
    server = PageServer(lambda: (body, "text/html"))
    yield f"{server.base}/"
    server.close()


def test_another_origin_cannot_frame_the_dashboard(app: Proc, context: BrowserContext,
                                                   framing_page: str) -> None:
    page = context.new_page()
    refusals: list[str] = []

    def on_console(m: ConsoleMessage) -> None:
        if "frame-ancestors" in m.text:
            refusals.append(m.text)

    page.on("console", on_console)
    page.goto(framing_page)
    page.wait_for_load_state("load")
    frame = page.frame_locator("#f")
    page.wait_for_function("() => document.getElementById('f').contentWindow !== null")
    # Chromium shows its error page in the frame instead: none of the dashboard is there.
    (child,) = page.main_frame.child_frames
    child.wait_for_load_state("load")
    assert child.evaluate("document.querySelector('[data-testid=connection]')") is None
    assert frame.locator("[data-testid=start-tracks]").count() == 0
    page.wait_for_timeout(200)  # the console message may trail the frame's load
    assert refusals, "Chromium reported no frame-ancestors refusal"
