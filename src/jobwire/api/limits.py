"""Limits that keep one client from exhausting the server: request body size and live
connections per owner, each refused with a JSON 413/429 that says what the limit is."""

from __future__ import annotations

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


class OwnerSlots:
    """Counts live WebSocket and SSE connections per owner in this process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: Counter[str] = Counter()

    def acquire(self, owner: str) -> Slot | None:
        """A slot, or None when the owner already holds `limit` connections here."""
        if self._held[owner] >= self.limit:
            return None
        self._held[owner] += 1
        return Slot(self, owner)

    def _release(self, owner: str) -> None:
        self._held[owner] -= 1
        if self._held[owner] <= 0:
            del self._held[owner]

    def refusal(self) -> str:
        return f"too many live connections: at most {self.limit} per owner; close one first"
