"""Live delivery of job events: long-poll over HTTP, Server-Sent Events and WebSocket.

All three read the same per-job log through the hub, so each resumes from a seq with
no loss and no duplicate. Every event is JSON-encoded once (`Event.wire`) and the
same bytes go to every subscriber.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Header, HTTPException, Query, Request, WebSocket
from fastapi.responses import Response, StreamingResponse
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocketDisconnect

from jobwire.api import frames, ownerfeed
from jobwire.api.auth import socket_caller
from jobwire.api.bodies import TooDeep, loads
from jobwire.api.deps import JobId, Reader, RuntimeDep, StreamCaller, owned_job, runtime
from jobwire.api.frames import RawSocket
from jobwire.api.identity import SERVICE
from jobwire.api.limits import OwnerSlots, Refusal
from jobwire.api.public import cross_site
from jobwire.api.schemas import ErrorOut, EventsOut, bad_last_event_id, errors
from jobwire.hub import Subscription
from jobwire.model import TERMINAL_EVENTS, Event
from jobwire.ownerfeed import Watch
from jobwire.runtime import NotStarted, Runtime
from jobwire.store import StoreError

router = APIRouter(prefix="/api", responses=errors(503))
log = logging.getLogger("jobwire")

SSE_KEEPALIVE = 15.0
# Between two rounds of writes (Flusher) at least this long per socket written, up to
# PACE_MAX: with many sockets busy, the events made meanwhile share one frame per socket.
# Frames are what subscribers pay for (a Python client ~20 us to read one, ~2 us per event
# in it), and the paced rounds leave the loop time to make and commit the events. (At
# 1,000 subscribers of one job paced at 200 updates/s, 5 us against 20 us: p50 ~15
# against ~22 ms, p99 ~33 against ~40 ms, ~10% more server CPU; bench/README.md.)
PACE_PER_SOCKET = 5e-6
PACE_MAX = 0.025


def connections(conn: HTTPConnection) -> OwnerSlots:
    slots: OwnerSlots = conn.app.state.connections
    return slots


@router.get("/jobs/{job_id}/events", response_model=EventsOut, responses=errors(401, 404))
async def poll_events(job_id: JobId, rt: RuntimeDep, who: Reader,
                      after: int = Query(0, ge=0),
                      wait: float = Query(0, ge=0, le=60)) -> Response:
    """Events with seq > after; with `wait`, hold the request up to that many seconds
    until one exists (long-poll)."""
    await owned_job(rt, job_id, who)
    events = await rt.hub.wait(job_id, after, wait)
    body = b'{"job":' + orjson.dumps(job_id) + b',"events":[' + b",".join(
        e.wire for e in events) + b"]}"
    return Response(body, media_type="application/json")


@router.get("/jobs/{job_id}/stream", response_class=StreamingResponse,
            responses={204: {"description": "the job ended before the given seq"},
                       **errors(401, 404, 429),
                       503: {"model": ErrorOut, "description": "the database is unavailable, "
                             "or this process is at its live-connection limit; retry later"}})
async def stream(job_id: JobId, rt: RuntimeDep, caller: StreamCaller, request: Request,
                 after: int = Query(0, ge=0),
                 last_event_id: str | None = Header(None)) -> Response:
    """Server-Sent Events: `id` is the seq; reconnecting with Last-Event-ID resumes."""
    who = caller.owner
    job = await owned_job(rt, job_id, who)
    if last_event_id is not None:
        try:
            after = max(after, int(last_event_id))
        except ValueError:
            raise bad_last_event_id("a seq number") from None
    if job.status.terminal and after >= job.seq:
        return Response(status_code=204)  # tells EventSource to stop reconnecting
    slot = connections(request).acquire(who or SERVICE)
    if isinstance(slot, Refusal):
        raise HTTPException(slot.status, slot.reason)

    async def frames() -> AsyncIterator[bytes]:
        try:
            async with rt.hub.stream(job_id, after, rt.settings.buffer_bytes) as queue:
                # The session ending or the JWT expiring ends the stream (None: as if
                # it fell behind; the reconnect is refused if the token no longer works).
                unwatch = rt.live.watch(caller, lambda _reason: queue.put_nowait(None))
                try:
                    while True:
                        try:
                            ev = await asyncio.wait_for(queue.get(), SSE_KEEPALIVE)
                        except TimeoutError:
                            yield b": keepalive\n\n"
                            continue
                        if ev is None:
                            # Fell behind (the client reconnects with Last-Event-ID), or
                            # the session ended.
                            return
                        yield b"id: %d\nevent: %s\ndata: %s\n\n" % (
                            ev.seq, ev.type.encode(), ev.wire)
                        if ev.terminal:
                            return
                finally:
                    unwatch()
        finally:
            slot.release()

    body = frames()
    slot.tie_to(body)
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class Reply(bytes):
    """A control reply: always sent as a frame of its own, never inside an event array.
    It has an "op", which no event has, so its bytes never equal an event's."""


