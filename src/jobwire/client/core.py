"""The async client: submits and manages jobs, and keeps one live feed per watched job
(one server subscription, however many watchers) over one shared connection."""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import AsyncGenerator, Awaitable, Callable
from datetime import datetime
from types import TracebackType

import httpx

from jobwire.client.api import Api
from jobwire.client.backoff import Backoff
from jobwire.client.connection import Connection, ws_url_of
from jobwire.client.errors import JobCancelled, JobFailed, JobwireError, SessionNotFound, TokenError
from jobwire.client.feed import Feed
from jobwire.client.flight import SingleFlight
from jobwire.client.ownerlist import JobList
from jobwire.client.session import SessionFile
from jobwire.client.snapshot import JSON, Snapshot

# What an identity SDK offers for short-lived tokens (getToken): each call returns a valid one.
TokenSource = Callable[[], str | Awaitable[str]]


class Client:
    """A jobwire client for one server.

    Without `token` it uses the guest session saved in `state_file` for this URL, or
    creates one on first use (and saves it). `token` may be a function (sync or async)
    returning a short-lived token: it is called before each WebSocket and once after a
    401 or a close for an expired token, so the client outlives every token it uses.
    With `state_file` it also records which jobs it watches, so `recover()` in a
    restarted process resumes them.
    `ws_url`, `poll_wait`, `backoff` (base, cap seconds) and the httpx `transport` tune
    how it talks to the server. A watcher that falls more than `backlog` states behind
    skips its oldest ones (it always gets the latest and the terminal state).
    """

    def __init__(self, url: str, token: str | TokenSource | None = None, *,
                 state_file: str | os.PathLike[str] | None = None,
                 ws_url: str | None = None, poll_wait: float = 25.0,
                 backoff: tuple[float, float] = (0.2, 10.0),
                 timeout: float = 30.0, backlog: int = 256,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self.session = SessionFile(state_file, self.url) if state_file is not None else None
        # A token given by the caller is theirs to replace; a guest one we renew ourselves,
        # and one from the caller's function by calling it again.
        self._source = token if callable(token) else None
        fixed = token if isinstance(token, str) else None
        renew = self._renew if fixed is None else None
        if token is None and self.session is not None:
            fixed = self.session.token
        self.http = httpx.AsyncClient(base_url=self.url, timeout=timeout, transport=transport)
        self.api = Api(self.http, fixed, renew)
        self._new_token = SingleFlight(self._create_session if self._source is None
                                       else self._ask_source)
        self._recovering = SingleFlight(self._recover)
        self._backoff = backoff
        self.connection = Connection(ws_url or ws_url_of(self.url), self.api,
                                     self._new_backoff, poll_wait,
                                     self._socket_token if self._source is not None else None)
        self.feeds: dict[str, Feed] = {}
        self.backlog = backlog

    @property
    def token(self) -> str | None:
        return self.api.token

    def _new_backoff(self) -> Backoff:
        return Backoff(*self._backoff)

    async def _renew(self, rejected: str | None) -> str:
        if self.api.token is not None and self.api.token != rejected:
            return self.api.token  # another call already replaced it
        return await self._new_token()

    async def _ask_source(self) -> str:
        assert self._source is not None
        try:
            token = self._source()
            if inspect.isawaitable(token):
                token = await token
        except Exception as exc:  # the host's SDK: offline, signed out, a bug
            # A JobwireError, so a socket waiting for it falls back to polling and tries
            # again later instead of its connection task dying, and a call says why.
            raise TokenError(f"the token function raised {exc!r}") from exc
        if not isinstance(token, str) or not token:
            raise JobwireError(f"the token function returned {type(token).__name__}, "
                               "not a token string")
        return token

    async def _socket_token(self) -> str:
        """A fresh token for a new socket: the last one may expire while it is open."""
        self.api.authorize(await self._renew(self.api.token))
        assert self.api.token is not None
        return self.api.token

    async def _create_session(self) -> str:
        token, owner = await self.api.new_session()
        if self.session is not None:
            self.session.save_token(token, owner)
        return token

    async def login(self, user_token: str) -> int:
        """Switch to a user's token (from `jobwire users add`), bringing this client's guest
        jobs along: the server moves them to the user in one transaction, and the guest
        token stops working (an expired guest session has none to bring). Returns how many
        jobs moved; Unauthorized if the server does not know `user_token`."""
        guest, owner, moved = self.api.token, "user", 0
        if guest is None or guest == user_token:
            await self.api.check(user_token)  # nothing to bring along: is the token good?
        else:
            try:
                owner, moved = await self.api.claim(user_token, guest)
            except SessionNotFound:
                pass  # expired, so nothing to bring; the server did accept the user's token
        self.api.renew = None  # a user's token is not ours to replace with a guest one
        self.connection.renew_token = self._source = None
        self.api.authorize(user_token)
        if self.session is not None:
            self.session.save_token(user_token, owner, keep_jobs=True)
        return moved

    # --- jobs -------------------------------------------------------------------------

    async def submit(self, task: str, input: JSON = None, key: str | None = None, *,
                     delay: float | None = None, run_at: datetime | str | None = None,
                     priority: int | None = None) -> tuple[dict[str, JSON], bool]:
        """(job snapshot, created): created is False when an active job of this owner,
        task and key already existed and is returned instead. With `delay` (seconds) or
        `run_at` (an aware datetime, or ISO 8601 text with a zone) the job does not start
        before then. `priority`: within the range the task allows (else 422)."""
        return await self.api.submit(task, input, key, delay, run_at, priority)

    def jobs(self, status: str | None = None, limit: int = 50,
             id_prefix: str | None = None) -> JobList:
        """The owner's jobs, newest first; status "active" means queued or running, and
        `id_prefix` (lowercase hex) keeps the ids starting with it. Awaited: one read.
        Iterated (`async for jobs in client.jobs(status="active")`): the whole list (all
        of it: `limit` and `id_prefix` do not apply) now and after every creation, status
        change or deletion, from one server feed however many loops read it."""
        return JobList(lambda: self.api.jobs(status, limit, id_prefix),
                       lambda: self._live_jobs(status))

    async def _live_jobs(self, status: str | None) -> AsyncGenerator[list[dict[str, JSON]]]:
        owned = self.connection.owner_list
        owned.readers += 1
        if owned.readers == 1:
            self.connection.watch_jobs()
        try:
            async for jobs in owned.lists(status):
                yield jobs
        finally:
            owned.readers -= 1
            if owned.readers == 0:
                self.connection.unwatch_jobs()

    async def job(self, job_id: str) -> dict[str, JSON]:
        return await self.api.job(job_id)

    async def cancel(self, job_id: str) -> dict[str, JSON]:
        """Cancel a queued job at once, or ask a running one to stop."""
        return await self.api.cancel(job_id)

    async def delete(self, job_id: str) -> None:
        """Delete an ended job (JobActive while it is queued or running)."""
        await self.api.delete(job_id)

    # --- live -------------------------------------------------------------------------

    def _feed(self, job_id: str) -> Feed:
        feed = self.feeds.get(job_id)
        if feed is None:
            feed = self.feeds[job_id] = Feed(job_id, self.api, self.connection,
                                             self._new_backoff, self._feed_closed,
                                             self.backlog)
            if self.session is not None:
                self.session.add_job(job_id)
            feed.start()
        return feed

    def _feed_closed(self, feed: Feed) -> None:
        if self.feeds.get(feed.job_id) is feed:
            del self.feeds[feed.job_id]
        ended = feed.state is not None and feed.state.terminal
        if self.session is not None and (ended or feed.error is not None):
            self.session.remove_job(feed.job_id)  # nothing left to recover

    async def watch(self, job_id: str) -> AsyncGenerator[Snapshot, None]:
        """The job's states, each consistent at one seq, in seq order, ending with the
        terminal one. Watchers of one job share one feed; stopping early (break, or
        aclose()) leaves it, and the last one to leave ends the subscription."""
        feed = self._feed(job_id)
        queue = feed.attach()
        try:
            while (got := await queue.get()) is not None:
                if isinstance(got, JobwireError):
                    raise got
                yield got
        finally:
            feed.detach(queue)

    async def wait(self, job_id: str) -> JSON:
        """The job's result once it completes; JobFailed or JobCancelled otherwise."""
        last: Snapshot | None = None
        async with contextlib.aclosing(self.watch(job_id)) as states:
            async for state in states:
                last = state
        if last is None or not last.terminal:
            raise JobwireError(f"the client was closed before job {job_id} ended")
        if last.status == "failed":
            raise JobFailed(dict(last.job))
        if last.status == "cancelled":
            raise JobCancelled(dict(last.job))
        return last.result

    async def recover(self) -> list[dict[str, JSON]]:
        """The owner's active jobs, each watched from now on until it ends (so `watch`
        joins a live feed); jobs saved in the state file are watched again too, even
        if they ended meanwhile, so their outcome is not lost. Concurrent calls share
        one request and its result."""
        return await self._recovering()

    async def _recover(self) -> list[dict[str, JSON]]:
        active = await self.api.jobs("active", limit=500)
        saved = self.session.jobs if self.session is not None else []
        for job_id in dict.fromkeys([j["id"] for j in active] + saved):
            self._feed(job_id).keep()
        return active

    # --- lifetime ---------------------------------------------------------------------

    async def aclose(self) -> None:
        """Ends every watcher, closes the socket and the HTTP client."""
        for feed in list(self.feeds.values()):
            feed.close()
        await self.connection.aclose()
        await self.http.aclose()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()
