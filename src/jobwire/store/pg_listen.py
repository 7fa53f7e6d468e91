"""The NOTIFY side of the PostgreSQL store: the payload format, and the one LISTEN
connection per process that turns other processes' events into hints."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable

import orjson
import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from jobwire.model import JSON, Event, now
from jobwire.store.base import Hint, OwnerHint, StoreError

log = logging.getLogger("jobwire.store.postgres")

NOTE_LIMIT = 7000  # bytes; PostgreSQL refuses NOTIFY payloads of 8000 or more
# The listening connection only reads, so a peer that vanished is noticed by TCP
# keepalives (within about 25 s) rather than by a query that could miss notifications.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
              "keepalives_count": 3}
# On a reconnect, jobs finished up to this long before the connection was last known
# alive are re-announced too: covers commits in flight and clock skew between hosts.
RESYNC_MARGIN = 60.0


STOP_SECONDS = 5.0
# The origin of notifications written on a host application's connection (a submit in
# its transaction): no listener's own (theirs are hex), so every listener delivers them,
# the one in the submitting process too, which published nothing since nothing was
# committed yet.
HOST_ORIGIN = "host"


def channel_of(schema: str) -> str:
    """Channels are per database; naming them by schema keeps deployments that share a
    database in separate schemas apart. Identifiers stop at 63 bytes."""
    return f"jobwire:{schema}".encode()[:63].decode(errors="ignore")


def note_sql(origin: str, job: str, seq: str, type: str, data: str, at: str) -> str:
    """`Listener.note` as a PostgreSQL text expression of SQL expressions, for a statement
    that writes and notifies its events itself, tagged with `origin`."""
    short = f"json_build_object('o', '{origin}', 'job', {job}, 'seq', {seq})"
    full = (f"json_build_object('o', '{origin}', 'job', {job}, 'seq', {seq}, "
            f"'type', {type}, 'data', {data}, 'at', {at})::text")
    return (f"(SELECT CASE WHEN octet_length(full_note) < {NOTE_LIMIT} THEN full_note "
            f"ELSE {short}::text END FROM (SELECT {full} AS full_note) AS note)")


class Listener:
    """Delivers other processes' events from a dedicated LISTEN connection, forever.

    A notification sent while the connection is down is lost, so after a reconnect
    `missed(since)` re-announces every job that may have changed meanwhile, as hints
    without an event: the hub then reads its channels' missing events from the table
    by seq, and workers look for work. This needs nothing beyond the Store protocol.
    """

    def __init__(self, conninfo: str, channel: str, deliver: Hint,
                 missed: Callable[[float], Awaitable[None]], owners: OwnerHint | None = None
                 ) -> None:
        self.conninfo = make_conninfo(conninfo, **KEEPALIVES)
        self.channel = channel
        self.origin = uuid.uuid4().hex[:12]  # tags our notifications: we deliver ours directly
        # How ours begin, as written by orjson (`note`) and by PostgreSQL (`note_sql`): a
        # busy worker skips its own without parsing them.
        self._ours = (f'{{"o":"{self.origin}"', f'{{"o" : "{self.origin}"')
        self._deliver = deliver
        self._missed = missed
        self._owners = owners
        self._task: asyncio.Task[None] | None = None

    def note(self, ev: Event) -> str:
        """The payload for one event: all of it when it fits, else just where to read it."""
        note: dict[str, JSON] = {"o": self.origin, "job": ev.job, "seq": ev.seq}
        full = orjson.dumps({**note, "type": ev.type, "data": ev.data, "at": ev.at})
        return (full if len(full) < NOTE_LIMIT else orjson.dumps(note)).decode()

    def note_sql(self, job: str, seq: str, type: str, data: str, at: str) -> str:
        return note_sql(self.origin, job, seq, type, data, at)

    async def start(self) -> None:
        """Return once listening; StoreError if the first connection fails."""
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(ready))
        await ready

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # Closing a connection mid-LISTEN can wait on a cancel request that never
            # returns (psycopg#1335); a closing store does not wait for it forever.
            await asyncio.wait({self._task}, timeout=STOP_SECONDS)
            self._task = None

    async def _run(self, ready: asyncio.Future[None]) -> None:
        alive_at: float | None = None
        delay = 0.5
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.conninfo,
                                                                 autocommit=True) as conn:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                    if alive_at is not None:
                        await self._missed(alive_at - RESYNC_MARGIN)
                        log.info("listening for events again")
                    if not ready.done():
                        ready.set_result(None)
                    delay = 0.5
                    alive_at = now()
                    # Our own notifications come back too, so on a busy system this
                    # moment stays recent.
                    async for note in conn.notifies():
                        alive_at = now()
                        self._on_note(note.payload)
            except (psycopg.Error, StoreError) as exc:
                if not ready.done():
                    ready.set_exception(StoreError(f"cannot listen for events: {exc}"))
                    return
                log.warning("event listener lost its connection (%s); retrying in %.1fs",
                            exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _on_note(self, payload: str) -> None:
        if payload.startswith(self._ours):
            return  # ours: already delivered at commit
        try:
            note = orjson.loads(payload)
            if "owner" in note:  # from a trigger (any process's, ours too): see OwnerChanges
                if self._owners is not None:
                    self._owners(str(note["owner"]))
                return
            job, seq = str(note["job"]), int(note["seq"])
            ev = (Event(job=job, seq=seq, type=note["type"], data=note["data"], at=note["at"])
                  if "type" in note else None)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("ignoring a malformed notification: %.200s", payload)
            return
        self._deliver(job, seq, ev)