# At most this many bytes of frames kept by a flusher round for other sockets: when each
# socket's output differs (many catching up on different jobs), no more is held than
# before sharing.
ROUND_FRAMES_BYTES = 8 << 20


class RoundFrames:
    """The frames built in one flusher round, by what they send: the frame cap, then the
    pending messages (the same objects for every socket following the same jobs live, so
    they compare by identity). Equal messages make equal frames, and a reply never
    equals an event, so it never takes an event's place in an array."""

    __slots__ = ("built", "room")

    def __init__(self) -> None:
        self.built: dict[tuple[object, ...], list[bytes]] = {}
        self.room = ROUND_FRAMES_BYTES

    def take(self, session: SocketSession) -> list[bytes]:
        """The frames that send all of `session.out`, found or built (taking it)."""
        key = (session.rt.settings.ws_max_frame_bytes, *session.out)
        if (found := self.built.get(key)) is not None:
            return found
        size = session.queued
        found = session.take_frames()
        if size <= self.room:
            self.room -= size
            self.built[key] = found
        return found


class Flusher:
    """Sends the pending output of every WebSocket of this event loop, in rounds: one
    task for all sockets, none per socket. After a round it pauses at least as long as
    the round took, so however many sockets there are, half the loop's time is left to
    make and commit the events; those made meanwhile go to each socket together, as one
    frame, in the next round. Within a round, sockets with the same pending events (all
    following one job live) share the frames built for the first of them."""

    __slots__ = ("dirty", "task")

    def __init__(self) -> None:
        self.dirty: dict[SocketSession, None] = {}  # in the order they had output
        self.task: asyncio.Task[None] | None = None

    def mark(self, session: SocketSession) -> None:
        self.dirty[session] = None
        if self.task is None:
            self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.dirty:
                sessions, self.dirty = self.dirty, {}
                began = loop.time()
                shared = RoundFrames()
                for session in sessions:
                    try:
                        session.flush(shared)
                    except Exception:  # one socket's failure must not hold up the others
                        log.exception("writing to a WebSocket failed")
                del shared  # not held while pausing
                await asyncio.sleep(max(loop.time() - began,
                                        min(PACE_MAX, len(sessions) * PACE_PER_SOCKET)))
        finally:
            self.task = None


_flushers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Flusher] = (
    weakref.WeakKeyDictionary())


def flusher() -> Flusher:
    loop = asyncio.get_running_loop()
    if (found := _flushers.get(loop)) is None:
        found = _flushers[loop] = Flusher()
    return found


