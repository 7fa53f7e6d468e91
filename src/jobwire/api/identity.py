"""The host app's identity: its JWTs and its backend's service key (docs/identity.md).

`identify` is the one place a request, an SSE stream or a WebSocket learns whose jobs it
acts on. A token with two dots is a JWT and goes only to the JWT verifier; the service key
is recognised by hash; anything else is one of jobwire's own session tokens, looked up by
the caller-supplied `sessions` function.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import jwt
import orjson
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from fastapi import HTTPException
from starlette.requests import HTTPConnection

from jobwire.model import MAX_OWNER_ID, valid_owner, valid_owner_id
from jobwire.settings import SettingError, Settings

log = logging.getLogger("jobwire.identity")

OWNER_HEADER = "x-jobwire-owner"
SERVICE = "service"  # whom the service key's own live connections count against (no owner)
MIN_SECRET = 32  # characters of the service key and of an HMAC secret (RFC 7518: >= hash size)
JWKS_MAX_AGE = 600.0  # seconds a fetched JWKS is trusted before the next use refetches it

HMAC_ALGS = ["HS256", "HS384", "HS512"]
EC_ALGS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}

# PyJWT's errors in general terms: enough to act on, never the token or its claims.
_REFUSALS: list[tuple[type[Exception], str]] = [
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "token audience not accepted"),
    (jwt.InvalidIssuerError, "token issuer not accepted"),
    (jwt.InvalidSignatureError, "token signature invalid"),
    (jwt.InvalidAlgorithmError, "token algorithm not accepted"),
    (jwt.MissingRequiredClaimError, "token lacks a required claim (exp)"),
]

Key = Any  # bytes (HMAC) or a cryptography public key


class Caller(NamedTuple):
    """Who a request or live connection acts as, and what its access ends with."""

    owner: str | None  # None: every owner's (the service key alone, for reads)
    token_hash: str | None = None  # a session's: its live connections end with it
    until: float | None = None  # a JWT's: epoch seconds it stops being accepted (exp+leeway)


Sessions = Callable[[str], Awaitable[Caller]]


def algorithms_for(key: Key) -> list[str]:
    """What `key` may verify, from its type alone: a token's header never chooses, so an
    HS256 token "signed" with an RSA public key as its secret is refused."""
    if isinstance(key, bytes):
        return HMAC_ALGS
    if isinstance(key, rsa.RSAPublicKey):
        return ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in EC_ALGS:
        return [EC_ALGS[key.curve.name]]
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return ["EdDSA"]
    raise SettingError(f"unsupported JWT key type {type(key).__name__}")


def _pem_key(text: str) -> Key:
    """A public key from PEM text or a PEM file: a public key or a certificate's."""
    data = (text if "-----BEGIN" in text else Path(text).read_text()).encode()
    if b"CERTIFICATE" in data:
        return x509.load_pem_x509_certificate(data).public_key()
    return load_pem_public_key(data)


class KeySet:
    """The keys of a JWKS file or URL, by kid. An unknown kid refetches the set, at most
    once per `min_interval` seconds whatever arrives (a flood of made-up kids costs the
    JWKS server one request per interval), and a set older than JWKS_MAX_AGE is
    refetched on its next use, so a key the provider withdrew stops working."""

    def __init__(self, source: str, min_interval: float) -> None:
        self.source = source
        self.min_interval = min_interval
        self.keys: dict[str | None, tuple[Key, list[str]]] = {}
        self.fetched = -float("inf")  # monotonic time of the last fetch attempt
        self.loaded = -float("inf")  # ... and of the last successful one
        self.lock = asyncio.Lock()

    async def key(self, kid: str | None) -> tuple[Key, list[str]]:
        if kid not in self.keys or time.monotonic() - self.loaded > JWKS_MAX_AGE:
            async with self.lock:  # concurrent misses share one fetch
                if time.monotonic() - self.fetched >= self.min_interval:
                    self.fetched = time.monotonic()
                    await self._refresh()
        found = self.keys.get(kid)
        if found is None and kid is None and len(self.keys) == 1:
            found = next(iter(self.keys.values()))  # a lone key needs no kid
        if found is None:
            raise HTTPException(401, "token signing key unknown")
        return found

    async def _refresh(self) -> None:
        try:
            if self.source.startswith(("https://", "http://")):
                async with httpx.AsyncClient(timeout=10) as http:
                    response = await http.get(self.source)
                    response.raise_for_status()
                    text = response.text
            else:
                text = await asyncio.to_thread(Path(self.source).read_text)
            entries = orjson.loads(text)["keys"]
            if not isinstance(entries, list):
                raise ValueError("keys is not a list")
        except (httpx.HTTPError, OSError, orjson.JSONDecodeError, KeyError, TypeError,
                ValueError) as exc:
            # Keep the keys we have: the provider being down must not log everyone out.
            log.warning("JWKS %s could not be loaded: %s", self.source, exc)
            return
        keys: dict[str | None, tuple[Key, list[str]]] = {}
        for entry in entries:
            # Signing keys only, and never a symmetric one: a JWKS is public.
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig" or entry.get(
                    "kty") == "oct":
                continue
            try:
                jwk = jwt.PyJWK(entry)
                algorithms = algorithms_for(jwk.key)
            except (jwt.PyJWTError, ValueError):  # (SettingError is a ValueError)
                continue  # a key this server cannot use; the others still work
            if "alg" in entry:  # a key's declared alg narrows what it verifies, never widens
                algorithms = [a for a in algorithms if a == entry["alg"]]
            if algorithms:
                keys[jwk.key_id] = (jwk.key, algorithms)
        self.keys, self.loaded = keys, time.monotonic()


