"""The benchmark's WebSocket subscriber side, as little Python per frame as a client can
spend: an asyncio protocol that does the opening handshake, parses the server's frames out
of each read and hands every text frame to a callback.

Why not the `websockets` client: 1,000 subscribers in client processes on the same two
CPUs as the server parse hundreds of thousands of frames a second, and its per-frame
asyncio machinery (a future, a queue, a task wake-up per `recv`) made the subscribers use
more CPU than the server they measure: the latency then measures the harness. A browser
reads frames in native code; this reader is the nearest Python gets to that.

Loopback, our own server only: no TLS, no extensions, frames never fragmented (the server
sends whole frames; a fragment is refused as an error).
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Callable
from urllib.parse import urlsplit

OnText = Callable[[bytes], bool]  # True: the subscriber has what it came for, close


def _masked(opcode: int, payload: bytes) -> bytes:
    """A client frame (clients must mask theirs)."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes((0x80 | opcode, 0x80 | n)) if n < 126 else \
        bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return head + mask + (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


class _Reader(asyncio.Protocol):
    def __init__(self, on_text: OnText) -> None:
        self.on_text = on_text
        self.buf = bytearray()
        self.upgraded = False
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[bool] = loop.create_future()  # True: on_text was satisfied
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send_text(self, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.write(_masked(0x1, payload))

    def _end(self, outcome: bool | BaseException) -> None:
        if self.done.done():
            return
        if isinstance(outcome, BaseException):
            self.done.set_exception(outcome)
            if not self.opened.done():
                self.opened.set_exception(outcome)
        else:
            self.done.set_result(outcome)
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        try:
            self._frames(data)
        except Exception as exc:  # a bad frame or a failing callback ends this connection
            self._end(exc)

    def _frames(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                raise ConnectionError(f"no upgrade: {bytes(buf[:end])!r}")
            del buf[:end + 4]
            self.upgraded = True
            self.opened.set_result(None)
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b0, length = buf[pos], buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if n - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
            if n - pos < head + length:
                break
            payload = bytes(buf[pos + head:pos + head + length])
            pos += head + length
            opcode = b0 & 0x0F
            if not b0 & 0x80:
                raise ConnectionError("a fragmented frame")
            if opcode == 0x1:
                if self.on_text(payload):
                    self._end(True)
                    return
            elif opcode == 0x9:  # ping: pong with its payload
                assert self.transport is not None
                self.transport.write(_masked(0xA, payload))
            elif opcode == 0x8:
                self._end(False)
                return
        del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(False)


async def follow(url: str, first: bytes, on_text: OnText) -> bool:
    """Connect to the WebSocket at `url` (ws://host:port/path?query), send `first` as a
    text frame once open, and hand every text frame to `on_text` until it returns True
    (then True) or the connection ends (then False)."""
    parts = urlsplit(url)
    loop = asyncio.get_running_loop()
    transport, reader = await loop.create_connection(
        lambda: _Reader(on_text), parts.hostname, parts.port)
    key = base64.b64encode(os.urandom(16)).decode()
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    transport.write(
        f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    try:
        await reader.opened
        reader.send_text(first)
        return await reader.done
    finally:
        transport.close()
