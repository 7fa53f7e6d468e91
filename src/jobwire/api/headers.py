"""Security headers on every HTTP response: the pages may not be framed, sniffed into
another type, or run anything but the server's own scripts."""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The dashboard is one HTML file, its own stylesheet and ES modules, and fetch/WebSocket
# to its own origin ('self' covers ws:/wss: of it in CSP Level 3 browsers). Nothing
# inline: a guest's job name or result rendered by mistake as markup still cannot run.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
}
# Encoded once: this runs on every response.
_RAW = tuple((name.lower().encode(), value.encode()) for name, value in HEADERS.items())
_WITH_CSP = (*_RAW, (b"content-security-policy", CSP.encode()))

RawHeaders = list[tuple[bytes, bytes]]


def with_defaults(headers: Iterable[tuple[bytes, bytes]],
                  defaults: Iterable[tuple[bytes, bytes]]) -> RawHeaders:
    """`headers` plus each of `defaults` whose name they lack (a response's own wins)."""
    headers = list(headers)
    have = {name.lower() for name, _ in headers}
    headers.extend(h for h in defaults if h[0] not in have)
    return headers


class SecurityHeaders:
    """ASGI middleware: HEADERS on every response, and the CSP on all but `exempt` paths
    (FastAPI's /docs pages load Swagger UI from a CDN with an inline script)."""

    def __init__(self, app: ASGIApp, exempt: frozenset[str]) -> None:
        self.app = app
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # The path within this app: a mounted app's scope keeps the host's prefix in
        # both "path" and "root_path".
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        defaults = _RAW if path in self.exempt else _WITH_CSP

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = with_defaults(message.get("headers", ()), defaults)
            await send(message)

        await self.app(scope, receive, with_headers)
