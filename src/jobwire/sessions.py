"""The live connections (WebSocket, SSE) of this process by the session that authenticated
them, so that a session that ends (claimed by a user, revoked, expired) takes them along;
and those a JWT authenticated, which end when it expires.

The process that ends a session closes its connections at once (`end`); every process
also re-checks, every few seconds and in one query, that the sessions its connections
hold still exist (`run`), which covers sessions ended by another process or the CLI and
sessions that expired. A JWT cannot be revoked here; its connections end on a timer at
its expiry (an idle timer per connection, no task).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from jobwire.model import now
from jobwire.store import Store, StoreError

if TYPE_CHECKING:  # (jobwire.api imports the runtime, which imports this module)
    from jobwire.api.identity import Caller

log = logging.getLogger("jobwire.sessions")

ENDED = "session ended: sign in again"
EXPIRED = "token expired: reconnect with a fresh token"

End = Callable[[str], None]  # ends one connection, with the reason it is told


class LiveSessions:
    def __init__(self) -> None:
        # token hash -> how to end each connection it authenticated
        self._ends: dict[str, set[End]] = {}

    def watch(self, caller: Caller, end: End) -> Callable[[], None]:
        """Call `end` (once) when the caller's access ends: its session ends (ENDED) or
        its JWT expires (EXPIRED); the service key's never does. Returns the undo."""
        token_hash = caller.token_hash
        if caller.until is not None:
            timer = asyncio.get_running_loop().call_later(
                max(0.0, caller.until - now()), end, EXPIRED)
            return timer.cancel
        if token_hash is None:
            return lambda: None
        self._ends.setdefault(token_hash, set()).add(end)

        def unwatch() -> None:
            ends = self._ends.get(token_hash)
            if ends is not None:
                ends.discard(end)
                if not ends:
                    del self._ends[token_hash]
        return unwatch

    def end(self, token_hash: str) -> int:
        """End the connections of a session this process just ended; how many."""
        ends = self._ends.pop(token_hash, set())
        for end in ends:
            end(ENDED)
        return len(ends)

    async def check(self, store: Store) -> int:
        """End the connections whose session no longer exists or expired; how many."""
        held = list(self._ends)
        if not held:
            return 0
        alive = await store.live_sessions(held)
        return sum(self.end(h) for h in held if h not in alive)

    async def run(self, store: Store, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check(store)
            except StoreError as exc:  # the database is away: keep the connections
                log.warning("cannot check the sessions of live connections: %s", exc)
