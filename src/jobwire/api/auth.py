"""Sessions and tokens: who is calling. Only SHA-256 hashes of tokens are stored."""

from __future__ import annotations

import hashlib
import secrets

from fastapi import HTTPException
from starlette.requests import HTTPConnection

from jobwire.api.coalesce import Coalescer
from jobwire.api.identity import identify
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


async def owner_of(conn: HTTPConnection, store: Store, allow_query: bool = False
                   ) -> str | None:
    """The owner the caller acts as (None: every owner's, the service key alone), or 401
    (jobwire.api.identity: JWTs and the service key)."""
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
