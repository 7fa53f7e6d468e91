"""The client's one WebSocket, shared by all its jobs: reconnects with backoff and
resumes every subscription, and long-polls instead while the socket cannot be opened."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from jobwire.client.api import Api
from jobwire.client.backoff import Backoff
from jobwire.client.errors import JobwireError, Unauthorized, Unavailable, api_error
from jobwire.client.feed import Feed
from jobwire.client.ownerlist import OwnerList
from jobwire.client.poller import Poller

log = logging.getLogger("jobwire.client")

BAD_TOKEN = 4401  # the server's close code for a missing, invalid or expired token


def messages(frame: str | bytes) -> list[Any]:
    """The messages one WebSocket frame carries, in order: the server sends one JSON
    object (a reply or an event) or a JSON array of events it coalesced into one frame.
    Raises orjson.JSONDecodeError when the frame is not JSON."""
    msg = orjson.loads(frame)
    return msg if isinstance(msg, list) else [msg]


def ws_url_of(base_url: str) -> str:
    scheme, sep, rest = base_url.rstrip("/").partition("://")
    return {"https": "wss"}.get(scheme, "ws") + sep + rest + "/api/ws"


class Connection:
    """Routes each subscribed job's events to its feed.

    One background task owns the socket. While it is up, subscribing sends
    {"op": "subscribe", "after": <feed's seq>}; after any reconnect every live feed is
    subscribed again from its own seq, so nothing is lost or repeated. When opening
    the socket fails (refused, a proxy rejects the upgrade, or it closes before any
    message, as with the server's 4429) each feed gets a poller until a later socket
    delivers its first message; the socket is retried with backoff.

    With `renew_token` every socket opens with a token it returns, and a socket closed
    4401 (the token expired) is replaced like any other; only when the next one is
    closed 4401 too before it worked do the feeds fail, rather than loop.
    """

    def __init__(self, url: str, api: Api, backoff: Callable[[], Backoff],
                 poll_wait: float,
                 renew_token: Callable[[], Awaitable[str]] | None = None) -> None:
        self.url = url
        self.api = api
        self.renew_token = renew_token
        self._refused = False  # a socket closed 4401 and none has worked since
        self.poll_wait = poll_wait
        self._backoff_factory = backoff
        self._backoff = backoff()
        self.feeds: dict[str, Feed] = {}
        self.pollers: dict[str, Poller] = {}
        self.polling = False
        self._ws: ClientConnection | None = None
        self._outbox: asyncio.Queue[bytes] = asyncio.Queue()
        self._wanted = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self.owner_list = OwnerList()
        self.watching_jobs = False

    @property
    def mode(self) -> str:
        """"socket", "polling" or "connecting" (for tests and status displays). A socket
        that is open but has not yet proved it works is not in use yet: the pollers go
        on until its first message."""
        return "polling" if self.polling else "socket" if self._ws is not None else "connecting"

    def subscribe(self, feed: Feed) -> None:
        self.feeds[feed.job_id] = feed
        self._want()
        if self._ws is not None:
            self._send(op="subscribe", job=feed.job_id, after=feed.seq)
        elif self.polling:
            self._poll(feed)

    def watch_jobs(self) -> None:
        """Follow the owner feed (all statuses: each reader filters) into `owner_list`."""
        self.watching_jobs = True
        self._want()
        if self._ws is not None:
            self._send_watch()

    def unwatch_jobs(self) -> None:
        self.watching_jobs = False
        if self._ws is not None:
            self._send(op="unwatch_jobs")
        if not self.feeds:
            self._wanted.clear()

    def _send_watch(self) -> None:
        self._send(op="watch_jobs", status=None, after=self.owner_list.cursor)

    def _want(self) -> None:
        self._wanted.set()
        if self._runner is None:
            self._runner = asyncio.create_task(self._run())

    def unsubscribe(self, feed: Feed) -> None:
        if self.feeds.get(feed.job_id) is not feed:
            return
        del self.feeds[feed.job_id]
        poller = self.pollers.pop(feed.job_id, None)
        if poller is not None:
            poller.stop()
        if self._ws is not None and not (feed.state and feed.state.terminal):
            self._send(op="unsubscribe", job=feed.job_id)  # the server drops ended jobs itself
        if not self.feeds and not self.watching_jobs:
            self._wanted.clear()

    def _send(self, **message: object) -> None:
        self._outbox.put_nowait(orjson.dumps(message))

    def _poll(self, feed: Feed) -> None:
        """Poll the job unless it is polled already: one poller per job, whatever asks."""
        if feed.job_id not in self.pollers:
            self.pollers[feed.job_id] = Poller(feed, self.api, self.poll_wait,
                                               self._backoff_factory())

    def _start_polling(self) -> None:
        self.polling = True
        for feed in self.feeds.values():
            self._poll(feed)

    def _stop_polling(self) -> None:
        self.polling = False
        for poller in self.pollers.values():
            poller.stop()
        self.pollers.clear()

    async def _run(self) -> None:
        while True:
            await self._wanted.wait()
            try:
                token = self.api.token if self.renew_token is None else await self.renew_token()
                ws = await connect(self.url, open_timeout=10, max_size=None,
                                   additional_headers={"Authorization": f"Bearer {token}"})
            except (OSError, TimeoutError, InvalidHandshake, InvalidURI, JobwireError) as exc:
                log.debug("cannot open %s (%s): long-polling", self.url, exc)
                self._start_polling()
            else:
                if not await self._use(ws):
                    # Closed before saying anything (e.g. 4429: too many connections,
                    # or a proxy that drops upgrades): as good as not opened.
                    self._start_polling()
            await asyncio.sleep(self._backoff.next())

    async def _use(self, ws: ClientConnection) -> bool:
        """Serves the socket until it closes; False if nothing ever came through it."""
        worked = False
        self._ws = ws
        self._outbox = asyncio.Queue()
        for feed in self.feeds.values():
            self._send(op="subscribe", job=feed.job_id, after=feed.seq)
        if self.watching_jobs:
            self._send_watch()  # from its cursor: the changes since, not the list again
        writer = asyncio.create_task(self._write(ws, self._outbox))
        try:
            async with ws:
                async for raw in ws:
                    if not worked:  # pollers stop only once the socket proves it works
                        worked = True
                        self._stop_polling()
                        self._backoff.reset()  # the next drop retries quickly
                        self._refused = False
                    self._dispatch(raw)
        except ConnectionClosed:
            pass
        finally:
            self._ws = None
            writer.cancel()
        if ws.close_code == BAD_TOKEN and (self.renew_token is None or self._refused):
            self._refused = False
            for feed in list(self.feeds.values()):
                feed.fail(Unauthorized(401, ws.close_reason or "invalid or expired token"))
        elif ws.close_code == BAD_TOKEN:
            self._refused = True  # the next socket asks for a fresh token
        log.debug("socket closed (%s): reconnecting", ws.close_code)
        return worked

    @staticmethod
    async def _write(ws: ClientConnection, outbox: asyncio.Queue[bytes]) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.send((await outbox.get()).decode())

    def _dispatch(self, raw: str | bytes) -> None:
        try:
            batch = messages(raw)
        except orjson.JSONDecodeError:
            return
        for msg in batch:
            if isinstance(msg, dict):
                self._dispatch_one(msg)

    def _dispatch_one(self, msg: dict[str, Any]) -> None:
        if msg.get("op") == "jobs":
            if self.watching_jobs:  # (else: late, and resumed from the cursor if watched again)
                self.owner_list.fold(msg)
            return
        job = msg.get("job")
        feed = self.feeds.get(job) if isinstance(job, str) else None
        if feed is None:
            return  # not (or no longer) subscribed: ignore
        op = msg.get("op")
        if op is None:
            feed.deliver([msg])
        elif op == "error":
            error = api_error(int(msg.get("code", 400)), str(msg.get("error")))
            if isinstance(error, Unavailable) or error.status == 429:
                # The socket cannot carry this job now (its database is down, or no more
                # subscriptions fit): poll it, retrying, until the next socket takes it.
                self._poll(feed)
            else:
                feed.fail(error)

    async def aclose(self) -> None:
        self._stop_polling()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner  # leaving `async with ws` closes the socket
