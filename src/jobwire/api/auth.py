"""Sessions and tokens: who is calling. Only SHA-256 hashes of tokens are stored."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import secrets
from collections.abc import Awaitable, Callable

import orjson
from fastapi import HTTPException
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocket, WebSocketDisconnect

from jobwire.api.identity import Caller, identify
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
    # Never starting with "-": `jobwire login <token>` would read it as an option.
    while (token := secrets.token_urlsafe(32)).startswith("-"):
        pass
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


async def authenticate(conn: HTTPConnection, store: Store, token: str | None) -> Caller:
    """The caller, or an HTTPException: the app's `authenticate` hook first (a mounted
    jobwire), then the built-in identities for `token` (jobwire.api.identity: JWTs and
    the service key, else a session token)."""
    if (caller := await hooked(conn)) is not None:
        return caller
    return await builtin(conn, store, token)


async def builtin(conn: HTTPConnection, store: Store, token: str | None) -> Caller:
    """The caller holding `token`, or 401."""
    return await identify(conn, token, lambda t: session_caller(store, t))


async def owner_of(conn: HTTPConnection, store: Store, allow_query: bool = False
                   ) -> str | None:
    """The owner the caller acts as (None: every owner's, the service key alone), or an
    HTTPException."""
    return (await authenticate(conn, store, token_of(conn, allow_query))).owner


async def hooked(conn: HTTPConnection) -> Caller | None:
    """The caller the app's `authenticate` hook names: no token, so nothing of jobwire's
    ends its live connections (the host's sign-out is the host's to enforce). None: leave
    it to the built-in identities; 401 if the app turned them off."""
    state = conn.app.state
    if state.authenticate is None:
        return None
    who = state.authenticate(conn)
    if inspect.isawaitable(who):
        who = await who
    if who is None:
        if not state.builtin_auth:
            raise HTTPException(401, "not signed in")
        return None
    return Caller(_hooked(conn, who), None)


async def session_caller(store: Store, token: str) -> Caller:
    """The session a token is, or 401. The lookup is by hash, so no token is ever
    compared byte by byte in Python."""
    token_hash = hash_token(token)
    owner, _ = await _lookups.run((store, token_hash), lambda: store.session_owner(token_hash))
    if owner is None:
        raise HTTPException(401, "invalid or expired token")
    return Caller(owner, token_hash)


async def new_ticket(store: Store, caller: Caller, ttl: float) -> str:
    """A single-use ticket for the caller's session, to put in a URL instead of the token.
    Only a session has one: a JWT's or the service key's stream would need the ticket to
    carry its owner and expiry, which a token in the URL (redacted from logs) already does."""
    if caller.token_hash is None:
        raise HTTPException(400, "tickets stand in for session tokens only: with a JWT or "
                                 "the service key, send it as ?token= or use the WebSocket")
    ticket = secrets.token_urlsafe(32)
    await store.add_ticket(hash_token(ticket), caller.token_hash, now() + ttl)
    return ticket


async def redeem(store: Store, ticket: str) -> Caller:
    """The caller a ticket stands for, or 401; the ticket is spent either way."""
    found = await store.use_ticket(hash_token(ticket))
    if found is None:
        raise HTTPException(401, "invalid, used or expired ticket")
    owner, token_hash = found
    return Caller(owner, token_hash)


def by_message(ws: HTTPConnection) -> bool:
    """Whether a WebSocket said (`?auth=message`) that its first message authenticates
    it, whatever cookie the browser sends."""
    return ws.query_params.get("auth") == "message"


AUTH_FIRST = 'send {"op": "auth", "token": "<token>"} first'


async def socket_caller(ws: WebSocket, store: Store, wait: float) -> Caller:
    """The caller of an accepted WebSocket, or 401. Without a token in the header, the
    query or a cookie, or with `?auth=message` (a page whose own token must win over
    a session cookie the browser sends anyway), the first frame must be {"op": "auth",
    "token": …} (so the token stays out of URLs, and so out of logs), within `wait`
    seconds; it is answered with {"op": "authenticated", "owner": …}. The app's hook
    comes first, as for HTTP: a socket it names reads no frame for a token.
    WebSocketDisconnect if the peer leaves first."""
    if (caller := await hooked(ws)) is not None:
        return caller
    token = None if by_message(ws) else token_of(ws, True)
    if token:
        return await builtin(ws, store, token)
    try:
        message = await asyncio.wait_for(ws.receive(), wait)
    except TimeoutError:
        raise HTTPException(401, f"no token within {wait:g} s: {AUTH_FIRST}") from None
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    try:
        msg = orjson.loads(message.get("text") or b"")
    except orjson.JSONDecodeError:
        msg = None
    if not isinstance(msg, dict) or msg.get("op") != "auth" or not isinstance(
            msg.get("token"), str):
        raise HTTPException(401, f"missing token: {AUTH_FIRST}")
    caller = await builtin(ws, store, msg["token"])
    await ws.send_text(orjson.dumps({"op": "authenticated", "owner": caller.owner}).decode())
    return caller


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
