"""WebSocket frames written straight to the connection, for fan-out to many sockets.

Through ASGI, every message to every socket is a str, encoded again, framed by the
websockets library and written: per subscriber, the same work for the same event. Under
`jobwire serve` the WebSocket protocol is uvicorn's own with one addition, a `RawSocket`
in the scope's extensions, so `api/live.py` can write a frame built once per event (the
header and the event's JSON, `text_frame`) to each transport as it is. Elsewhere (a
mounted jobwire under another server) there is no such extension and messages go through
ASGI as before.
"""

from __future__ import annotations

import struct

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request

EXTENSION = "jobwire.raw_socket"


def text_frame(payload: bytes) -> bytes:
    """`payload` (UTF-8 JSON) as one final, unmasked text frame: what a server sends."""
    n = len(payload)
    if n < 126:
        head = bytes((0x81, n))
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x81, 126, n)
    else:
        head = struct.pack("!BBQ", 0x81, 127, n)
    return head + payload


class RawSocket:
    """The transport of one accepted WebSocket, for whole frames. Control frames from
    the protocol (pings, the close) interleave safely: each write is a complete frame,
    and the protocol never sends a message in fragments."""

    __slots__ = ("_proto",)

    def __init__(self, proto: FrameProtocol) -> None:
        self._proto = proto

    def write(self, frame: bytes) -> bool:
        """Queue `frame` on the transport (sent at once if the socket can take it); False
        once the connection is closing or gone."""
        p = self._proto
        if not p.handshake_complete or p.close_sent or p.disconnected or \
                p.transport.is_closing():
            return False
        p.transport.write(frame)
        return True

    @property
    def backlog(self) -> int:
        """Bytes written and not yet taken by the kernel: what a slow reader holds here."""
        return self._proto.transport.get_write_buffer_size()

    def pause_above(self, high: int) -> None:
        """Set the backlog above which the transport pauses (the low-water mark is a
        quarter of it): `writable` waits from there."""
        transport = self._proto.transport
        if not transport.is_closing():  # (uvloop refuses a closed one)
            transport.set_write_buffer_limits(high=high)

    async def writable(self) -> None:
        """Returns once the backlog is below the transport's low-water mark (or the
        connection is gone)."""
        await self._proto.writable.wait()


class FrameProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, offering its transport as a RawSocket."""

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        if getattr(self, "scope", None) is not None:  # an upgrade it accepts
            self.scope["extensions"][EXTENSION] = RawSocket(self)  # type: ignore[assignment]
