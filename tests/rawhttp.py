"""A loopback HTTP server whose answers tests script byte by byte (drips, bombs, redirects)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable

# A route answers the request's Host header with the raw bytes of a response, in pieces.
Route = Callable[[str], AsyncIterator[bytes]]


HTML = (("Content-Type", "text/html"),)


def head(status: str = "200 OK", headers: Iterable[tuple[str, str]] = HTML) -> bytes:
    """A response's head, without Content-Length: the body ends when the connection does."""
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers)
    return f"HTTP/1.1 {status}\r\n{lines}Connection: close\r\n\r\n".encode()


def page(body: bytes, status: str = "200 OK",
         headers: Iterable[tuple[str, str]] = HTML) -> Route:
    """A route answering with `body` at once."""
    async def route(host: str) -> AsyncIterator[bytes]:
        yield head(status, [*headers, ("Content-Length", str(len(body)))]) + body
    return route


def redirect(location: str) -> Route:
    return page(b"", "302 Found", [("Location", location)])


@contextlib.asynccontextmanager
async def serve(routes: dict[str, Route], host: str = "127.0.0.1") -> AsyncIterator[str]:
    """Serve `routes` by path on `host` (a loopback address); yields the base URL."""
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            path = head[0].split(" ")[1]
            host = next(h.split(":", 1)[1].strip() for h in head if h.lower().startswith("host:"))
            async for data in routes[path](host):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client hung up
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
