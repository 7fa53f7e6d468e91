"""The dashboard of jobwire mounted at /jobs in a host app: its page, styles and scripts
load under the prefix, its calls and WebSocket go there, and it shows the host's
signed-in user's jobs live."""

from __future__ import annotations

from pathlib import Path

import httpx
from playwright.sync_api import BrowserContext, Response

from jobwire.demo import jobwire as demo
from tests.browser.conftest import Dashboard
from tests.test_embed import HOST_COOKIE, Served, host_app


def test_the_dashboard_under_a_prefix_goes_live(context: BrowserContext, tmp_path: Path) -> None:
    app, _ = host_app(f"sqlite:///{tmp_path / 'jobwire.db'}", demo)
    with Served(app) as served:
        context.add_cookies([{"name": HOST_COOKIE, "value": "alice", "url": served.url}])
        page = context.new_page()
        responses: list[Response] = []
        page.on("response", lambda r: responses.append(r))
        sockets: list[str] = []
        page.on("websocket", lambda ws: sockets.append(ws.url))
        dash = Dashboard(page, served.url + "/jobs").open()
        job = dash.start_tracks(20)
        dash.wait_job(job, "d.status === 'completed'")
        dash.wait_connection("live")

        paths = [r.url.removeprefix(served.url) for r in responses]
        for asset in ("/jobs/static/dashboard.css", "/jobs/static/dashboard.js",
                      "/jobs/static/jobwire.js"):
            assert asset in paths, paths
        assert all(p.startswith("/jobs/") for p in paths), paths
        assert all(r.status < 400 for r in responses), [(r.url, r.status) for r in responses]
        assert sockets and all(u.startswith(served.url.replace("http", "ws") + "/jobs/api/ws")
                               for u in sockets), sockets
        # The dashboard acted as the host's user: no guest session, the job is alice's.
        mine = httpx.get(served.url + "/jobs/api/jobs", cookies={HOST_COOKIE: "alice"}).json()
        assert [j["id"] for j in mine] == [job] and mine[0]["owner"] == "user:alice"
