"""The dashboard in headless Chromium: live progress across reloads, second runs, two tabs,
shared subscriptions, a lost WebSocket, a killed server, cancel and delete, and a screenshot."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from playwright.sync_api import BrowserContext, WebSocketRoute

from tests.browser.conftest import ARTIFACTS, Dashboard, HeldPage, subscriptions
from tests.conftest import Proc

pytestmark = pytest.mark.browser


# A component of the page's own: records each snapshot's seq and done count, and whether
# it is frozen with counts that agree with its items.
WATCH_AND_CHECK = """id => {
  window.seen = [];
  window.jobwire.watch(id, (s) => {
    const count = (state) => s.items.filter((i) => i.status === state).length;
    const agree = s.items.length === s.progress.total && count("done") === s.progress.done
      && count("failed") === s.progress.failed;
    window.seen.push([s.seq, s.progress.done,
                      agree && Object.isFrozen(s) && s.items.every(Object.isFrozen)]);
  });
}"""


def states(renders: list[dict[str, Any]]) -> list[tuple[int, int, int]]:
    return [(r["seq"], r["done"], r["total"]) for r in renders]


def assert_moves_forward(renders: list[dict[str, Any]]) -> None:
    """Seq and counts never go back, and counts never exceed the total."""
    for a, b in itertools.pairwise(renders):
        assert b["seq"] >= a["seq"] and b["done"] >= a["done"], (a, b)
    assert all(r["done"] + r["failed"] <= r["total"] for r in renders)


def test_reload_mid_job_shows_the_job_once_and_it_completes(app: Proc,
                                                            context: BrowserContext) -> None:
    dash = Dashboard(context.new_page(), app.url).open()
    job = dash.start_tracks(400)
    dash.wait_job(job, "d.status === 'running' && d.done >= 10")

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard-mid-job.png"
    dash.page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    fill = dash.card(job).locator(".bar .done").bounding_box()
    bar = dash.card(job).get_by_test_id("progress").bounding_box()
    assert bar is not None and fill is not None and bar["width"] > 0 and fill["width"] > 0

    before = dash.job_renders(job)[-1]
    dash.page.reload()
    dash.wait_ready()
    after_reload = len(dash.renders)
    dash.wait_job(job, "d.status === 'completed'")

    assert dash.job_ids() == [job]
    renders = dash.job_renders(job)
    assert_moves_forward(renders)
    resumed = [r for r in dash.renders[after_reload:] if r.get("id") == job]
    assert resumed[0]["done"] >= before["done"], "after the reload progress went on, not back"
    assert any(r["status"] == "running" for r in resumed), "the reload was mid-job"
    assert renders[-1]["done"] == renders[-1]["total"] == 400


def test_second_job_starts_from_zero_and_never_shows_the_first(app: Proc,
                                                               context: BrowserContext) -> None:
    dash = Dashboard(context.new_page(), app.url).open()
    first = dash.start_tracks(6)
    dash.wait_job(first, "d.status === 'completed'")
    first_final = states(dash.job_renders(first))[-1]

    second = dash.start_tracks(4)
    dash.wait_job(second, "d.status === 'completed'")

    assert second != first
    mine = dash.job_renders(second)
    assert (mine[0]["seq"], mine[0]["done"], mine[0]["total"]) == (1, 0, 0)
    assert [r["seq"] for r in mine] == sorted({r["seq"] for r in mine}), "strictly increasing"
    assert {r["total"] for r in mine} <= {0, 4}
    assert first_final not in states(mine)
    assert mine[-1]["done"] == mine[-1]["total"] == 4
    # The first card kept its own final numbers while the second ran.
    assert states(dash.job_renders(first))[-1] == first_final
    assert dash.card(first).get_attribute("data-seq") == str(first_final[0])


def test_same_url_from_two_tabs_is_one_job_shown_in_both(app: Proc, context: BrowserContext,
                                                         held_page: HeldPage) -> None:
    tabs = [Dashboard(context.new_page(), app.url).open() for _ in range(2)]
    for tab in tabs:
        tab.page.fill("[data-testid=post-url]", held_page.url)
    for tab in tabs:  # the job is held running, so both submits meet it active
        tab.page.click("[data-testid=start-post]")
    for tab in tabs:
        tab.page.wait_for_selector("[data-testid=job]")
    ids = [tab.job_ids() for tab in tabs]
    assert ids[0] == ids[1] and len(ids[0]) == 1
    jobs = context.request.get(app.url + "/api/jobs").json()
    assert [j["id"] for j in jobs] == ids[0]

    held_page.release.set()
    for tab in tabs:
        tab.wait_job(ids[0][0], "d.status === 'completed'")
        assert tab.card(ids[0][0]).get_by_test_id("result").inner_text().startswith("Result")


def test_five_components_watching_one_job_hold_one_subscription(
        app: Proc, context: BrowserContext, held_page: HeldPage) -> None:
    page = context.new_page()
    sent: list[dict[str, Any]] = []  # every op the page sends on any WebSocket
    page.on("websocket", lambda ws: ws.on("framesent", lambda frame: sent.append(
        json.loads(frame))))
    dash = Dashboard(page, app.url).open()
    job = dash.start_post(held_page.url)
    dash.wait_job(job, "d.status === 'running'")
    dash.wait_connection("live")
    dash.page.evaluate("""id => new Promise((resolve) => {
      window.seen = Array(5).fill(0);
      window.stops = [0, 1, 2, 3, 4].map((i) => window.jobwire.watch(id, (s) => {
        window.seen[i] += 1;
        if (window.seen.every((n) => n > 0)) resolve();
      }));
    })""", job)
    assert subscriptions(app.url) == 1  # five components and the dashboard's own card

    dash.page.evaluate("window.stops.forEach((stop) => stop())")
    assert subscriptions(app.url) == 1  # the card still watches
    page.wait_for_timeout(300)  # frames the page sent reach Python's handler
    # The server counts subscriptions per socket, so a repeated subscribe would not move
    # its counter: the page itself must send one subscribe and no unsubscribe.
    assert [m["op"] for m in sent if m.get("job") == job] == ["subscribe"], sent
    held_page.release.set()
    dash.wait_job(job, "d.status === 'completed'")
    assert subscriptions(app.url) == 0  # the terminal event ended it


def test_lost_websocket_falls_back_to_polling_and_progress_has_no_gap(
        app: Proc, context: BrowserContext) -> None:
    page = context.new_page()
    sockets: list[WebSocketRoute] = []
    blocked = False

    def route(ws: WebSocketRoute) -> None:
        if blocked:
            ws.close(code=1011, reason="blocked by the test")
        else:
            ws.connect_to_server()
            sockets.append(ws)

    page.route_web_socket("**/api/ws", route)
    dash = Dashboard(page, app.url).open()
    job = dash.start_tracks(400)
    page.evaluate(WATCH_AND_CHECK, job)
    dash.wait_job(job, "d.done >= 10")

    blocked = True
    for ws in sockets:
        ws.close(code=1012, reason="server went away")
    dash.wait_connection("polling")
    polled_from = dash.job_renders(job)[-1]["done"]
    dash.wait_job(job, f"d.done > {polled_from} + 10")  # progress arrives by long-poll

    blocked = False
    dash.wait_job(job, "d.status === 'completed'")
    dash.wait_connection("live")

    seen: list[list[int]] = page.evaluate("window.seen")
    seqs = [s for s, _, _ in seen]
    assert seqs == list(range(seqs[0], seqs[-1] + 1)), "every event once, in order"
    assert [d for _, d, _ in seen] == sorted(d for _, d, _ in seen)
    assert [s for s in seen if not s[2]] == [], "every snapshot frozen, counts agreeing with items"
    states = dash.connection_renders()  # fell back to polling, and came back live
    assert "polling" in states and states[-1] == "live", states
    assert_moves_forward(dash.job_renders(job))
    final = dash.job_renders(job)[-1]
    assert final["done"] == final["total"] == 400


def test_server_killed_mid_job_the_page_reconnects_and_resumes(
        app: Proc, context: BrowserContext) -> None:
    dash = Dashboard(context.new_page(), app.url).open()
    job = dash.start_tracks(400)
    dash.page.evaluate(WATCH_AND_CHECK, job)
    dash.wait_job(job, "d.done >= 10")

    app.kill()  # SIGKILL: sockets drop, the job's worker dies with it
    dash.wait_connection("reconnecting", "polling")
    app.start()  # same port and database; the job is retried once its lease expires
    dash.wait_job(job, "d.status === 'completed'")
    dash.wait_connection("live")

    seen: list[list[int]] = dash.page.evaluate("window.seen")
    seqs = [s for s, _, _ in seen]
    assert seqs == list(range(seqs[0], seqs[-1] + 1)), "resumed after the last seq seen"
    assert [s for s in seen if not s[2]] == []
    final = dash.job_renders(job)[-1]
    assert final["done"] == final["total"] == 400
    assert dash.card(job).get_by_test_id("counts").inner_text().count("attempt 2") == 1
    assert_moves_forward(dash.job_renders(job))


def test_cancel_and_delete_from_the_ui(app: Proc, context: BrowserContext) -> None:
    dash = Dashboard(context.new_page(), app.url).open()
    job = dash.start_tracks(3000)
    dash.wait_job(job, "d.status === 'running' && d.done > 0")
    card = dash.card(job)
    assert card.get_by_test_id("delete").is_disabled()  # not while it runs

    card.get_by_test_id("cancel").click()
    dash.wait_job(job, "d.status === 'cancelled'")
    assert int(card.get_attribute("data-done") or 0) < 3000
    assert card.get_by_test_id("cancel").is_disabled()

    card.get_by_test_id("delete").click()
    card.wait_for(state="detached")
    assert context.request.get(f"{app.url}/api/jobs/{job}").status == 404
    dash.page.reload()
    dash.wait_ready()
    assert dash.job_ids() == []


def test_two_tabs_agree_live_on_the_list_of_jobs(app: Proc, context: BrowserContext) -> None:
    """A job started in tab A appears in tab B; ended, it moves on in B; deleted in A, it
    leaves B (whose Delete would otherwise answer a 404)."""
    a, b = (Dashboard(context.new_page(), app.url).open() for _ in range(2))
    job = a.start_tracks(3)
    b.card(job).wait_for()
    b.wait_job(job, "d.status === 'completed'")
    a.wait_job(job, "d.status === 'completed'")
    a.card(job).get_by_test_id("delete").click()
    for tab in (b, a):
        tab.card(job).wait_for(state="detached")
        assert tab.job_ids() == []