class Identity:
    """How this server recognises the host app's callers; built once at startup, where a
    bad setting stops the server with a SettingError instead of failing requests."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        key = settings.service_key
        if key and len(key) < MIN_SECRET:
            raise SettingError(f"JOBWIRE_SERVICE_KEY must be at least {MIN_SECRET} characters")
        self.service_hash = hashlib.sha256(key.encode()).digest() if key else None
        sources = [s for s in (settings.jwt_secret, settings.jwt_public_key, settings.jwt_jwks)
                   if s]
        if len(sources) > 1:
            raise SettingError("set one of JOBWIRE_JWT_SECRET, JOBWIRE_JWT_PUBLIC_KEY and "
                                "JOBWIRE_JWT_JWKS")
        self.static: tuple[Key, list[str]] | None = None
        self.jwks: KeySet | None = None
        if settings.jwt_secret:
            if len(settings.jwt_secret) < MIN_SECRET:
                raise SettingError(f"JOBWIRE_JWT_SECRET must be at least {MIN_SECRET} characters")
            self.static = (settings.jwt_secret.encode(), HMAC_ALGS)
        elif settings.jwt_public_key:
            try:
                public = _pem_key(settings.jwt_public_key)
            except (OSError, ValueError) as exc:
                raise SettingError(f"JOBWIRE_JWT_PUBLIC_KEY is not a PEM public key or a "
                                    f"readable PEM file: {exc}") from None
            self.static = (public, algorithms_for(public))
        elif settings.jwt_jwks:
            self.jwks = KeySet(settings.jwt_jwks, settings.jwt_jwks_refresh_seconds)

    def is_service(self, token: str) -> bool:
        return self.service_hash is not None and hmac.compare_digest(
            hashlib.sha256(token.encode()).digest(), self.service_hash)

    async def _key(self, header: dict[str, Any]) -> tuple[Key, list[str]]:
        if self.static is not None:
            return self.static
        if self.jwks is None:
            raise HTTPException(401, "JWT bearer tokens are not enabled on this server")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise jwt.DecodeError("kid is not a string")
        return await self.jwks.key(kid)

    async def jwt_caller(self, token: str) -> Caller:
        """The owner a JWT names, until its exp (plus the leeway), or 401 saying in
        general terms what is wrong with it."""
        s = self.settings
        try:
            key, algorithms = await self._key(jwt.get_unverified_header(token))
            claims = jwt.decode(
                token, key, algorithms=algorithms, leeway=s.jwt_leeway_seconds,
                audience=s.jwt_audience or None, issuer=s.jwt_issuer or None,
                # (sub: checked below as the owner claim, whichever claim that is)
                options={"require": ["exp"], "verify_aud": bool(s.jwt_audience),
                         "verify_sub": False})
        except jwt.PyJWTError as exc:
            detail = next((d for kind, d in _REFUSALS if isinstance(exc, kind)),
                          "malformed token")
            raise HTTPException(401, detail) from None
        claim = s.jwt_owner_claim or "sub"
        subject = valid_owner_id(claims.get(claim))
        if subject is None:
            raise HTTPException(401, f"token claim {claim!r} is missing or not "
                                f"an id (1 to {MAX_OWNER_ID} printable characters)")
        guest = s.jwt_guest_claim is not None and claims.get(s.jwt_guest_claim) is True
        # (exp is required, and PyJWT has checked it is a number)
        return Caller(f"{'guest' if guest else 'user'}:{subject}",
                      until=float(claims["exp"]) + s.jwt_leeway_seconds)


async def identify(conn: HTTPConnection, token: str | None, sessions: Sessions) -> Caller:
    """The caller, or 401/403/400. An owner of None means every owner's: only the
    service key without X-Jobwire-Owner, for reads (deps.owner refuses writes)."""
    identity: Identity = conn.app.state.identity
    acting_as = conn.headers.get(OWNER_HEADER)
    if not token:
        raise HTTPException(401, "missing token: send Authorization: Bearer <token>")
    if identity.is_service(token):
        if acting_as is None:
            return Caller(None)
        if valid_owner(acting_as) is None:
            raise HTTPException(400, f"X-Jobwire-Owner must be user:<id> or guest:<id>, "
                                f"the id 1 to {MAX_OWNER_ID} printable characters")
        return Caller(acting_as)
    if acting_as is not None:
        raise HTTPException(403, "only the service key may send X-Jobwire-Owner")
    if token.count(".") == 2:
        return await identity.jwt_caller(token)
    return await sessions(token)
