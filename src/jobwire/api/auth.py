"""Sessions and tokens: who is calling. Only SHA-256 hashes of tokens are stored."""

from __future__ import annotations

import hashlib
import inspect
import logging
import secrets
from collections.abc import Awaitable, Callable

from fastapi import HTTPException
from starlette.requests import HTTPConnection

from jobwire.api.identity import identify
from jobwire.coalesce import Coalescer
from jobwire.model import MAX_OWNER_ID, now, valid_owner
from jobwire.store import Store

# The host app's own sign-in: the owner of a request (HTTP, SSE or WebSocket), or None
# to leave it to jobwire's own sessions (if the app keeps them on). A sync hook runs on
# the event loop, so one that does I/O should be async.
Authenticate = Callable[[HTTPConnection], "str | Awaitable[str | None] | None"]

COOKIE = "jobwire_token"
GUEST_TTL = 30 * 24 * 3600.0

# Concurrent requests with one token share one lookup that started after they arrived.
_lookups: Coalescer[tuple[Store, str], str | None] = Coalescer()


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def new_session(store: Store, owner: str | None = None,
                      ttl: float | None = GUEST_TTL) -> tuple[str, str]:
    """A fresh token for `owner` (a new guest when None); returns (token, owner)."""
    token = secrets.token_urlsafe(32)
    owner = owner or f"guest:{secrets.token_hex(8)}"
    await store.add_session(hash_token(token), owner, None if ttl is None else now() + ttl)
    return token, owner


def bearer_token(conn: HTTPConnection) -> str | None:
    scheme, _, value = conn.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def token_of(conn: HTTPConnection, allow_query: bool) -> str | None:
    if (token := bearer_token(conn)) is not None:
        return token
    if allow_query and conn.query_params.get("token"):
        return conn.query_params["token"]
    return conn.cookies.get(COOKIE)


async def owner_of(conn: HTTPConnection, store: Store, allow_query: bool = False
                   ) -> str | None:
    """The owner the caller acts as (None: every owner's, the service key alone), or an
    HTTPException: the app's `authenticate` hook first (a mounted jobwire), then the
    built-in identities (jobwire.api.identity: JWTs, the service key, sessions) unless
    the app turned them off (then 401)."""
    state = conn.app.state
    if state.authenticate is not None:
        who = state.authenticate(conn)
        if inspect.isawaitable(who):
            who = await who
        if who is not None:
            return _hooked(conn, who)
        if not state.builtin_auth:
            raise HTTPException(401, "not signed in")
    return await identify(conn, token_of(conn, allow_query),
                          lambda token: session_owner(store, token))


async def session_owner(store: Store, token: str) -> str:
    """The owner of a session token, or 401. The lookup is by hash, so no token is ever
    compared byte by byte in Python."""
    token_hash = hash_token(token)
    owner, _ = await _lookups.run((store, token_hash), lambda: store.session_owner(token_hash))
    if owner is None:
        raise HTTPException(401, "invalid or expired token")
    return owner


def _hooked(conn: HTTPConnection, who: object) -> str:
    if not isinstance(who, str) or valid_owner(who) is None:
        # The host's bug, not the caller's: logged for the host, not echoed to the caller.
        logging.getLogger("jobwire").error(
            "authenticate returned %r: an owner is 'user:<id>' or 'guest:<id>', the id 1 "
            "to %d printable characters", str(who)[:300], MAX_OWNER_ID)
        raise HTTPException(500, "the app's authenticate hook returned an invalid owner")
    # The hook most likely reads a cookie, which the browser sends whichever page opens
    # a WebSocket (no CORS there): a socket from another site is refused, as for
    # jobwire's own cookie. (HTTP requests that change something are checked by SameOrigin.)
    if conn.scope["type"] == "websocket" and (refused := conn.app.state.origins.refusal(conn)):
        raise HTTPException(403, refused)
    return who
