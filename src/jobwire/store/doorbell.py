"""Wakes the other processes on one SQLite file when this one commits, so they read what
it wrote at once rather than at their next poll.

Each open store binds a Unix datagram socket in a directory beside the database file
(`jobwire.db-wake/`); after a commit it sends every other socket there a byte. A store
that opens says hello to those there, so they ring it from then on. A ring only says
"look now": the poll stays the fallback, so a ring lost (a peer's buffer full, a peer
that started a moment ago, a system without Unix sockets, a path too long for a socket's
address and no /proc to shorten it) costs the poll interval, never an event. A stranger
who can write to a socket can make its process look (or list the directory), and no
more. A socket left behind by a killed process refuses the next ring and is removed then.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from pathlib import Path

# A Unix socket's address holds at most 108 bytes on Linux (104 on macOS). A longer path
# is reached through the directory's descriptor where /proc shows it (Linux); elsewhere
# such a store polls only.
MAX_ADDRESS = 100
PROC_FD = "/proc/self/fd"
RING, HELLO = b"r", b"h"


class Doorbell:
    """One store's socket, and its peers': ring them from any thread; on the event loop,
    wait until a peer rings this one."""

    def __init__(self, db_path: str) -> None:
        self.dir = Path(db_path + "-wake")
        self.name = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._dirfd: int | None = None
        self._peers: list[str] = []  # replaced whole, so another thread reads it safely
        self._inbox: socket.socket | None = None
        self._outbox: socket.socket | None = None

    def open(self) -> bool:
        """Binds the socket and says hello; False (and the store polls only) where that
        cannot be done."""
        try:
            self._inbox = self._bound()
            self._outbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        except (OSError, AttributeError):  # AttributeError: no AF_UNIX here
            self.close()
            return False
        self._inbox.setblocking(False)
        self._outbox.setblocking(False)
        self.look_around()
        self._send(HELLO)
        return True

    def _bound(self) -> socket.socket:
        inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            attempts = 2  # a peer closing just then may remove the directory: once more
            while True:
                self.dir.mkdir(mode=0o700, exist_ok=True)
                try:
                    self._dirfd = os.open(self.dir, os.O_RDONLY)
                    inbox.bind(self._address(self.name))
                    return inbox
                except FileNotFoundError:
                    attempts -= 1
                    if not attempts:
                        raise
                    self._close_dir()
        except BaseException:
            inbox.close()
            raise

    def _address(self, name: str) -> str:
        path = str(self.dir / name)
        return path if len(path) <= MAX_ADDRESS else f"{PROC_FD}/{self._dirfd}/{name}"

    def look_around(self) -> None:
        """Learns which peers there are now (at open, at a hello, and at each poll)."""
        if self._inbox is None:
            return
        try:
            names = os.listdir(self.dir)
        except OSError:
            names = []
        self._peers = [self._address(name) for name in names if name != self.name]

    def ring(self) -> None:
        """Tells every peer to look now. Never blocks and never raises: a peer that cannot
        take it will poll."""
        self._send(RING)

    def _send(self, message: bytes) -> None:
        outbox = self._outbox
        if outbox is None:
            return
        for peer in self._peers:
            try:
                outbox.sendto(message, peer)
            except (ConnectionRefusedError, FileNotFoundError):
                with contextlib.suppress(OSError):  # its process died: nobody reads it
                    os.unlink(peer)
            except OSError:
                pass  # its buffer is full: it has been rung already

    async def wait(self) -> None:
        """Returns once a peer has rung (before the call or during it). The socket is
        watched only while waiting: rings that come meanwhile wait in it and cost this
        process nothing until it looks."""
        loop = asyncio.get_running_loop()
        rung = loop.create_future()
        if self._inbox is None:  # closed: never rung
            await rung
            return
        fd = self._inbox.fileno()

        def ready() -> None:
            if not rung.done():
                rung.set_result(None)
        loop.add_reader(fd, ready)
        try:
            await rung
        finally:
            loop.remove_reader(fd)

    def take(self) -> None:
        """Takes the rings waiting; if a hello is among them, looks around."""
        inbox = self._inbox
        if inbox is None:
            return
        hello = False
        with contextlib.suppress(OSError):  # BlockingIOError: all taken
            while True:
                hello |= inbox.recv(64) == HELLO
        if hello:
            self.look_around()

    def close(self) -> None:
        inbox, outbox = self._inbox, self._outbox
        self._inbox = self._outbox = None
        self._peers = []
        if outbox is not None:
            outbox.close()
        if inbox is not None:
            inbox.close()
            with contextlib.suppress(OSError):
                os.unlink(self._address(self.name))
        self._close_dir()
        with contextlib.suppress(OSError):  # the last one out; not empty: others are in
            self.dir.rmdir()

    def _close_dir(self) -> None:
        if self._dirfd is not None:
            os.close(self._dirfd)
            self._dirfd = None
