"""A host app beside jobwire: it logs its users in with its own cookie and mints each a
short-lived HS256 JWT, which its page sends to jobwire (another origin) as a bearer
token. jobwire runs as its own process with the same JOBWIRE_JWT_SECRET
(README.md in this folder: how to run both)."""

from __future__ import annotations

import os
import time

import jwt
from fastapi import FastAPI, Request

from examples import hostapp

SECRET = os.environ["JOBWIRE_JWT_SECRET"]  # the same secret jobwire verifies with
JOBWIRE_URL = os.environ.get("JOBWIRE_URL", "http://127.0.0.1:8000").rstrip("/")
TOKEN_SECONDS = 15 * 60

# The page may load scripts from jobwire (jobwire.js) and talk to it over HTTP and the
# WebSocket, and nothing else beyond this app's own origin.
_ws = JOBWIRE_URL.replace("http", "ws", 1)
CSP = (f"default-src 'self'; script-src 'self' {JOBWIRE_URL}; connect-src 'self' "
       f"{JOBWIRE_URL} {_ws}; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")

app = FastAPI()
app.include_router(hostapp.router({"jobwire-url": JOBWIRE_URL, "me-url": "/me"}, csp=CSP))


@app.get("/me")
def me(request: Request) -> dict[str, object]:
    """The signed-in user's JWT for jobwire (owner `user:<sub>`) and liked tracks. Only
    this app's own pages can read it: the answer carries no CORS headers."""
    owner = hostapp.signed_in(request)
    now = int(time.time())
    claims = {"sub": owner.removeprefix("user:"), "iat": now, "exp": now + TOKEN_SECONDS}
    return {"token": jwt.encode(claims, SECRET, "HS256"), "tracks": hostapp.liked_tracks(owner)}


if __name__ == "__main__":
    hostapp.run(app, default_port=8001)
