"""What a server open to the internet needs besides access control: a rate of new guest
sessions per client address, the proxies whose X-Forwarded-* headers are believed, and
a same-origin check on every request that relies on the browser's session cookie, so
another site cannot make a visitor's browser act with (or replace) that cookie."""

from __future__ import annotations

import collections
import ipaddress
import math
import re
import time
from collections.abc import Callable, Iterable

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobwire.api.auth import COOKIE, bearer_token, by_message, token_of
from jobwire.settings import SettingError

# Browsers send these without asking the server first, and cannot be made to change
# anything by them (the API keeps them side-effect free).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_RATE = re.compile(r"\s*(\d+)\s*/\s*(\d+(?:\.\d*)?)\s*s?\s*,\s*(\d+)\s*")
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s]+")
_DEFAULT_PORTS = {"http": ":80", "https": ":443"}


class RateLimit:
    """A token bucket per key (a client address): `burst` at once, then `count` per
    `seconds`. A bucket that has filled up again is forgotten (a new one starts full, so
    this changes nothing), so only keys seen within the last `burst / rate` seconds take
    memory, and at most `max_keys` of them (past that the least recently seen one is
    forgotten early: many addresses at once get their full burst back sooner)."""

    def __init__(self, count: int, seconds: float, burst: int, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.count, self.seconds, self.burst = count, seconds, burst
        self.rate = count / seconds
        self.max_keys = max_keys
        self.clock = clock
        # key -> (tokens, when counted), least recently used first
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = (
            collections.OrderedDict())

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        """From JOBWIRE_SESSION_RATE: "COUNT/SECONDS,BURST", e.g. "30/60s,10"."""
        m = _RATE.fullmatch(text)
        if m is None or not (int(m[1]) > 0 and float(m[2]) > 0 and int(m[3]) > 0):
            raise SettingError(f"JOBWIRE_SESSION_RATE must be COUNT/SECONDS,BURST with each "
                               f"above 0, like 30/60s,10; not {text!r}")
        return cls(int(m[1]), float(m[2]), int(m[3]))

    def share(self, processes: int) -> RateLimit:
        """This process's share of the limit when `processes` serve one port: each takes
        a client's connections at random, so together they never allow more (save a burst
        below `processes`: each allows one at once)."""
        if processes == 1:
            return self
        return RateLimit(self.count, self.seconds * processes,
                         max(1, self.burst // processes), self.max_keys, self.clock)

    def __str__(self) -> str:
        return f"at most {self.burst} at once, then {self.count} per {self.seconds:g} s"

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> float:
        """0 if `key` may go ahead (a token is taken), else the seconds until it may."""
        at = self.clock()
        refill = self.burst / self.rate  # seconds from empty to full
        while self._buckets:
            oldest, (_, seen) = next(iter(self._buckets.items()))
            if at - seen < refill:
                break
            del self._buckets[oldest]
        tokens, seen = self._buckets.pop(key, (self.burst, at))
        tokens = min(self.burst, tokens + (at - seen) * self.rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
        self._buckets[key] = (tokens - 1 if wait == 0 else tokens, at)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait


def client_address(conn: HTTPConnection) -> str:
    """The peer's address, or the client's as a trusted proxy gave it in X-Forwarded-For
    (uvicorn replaces the peer by it: see `trusted_proxies`)."""
    return conn.client.host if conn.client else ""


def rate_key(address: str) -> str:
    """What one client's rate is counted by: its IPv4 address, or its IPv6 /64 (one host
    commonly has a whole /64 to pick addresses from)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    return str(ipaddress.ip_network(f"{ip}/64", strict=False)) if ip.version == 6 else address


def check_session_rate(conn: HTTPConnection) -> None:
    """429 with Retry-After when the caller's address has used up its new sessions."""
    limit: RateLimit = conn.app.state.session_rate
    wait = limit.take(rate_key(client_address(conn)))
    if wait > 0:
        seconds = math.ceil(wait)
        raise HTTPException(429, f"too many new sessions from your address: {limit}; "
                                 f"retry in {seconds} s", headers={"Retry-After": str(seconds)})


def trusted_proxies(text: str) -> list[str]:
    """JOBWIRE_TRUSTED_PROXIES as networks for uvicorn's `forwarded_allow_ips`, which
    silently ignores what it cannot parse: so an entry is checked here, and refused."""
    networks = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        try:
            networks.append(str(ipaddress.ip_network(entry, strict=False)))
        except ValueError:
            raise SettingError(f"JOBWIRE_TRUSTED_PROXIES: {entry!r} is not an IP address "
                               "or network (like 10.0.0.5 or 10.0.0.0/8)") from None
    return networks


def _normal(origin: str) -> str:
    origin = origin.strip().lower().rstrip("/")
    scheme, _, host = origin.partition("://")
    port = _DEFAULT_PORTS.get(scheme)
    return origin.removesuffix(port) if port and host.endswith(port) else origin


class Origins:
    """The origins allowed to use the session cookie: the server's own (the scheme and
    Host of the request itself) and JOBWIRE_ALLOWED_ORIGINS."""

    def __init__(self, allowed: str) -> None:
        entries = [e.strip() for e in allowed.split(",") if e.strip()]
        for entry in entries:
            if not _ORIGIN.fullmatch(entry.lower().rstrip("/")):
                raise SettingError(f"JOBWIRE_ALLOWED_ORIGINS: {entry!r} is not an origin "
                                   "(scheme://host[:port], like https://app.example.com)")
        self.allowed = frozenset(map(_normal, entries))

    def refusal(self, conn: HTTPConnection) -> str | None:
        """Why a browser may have sent this request on another site's behalf, or None.
        Without Origin, Sec-Fetch-Site decides; without either it is no browser."""
        origin = conn.headers.get("origin")
        if origin is not None:
            scheme = {"ws": "http", "wss": "https"}.get(conn.url.scheme, conn.url.scheme)
            own = _normal(f"{scheme}://{conn.headers.get('host', '')}")
            if _normal(origin) in self.allowed or _normal(origin) == own:
                return None
            return ("cross-origin request refused: its Origin is neither this server's "
                    "nor in JOBWIRE_ALLOWED_ORIGINS")
        site = conn.headers.get("sec-fetch-site")
        if site in ("cross-site", "same-site"):
            return f"cross-site request refused (Sec-Fetch-Site: {site})"
        return None


def cross_site(conn: HTTPConnection, allow_query: bool) -> str | None:
    """Why a connection that would authenticate by the session cookie alone (which the
    browser attaches whichever page opened it) is refused, or None."""
    cookie = conn.cookies.get(COOKIE)
    if cookie is None or token_of(conn, allow_query) != cookie or by_message(conn):
        return None
    origins: Origins = conn.app.state.origins
    return origins.refusal(conn)


class SameOrigin:
    """ASGI middleware: a request that may change something and carries no bearer token
    (so it relies on the cookie the browser sends, or sets one: POST /api/sessions) is
    refused with 403 unless it comes from an allowed origin. A bearer token is never
    sent by a browser on its own, so such requests are unaffected."""

    def __init__(self, app: ASGIApp, origins: Origins) -> None:
        self.app = app
        self.origins = origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            conn = HTTPConnection(scope)
            if bearer_token(conn) is None and (refused := self.origins.refusal(conn)):
                await JSONResponse({"detail": refused}, 403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def vary_origin(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`headers` with Origin added to Vary, as one header (as starlette's CORS does)."""
    rest: list[tuple[bytes, bytes]] = []
    vary: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        (vary if name.lower() == b"vary" else rest).append((name, value))
    rest.append((b"vary", b", ".join([*(v for _, v in vary), b"Origin"])))
    return rest


class Cors(CORSMiddleware):
    """CORS for the pages of JOBWIRE_ALLOWED_ORIGINS (exact origins), so a browser app on
    another origin can call the API, read streams, and import /static/jobwire.js (a
    module script needs CORS). Bearer tokens only, no credentials: the browser sends no
    cookie cross-origin that it would let the page read the answer to. A preflight from
    any other origin gets a bare 400 that names no method or header."""

    # Authorization: the bearer JWT; Content-Type: JSON bodies; Last-Event-ID: resuming
    # a stream read by fetch. (X-Jobwire-Owner is the service key's: a backend's header.)
    HEADERS = ("Authorization", "Content-Type", "Last-Event-ID")

    def __init__(self, app: ASGIApp, origins: Origins) -> None:
        super().__init__(app, allow_origins=sorted(origins.allowed),
                         allow_methods=["GET", "POST", "DELETE"], allow_headers=self.HEADERS,
                         allow_credentials=False, max_age=600)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or any(name == b"origin" for name, _ in scope["headers"]):
            await super().__call__(scope, receive, send)
            return

        # Without Origin there is nothing for CORS to allow: all starlette's would add is
        # Vary: Origin, added here without its header objects (this runs on every request).
        async def vary(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = vary_origin(message.get("headers", ()))
            await send(message)

        await self.app(scope, receive, vary)

    def preflight_response(self, request_headers: Headers) -> Response:
        if not self.is_allowed_origin(request_headers["origin"]):
            return PlainTextResponse("Disallowed CORS origin", 400, headers={"Vary": "Origin"})
        return super().preflight_response(request_headers)