class SocketSession:
    """One WebSocket: its subscriptions and its outgoing messages, bounded in bytes.

    Whatever is pending when the socket's turn comes goes out in one frame: a reply
    alone, or the events queued up to the next reply as one JSON array (one event alone
    stays a plain object, its frame built once for every socket). Under `jobwire serve`
    frames go straight to the transport (api/frames.py); otherwise a pump task sends them
    through ASGI while there is output. Idle, a session holds no task or future.
    """

    __slots__ = ("backlog", "closing", "drained", "feed", "flusher", "gone", "limit", "lone",
                 "out", "pump", "queued", "raw", "rt", "subs", "who", "ws")

    def __init__(self, ws: WebSocket, who: str | None) -> None:
        self.ws = ws
        self.who = who
        self.rt: Runtime = ws.app.state.runtime  # started: `websocket` checked
        self.limit = self.rt.settings.buffer_bytes
        self.raw: RawSocket | None = (ws.scope.get("extensions") or {}).get(
            frames.EXTENSION)
        if self.raw is not None:  # its writable() then means "at most half the buffer"
            self.raw.pause_above(self.limit // 2)
        self.flusher = flusher()
        self.subs: dict[str, Subscription] = {}
        self.feed: Watch | None = None  # the owner feed (api/ownerfeed.py): one at most
        self.out: list[bytes] = []  # not yet sent, in order (replies are `Reply`s)
        self.lone: Event | None = None  # the event, when `out` holds it alone
        self.queued = 0  # bytes in `out`
        self.backlog = 0  # the raw socket's backlog after its last write (not per event)
        self.closing: tuple[int, str] | None = None  # (code, reason) the pump closes with
        self.gone = False  # the endpoint has ended: nothing more to send
        self.pump: asyncio.Task[None] | None = None  # ASGI sends and the close
        self.drained: asyncio.Event | None = None  # replays waiting for `out` to half empty

    def held(self) -> int:
        """Bytes sent to this socket and not yet read by it, as far as this process
        knows: pending here plus, on a raw socket, the transport's backlog."""
        return self.queued + self.backlog

    def send(self, message: Event | Reply) -> None:
        """Queues a reply, or an event of a subscription (this is their `deliver`): run
        per event x subscriber, so it calls nothing it can do itself."""
        if isinstance(message, Event):
            if message.type in TERMINAL_EVENTS:  # the hub closes the subscription itself
                self.subs.pop(message.job, None)
            payload: bytes = message.wire
            lone: Event | None = message
        else:
            payload, lone = message, None
        if self.closing:
            return
        size = len(payload)
        # (A message bigger than the whole buffer still goes through, alone.)
        if (held := self.queued + self.backlog) and held + size > self.limit:
            # The client does not read: drop it instead of growing without bound, and
            # stop fanning events out to it. It reconnects and resumes from its last seq.
            self.closing = (1013, "too slow: reconnect and resume from your seq")
            self.close()
            self.flusher.mark(self)
            return
        out = self.out
        if out:  # marked already: the flusher (or the pump) sends all of `out`
            self.lone = None
        else:
            self.lone = lone
            self.flusher.mark(self)
        out.append(payload)
        self.queued += size

    async def ready(self) -> None:
        """Paces replays from the store to what the client reads, so catching up on a
        long log never counts as too slow."""
        if self.raw is not None:
            self.backlog = self.raw.backlog
        if self.closing or self.held() <= self.limit // 2:
            return
        if self.raw is not None:
            self.flush()  # into the transport, which says when the client has read it
            await self.raw.writable()
            return
        if self.drained is None:
            self.drained = asyncio.Event()
        await self.drained.wait()

    def reply(self, **fields: Any) -> None:
        self.send(Reply(orjson.dumps(fields)))

    def drop(self, job: str) -> bool:
        sub = self.subs.pop(job, None)
        if sub is not None:
            sub.close()
        return sub is not None

    async def handle(self, raw: str) -> None:
        if self.closing:
            return  # the client must reconnect first
        try:
            msg = loads(raw, self.rt.settings.max_json_depth)
        except TooDeep as exc:
            self.reply(op="error", error=str(exc))
            return
        except orjson.JSONDecodeError:
            msg = None
        if isinstance(msg, dict) and msg.get("op") in ownerfeed.OPS:
            await ownerfeed.handle(self, msg)
            return
        if not isinstance(msg, dict) or not isinstance(msg.get("job"), str):
            self.reply(op="error", error='expected {"op": "subscribe"|"unsubscribe", '
                       '"job": "<id>", "after": <seq>}')
            return
        op, job = msg.get("op"), msg["job"]
        if op == "unsubscribe":
            self.drop(job)
            self.reply(op="unsubscribed", job=job)
        elif op == "subscribe":
            after = msg.get("after", 0)
            if not isinstance(after, int) or isinstance(after, bool) or after < 0:
                self.reply(op="error", job=job, error="after must be a seq number >= 0")
                return
            await self.subscribe(job, after)
        else:
            self.reply(op="error", job=job, error=f"unknown op {op!r}")

    async def subscribe(self, job: str, after: int) -> None:
        if job in self.subs:
            self.drop(job)  # a re-subscribe moves the cursor
        limit = self.rt.settings.max_subscriptions
        if len(self.subs) >= limit:
            self.reply(op="error", job=job, code=429,
                       error=f"too many subscriptions: at most {limit} per connection; "
                             "unsubscribe first")
            return
        try:
            if "\x00" in job or await self.rt.store.get_job(job, self.who) is None:
                self.reply(op="error", job=job, code=404, error="job not found")
                return
            self.reply(op="subscribed", job=job, after=after)
            sub = await self.rt.hub.subscribe(job, after, self.send, self.ready)
        except StoreError as exc:  # the database is down: say so, keep the socket
            self.reply(op="error", job=job, code=503, error=str(exc))
            return
        # Its terminal event may already have been delivered (and the subscription closed)
        # while the hub started: then there is nothing left to hold.
        if not sub.closed and not self.closing:
            self.subs[job] = sub
        else:
            sub.close()

    def _take(self) -> list[bytes]:
        """Takes the next frame's messages from `out`: a reply alone, else the events up
        to the next reply, at most a frame's size of them (one bigger event goes alone)."""
        out, cap = self.out, self.rt.settings.ws_max_frame_bytes
        size = n = 0
        while n < len(out) and not isinstance(out[n], Reply) and (
                n == 0 or size + len(out[n]) < cap):
            size += len(out[n])
            n += 1
        n = max(n, 1)
        taken = out[:n]
        del out[:n]
        self.queued -= size or len(taken[0])  # (a reply: not counted above)
        return taken

    @staticmethod
    def _join(messages: list[bytes]) -> bytes:
        return messages[0] if len(messages) == 1 else b"[" + b",".join(messages) + b"]"

    def flush(self, shared: RoundFrames | None = None) -> None:
        """Sends what is pending: on a raw socket written now (its frames found in or
        added to `shared`, a flusher round's), else by the pump. The pump also sends the
        close a `closing` session owes."""
        if self.gone:
            return
        raw = self.raw
        if raw is not None:
            if self.out:
                if (ev := self.lone) is not None:  # one event: its frame, built once
                    if ev.frame is None:
                        ev.frame = frames.text_frame(ev.wire)
                    raw.write(ev.frame)
                else:
                    for frame in shared.take(self) if shared is not None else self.take_frames():
                        if not raw.write(frame):
                            break  # closing or gone: the receive loop ends the session
                self.out.clear()
                self.lone = None
                self.queued = 0
            self.backlog = raw.backlog
        if (self.out or self.closing) and self.pump is None:
            self.pump = asyncio.create_task(self._pump())

    def take_frames(self) -> list[bytes]:
        """All of `out` as frames, in order."""
        built = []
        while self.out:
            built.append(frames.text_frame(self._join(self._take())))
        return built

    async def _pump(self) -> None:
        try:
            while self.out:  # only without a raw socket
                frame = self._join(self._take())
                if self.drained is not None and self.queued <= self.limit // 2:
                    self.drained.set()
                    self.drained = None
                await self.ws.send_text(frame.decode())
                del frame
            if self.closing:
                self.gone = True  # nothing may follow the close
                await self.ws.close(*self.closing)
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the peer went away: the receive loop sees it and ends the session
        finally:
            self.pump = None

    def close(self) -> None:
        for job in list(self.subs):
            self.drop(job)
        if self.feed is not None:
            self.feed.close()

    def end(self, reason: str) -> None:
        """The session or token that authenticated the socket ended: nothing more goes
        out, not even what is pending, and the socket closes with 4401 and `reason`."""
        self.closing = (4401, reason)
        self.close()
        self.out.clear()
        self.lone = None
        self.queued = 0
        if self.drained is not None:  # a replay waiting for room: let it see the end
            self.drained.set()
            self.drained = None
        self.flusher.mark(self)


async def websocket(ws: WebSocket) -> None:
    """Authenticate by the app's hook (a mounted jobwire), header, cookie or
    {"op":"auth","token":T} as the first frame (`?token=` too, for old clients); subscribe
    with {"op":"subscribe","job":ID,"after":N}; events arrive as {"job","seq","type",
    "data","at"} in seq order, replay first, then live. A frame is one JSON object (a
    reply, or one event) or a JSON array of events in order."""
    await ws.accept()
    try:
        rt = runtime(ws)
    except NotStarted as exc:
        await ws.close(code=1011, reason=str(exc))
        return
    if (refused := cross_site(ws, allow_query=True)) is not None:
        await ws.close(code=4403, reason=refused)
        return
    try:
        caller = await socket_caller(ws, rt.store, rt.settings.ws_auth_seconds)
    except WebSocketDisconnect:
        return
    except HTTPException as exc:  # 4401, 4403 (another site), 4500 (the app's hook)
        await ws.close(code=4000 + exc.status_code, reason=str(exc.detail))
        return
    except StoreError:
        await ws.close(code=1011, reason="the database is unavailable; retry later")
        return
    session = SocketSession(ws, caller.owner)  # before the slot: nothing between it and `try`
    slot = connections(ws).acquire(caller.owner or SERVICE)
    if isinstance(slot, Refusal):
        await ws.close(code=slot.ws_code, reason=slot.reason)
        return
    unwatch = rt.live.watch(caller, session.end)
    try:
        # No task per connection while idle: this coroutine waits on the socket, and
        # the pump (which also sends the 1013 close) exists only while there is output.
        while (message := await ws.receive())["type"] != "websocket.disconnect":
            if message.get("text") is None:
                await ws.close(code=1003, reason="send JSON text frames")
                break
            await session.handle(message["text"])
    except (WebSocketDisconnect, RuntimeError):
        pass  # the peer went away mid-send
    finally:
        unwatch()
        slot.release()
        session.close()
        session.gone = True
        if session.pump is not None:
            session.pump.cancel()
            with contextlib.suppress(BaseException):
                await session.pump


# A plain Starlette route: FastAPI's WebSocket route would hold two AsyncExitStacks and
# a copy of the scope per connection for dependencies this endpoint does not use.
router.add_websocket_route(f"{router.prefix}/ws", websocket)  # (not prefixed by itself)
