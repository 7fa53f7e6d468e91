"""Limits that keep one client from exhausting the server: request body size and live
connections per owner and per process, each refused with a JSON 413/429/503 (or a
WebSocket close code) that says what the limit is."""

from __future__ import annotations

import dataclasses
import weakref
from collections import Counter

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def too_large(max_bytes: int) -> str:
    return f"request body too large: the limit is {max_bytes} bytes"


class BodyTooLarge(HTTPException):
    """The request body grew past the limit while it was being read. An HTTPException, so
    FastAPI's body parsing passes it on as the 413 rather than as a parse error."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, too_large(max_bytes))


class BodyLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, whether announced by
    Content-Length or discovered while streaming (chunked uploads lie by omission)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > self.max_bytes:
                await self._refuse(send)
                return
            if b"transfer-encoding" not in headers:
                # The server reads exactly Content-Length bytes: nothing to count.
                await self.app(scope, receive, send)
                return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except BodyTooLarge:
            if started:
                raise
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = orjson.dumps({"detail": too_large(self.max_bytes)})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class Slot:
    """One held live connection; releasing twice is harmless."""

    def __init__(self, slots: OwnerSlots, owner: str) -> None:
        self._slots = slots
        self._owner: str | None = owner

    def release(self) -> None:
        if self._owner is not None:
            self._slots._release(self._owner)
            self._owner = None

    def tie_to(self, obj: object) -> None:
        """Release when `obj` is garbage collected, for streams that may never start
        (a client that hangs up before the first byte never runs their `finally`)."""
        weakref.finalize(obj, self.release)


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    """Why a live connection was not opened: the HTTP status for SSE, the WebSocket
    close code, and the reason."""

    status: int
    ws_code: int
    reason: str


class OwnerSlots:
    """Counts live WebSocket and SSE connections in this process, per owner and in all.
    The total stays under the process's file limit, so however many owners open
    connections, the server still has descriptors to answer health checks and REST."""

    def __init__(self, limit: int, total: int) -> None:
        self.limit = limit
        self.total = total
        self._held: Counter[str] = Counter()
        self._count = 0

    def acquire(self, owner: str) -> Slot | Refusal:
        """A slot, or why not: this process holds `total` connections (503, close 1013
        "try again later"), or the owner holds `limit` of them here (429, close 4429)."""
        if self._count >= self.total:
            return Refusal(503, 1013, f"server busy: at most {self.total} live connections "
                           "per server process; retry later")
        if self._held[owner] >= self.limit:
            return Refusal(429, 4429, f"too many live connections: at most {self.limit} "
                           "per owner; close one first")
        self._held[owner] += 1
        self._count += 1
        return Slot(self, owner)

    def _release(self, owner: str) -> None:
        self._count -= 1
        self._held[owner] -= 1
        if self._held[owner] <= 0:
            del self._held[owner]
