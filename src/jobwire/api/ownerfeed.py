"""The owner feed over SSE (`GET /api/jobs/stream`) and WebSocket (`watch_jobs`): a live
list of the caller's jobs, resumable from a cursor (see jobwire.ownerfeed)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from starlette.requests import HTTPConnection

from jobwire.api.deps import RuntimeDep, StreamCaller, runtime
from jobwire.api.limits import OwnerSlots, Refusal
from jobwire.api.schemas import ErrorOut, bad_last_event_id, errors
from jobwire.ownerfeed import STATUSES, Message, OwnerFeeds, statuses_of
from jobwire.runtime import StatusFilter

if TYPE_CHECKING:
    from jobwire.api.live import SocketSession

router = APIRouter(prefix="/api", responses=errors(503))
OPS = frozenset({"watch_jobs", "unwatch_jobs"})
SSE_KEEPALIVE = 15.0
NO_OWNER = "the service key must name an owner (X-Jobwire-Owner) to watch its jobs"


def owner_feeds(conn: HTTPConnection) -> OwnerFeeds:
    """The app's feeds, made on first use (a store that is never watched pays nothing)."""
    rt, state = runtime(conn), conn.app.state
    feeds: OwnerFeeds | None = getattr(state, "owner_feeds", None)
    if feeds is None or feeds.store is not rt.store:  # (a new store after a restart)
        feeds = state.owner_feeds = OwnerFeeds(rt.store)
    return feeds


@router.get("/jobs/stream", response_class=StreamingResponse,
            responses={**errors(400, 401, 429),
                       503: {"model": ErrorOut, "description": "the database is unavailable, "
                             "or this process is at its live-connection limit; retry later"}})
async def stream_jobs(rt: RuntimeDep, caller: StreamCaller, request: Request,
                      status: StatusFilter | None = None, after: int = Query(0, ge=0),
                      last_event_id: str | None = Header(None)) -> StreamingResponse:
    """Server-Sent Events: `jobs` events as on the WebSocket's `watch_jobs`; `id` is the
    cursor, so the browser's reconnect (Last-Event-ID) resumes. Keep `status` the same."""
    who = caller.owner
    if who is None:
        raise HTTPException(400, NO_OWNER)
    if last_event_id is not None:
        try:
            after = max(after, int(last_event_id))
        except ValueError:
            raise bad_last_event_id("a cursor number") from None
    slots: OwnerSlots = request.app.state.connections
    slot = slots.acquire(who)
    if isinstance(slot, Refusal):
        raise HTTPException(slot.status, slot.reason)
    # None: the session ended (or the token expired), which ends the stream.
    queue: asyncio.Queue[Message | None] = asyncio.Queue()

    async def deliver(msg: Message) -> None:
        queue.put_nowait(msg)
        await queue.join()  # one message at most waits: the watch reads on once it is sent

    async def frames() -> AsyncIterator[bytes]:
        watch = owner_feeds(request).watch(who, statuses_of(status), after, deliver)
        unwatch = rt.live.watch(caller, lambda _reason: queue.put_nowait(None))
        try:
            while True:
                try:
                    msg = await asyncio.wait_for(queue.get(), SSE_KEEPALIVE)
                except TimeoutError:
                    yield b": keepalive\n\n"
                    continue
                if msg is None:
                    return
                yield b"id: %d\nevent: jobs\ndata: %s\n\n" % (msg["cursor"], orjson.dumps(msg))
                queue.task_done()
        finally:
            unwatch()
            watch.close()
            slot.release()

    body = frames()
    slot.tie_to(body)
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def handle(session: SocketSession, msg: dict[str, Any]) -> None:
    """`{"op": "watch_jobs", "status": "active"|<status>|null, "after": <cursor>}` starts the
    socket's one feed (again, replacing it); `{"op": "unwatch_jobs"}` stops it."""
    if session.feed is not None:
        session.feed.close()
        session.feed = None
    if msg["op"] == "unwatch_jobs":
        session.reply(op="unwatched_jobs")
        return
    status, after = msg.get("status"), msg.get("after", 0)
    if session.who is None:
        session.reply(op="error", code=400, error=NO_OWNER)
    elif status is not None and status not in STATUSES:
        session.reply(op="error", error=f"status must be one of {', '.join(STATUSES)} or null")
    elif not isinstance(after, int) or isinstance(after, bool) or after < 0:
        session.reply(op="error", error="after must be a cursor number >= 0")
    else:
        async def deliver(message: Message) -> None:
            await session.ready()
            session.reply(**message)

        session.feed = owner_feeds(session.ws).watch(
            session.who, statuses_of(status), after, deliver)
