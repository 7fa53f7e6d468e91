"""Reading jobwire's WebSocket message by message: a frame is one JSON object (a reply or
an event) or a JSON array of events the server coalesced into one frame."""

from __future__ import annotations

from collections import deque
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosedOK

from jobwire.client.connection import messages


class Messages:
    """The messages of a socket, one per `recv()` (or `async for`), in order."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._pending: deque[Any] = deque()

    async def recv(self) -> dict[str, Any]:
        while not self._pending:  # cancellation-safe: nothing is taken before it is kept
            self._pending.extend(messages(await self.ws.recv()))
        msg: dict[str, Any] = self._pending.popleft()
        return msg

    def __aiter__(self) -> Messages:
        return self

    async def __anext__(self) -> dict[str, Any]:
        try:
            return await self.recv()
        except ConnectionClosedOK:  # as `async for raw in ws` does on a normal close
            raise StopAsyncIteration from None
