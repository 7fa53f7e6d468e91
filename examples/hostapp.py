"""The pretend host app both examples share (none of it is jobwire): two users with a
password and a few liked tracks, cookie login on the app's own origin, an optional guest,
and the page that analyses the tracks (`page.js`, which talks to jobwire).

Sessions live in a dict, so they end with the process: an example, not a user store."""

from __future__ import annotations

import argparse
import html
import secrets
import urllib.parse
from pathlib import Path

import uvicorn
from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.requests import HTTPConnection

COOKIE = "app_session"
USERS = {  # name -> (password, liked tracks)
    "alice": ("alice-pw", ["alice-01", "alice-02", "alice-03", "alice-04"]),
    "bob": ("bob-pw", ["bob-01", "bob-02", "bob-03"]),
}
GUEST_TRACKS = ["guest-01", "guest-02", "guest-03"]
_sessions: dict[str, str] = {}  # session id -> owner, "user:<name>" or "guest:<id>"
PAGE_JS = Path(__file__).with_name("page.js")


def owner_of(conn: HTTPConnection) -> str | None:
    """The signed-in owner of this request (HTTP or WebSocket), from the app's cookie."""
    return _sessions.get(conn.cookies.get(COOKIE, ""))


def signed_in(conn: HTTPConnection) -> str:
    owner = owner_of(conn)
    if owner is None:
        raise HTTPException(401, "log in first")
    return owner


def liked_tracks(owner: str) -> list[str]:
    kind, _, name = owner.partition(":")
    return USERS[name][1] if kind == "user" else GUEST_TRACKS


def _login_page(guests: bool, error: str = "") -> str:
    guest = ('<form method="post" action="/guest"><button data-testid="guest">'
             "Continue as a guest</button></form>") if guests else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Log in</title></head>
<body><h1>Log in</h1><p data-testid="error">{html.escape(error)}</p>
<form method="post" action="/login"><input name="user" placeholder="alice or bob">
<input name="password" type="password" placeholder="alice-pw"><button>Log in</button></form>
{guest}</body></html>"""


def _app_page(owner: str, config: dict[str, str]) -> str:
    meta = "".join(f'<meta name="{n}" content="{html.escape(v)}">' for n, v in config.items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Liked tracks</title>
{meta}<script type="module" src="/page.js"></script></head>
<body><p>Signed in as <b data-testid="user">{html.escape(owner)}</b></p>
<form method="post" action="/logout"><button>Log out</button></form>
<button data-testid="analyse" disabled>Analyse my liked tracks</button>
<span data-testid="connection"></span> <span data-testid="error"></span>
<ol data-testid="jobs"></ol></body></html>"""


def _start(owner: str) -> RedirectResponse:
    session = secrets.token_urlsafe(32)
    _sessions[session] = owner
    response = RedirectResponse("/", 303)
    response.set_cookie(COOKIE, session, httponly=True, samesite="lax")
    return response


def router(page: dict[str, str], guests: bool = False, csp: str = "") -> APIRouter:
    """Login, logout, /healthz and the page, configured by `page` (page.js says how)."""
    r = APIRouter()
    headers = {"Content-Security-Policy": csp} if csp else None

    @r.get("/", response_class=HTMLResponse)
    def index(request: Request) -> HTMLResponse:
        owner = owner_of(request)
        if owner is None:
            return HTMLResponse(_login_page(guests))
        return HTMLResponse(_app_page(owner, page), headers=headers)

    @r.get("/page.js", response_class=FileResponse)
    def page_js() -> FileResponse:
        return FileResponse(PAGE_JS, media_type="text/javascript")

    @r.post("/login")
    async def login(request: Request) -> Response:
        form = urllib.parse.parse_qs((await request.body()).decode())
        name, password = form.get("user", [""])[0], form.get("password", [""])[0]
        known = USERS.get(name)
        if known is None or not secrets.compare_digest(known[0], password):
            return HTMLResponse(_login_page(guests, "wrong user or password"), 401)
        return _start(f"user:{name}")

    if guests:
        @r.post("/guest")
        def guest() -> RedirectResponse:
            return _start(f"guest:{secrets.token_hex(8)}")

    @r.post("/logout")
    def logout(request: Request) -> RedirectResponse:
        _sessions.pop(request.cookies.get(COOKIE, ""), None)
        response = RedirectResponse("/", 303)
        response.delete_cookie(COOKIE)
        return response

    @r.get("/healthz")
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    return r


def run(app: FastAPI, default_port: int) -> None:
    """Serve `app` on --host/--port (loopback by default)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=default_port)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
