"""Sessions and tokens: who is calling. Only SHA-256 hashes of tokens are stored."""

from __future__ import annotations

import asyncio
import hashlib
import secrets

import orjson
from fastapi import HTTPException
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocket, WebSocketDisconnect

from jobwire.api.coalesce import Coalescer
from jobwire.api.identity import Caller, identify
from jobwire.model import now
from jobwire.store import Store

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


async def authenticate(conn: HTTPConnection, store: Store, token: str | None) -> Caller:
    """The caller holding `token`, or 401 (jobwire.api.identity: JWTs and the service
    key, else a session token)."""
    return await identify(conn, token, lambda t: session_caller(store, t))


async def owner_of(conn: HTTPConnection, store: Store, allow_query: bool = False
                   ) -> str | None:
    """The owner the caller acts as (None: every owner's, the service key alone), or 401."""
    return (await authenticate(conn, store, token_of(conn, allow_query))).owner


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
    seconds; it is answered with {"op": "authenticated", "owner": …}.
    WebSocketDisconnect if the peer leaves first."""
    token = None if by_message(ws) else token_of(ws, True)
    if token:
        return await authenticate(ws, store, token)
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
    caller = await authenticate(ws, store, msg["token"])
    await ws.send_text(orjson.dumps({"op": "authenticated", "owner": caller.owner}).decode())
    return caller
