"""The server's REST API as typed calls: one request each, errors raised as client errors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any
from urllib.parse import quote

import httpx

from jobwire.client.errors import (
    ApiError,
    JobNotFound,
    JobwireError,
    SessionNotFound,
    Unavailable,
    api_error,
)
from jobwire.client.snapshot import JSON, Snapshot

# Given the token the server rejected (None: there is none yet), returns one to use.
Renew = Callable[[str | None], Awaitable[str]]


def _error(r: httpx.Response) -> ApiError:
    """The error for FastAPI's `detail`, flattened into its message: a validation error
    names each field it rejects (and keeps them, for a caller to name them its way)."""
    try:
        detail = r.json().get("detail", r.text)
    except (ValueError, AttributeError):
        return api_error(r.status_code, r.text or r.reason_phrase)
    if isinstance(detail, list):
        fields = [d for d in detail if isinstance(d, dict)]
        return api_error(r.status_code, "; ".join(
            ".".join(str(p) for p in d.get("loc", []) if p != "body") + ": " + str(d.get("msg"))
            for d in fields) or str(detail), fields)
    return api_error(r.status_code, str(detail))


def _path(job_id: str, rest: str = "") -> str:
    return f"/api/jobs/{quote(job_id, safe='')}{rest}"  # an id never escapes its route


class Api:
    """REST calls against one server. With `renew`, the first call fetches a token and a
    401 fetches a new one once and retries (a saved guest session can expire, or the
    server's database be reset)."""

    def __init__(self, http: httpx.AsyncClient, token: str | None = None,
                 renew: Renew | None = None) -> None:
        self.http = http
        self.token: str | None = None
        self.renew = renew
        if token is not None:
            self.authorize(token)

    def authorize(self, token: str) -> None:
        self.token = token
        self.http.headers["Authorization"] = f"Bearer {token}"

    async def request(self, method: str, path: str, *, auth: bool = True,
                      **kwargs: Any) -> httpx.Response:
        if auth and self.token is None and self.renew is not None:
            self.authorize(await self.renew(None))
        for attempt in (1, 2):
            try:
                r = await self.http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                raise Unavailable(f"cannot reach {self.http.base_url}: "
                                  f"{exc or type(exc).__name__}") from exc
            if r.status_code == 401 and auth and self.renew is not None and attempt == 1:
                self.authorize(await self.renew(self.token))
                continue
            if r.status_code >= 400:
                raise _error(r)
            return r
        raise AssertionError("unreachable")  # the loop returns or raises

    async def json(self, method: str, path: str, **kwargs: Any) -> Any:
        r = await self.request(method, path, **kwargs)
        try:
            return r.json()
        except ValueError:
            raise JobwireError(f"{self.http.base_url} did not answer like a jobwire server "
                               f"({method} {path}: {r.status_code}, not JSON)") from None

    async def new_session(self) -> tuple[str, str]:
        """A fresh guest session: (token, owner)."""
        data = await self.json("POST", "/api/sessions", auth=False)
        self.http.cookies.clear()  # the header carries the token, not the browser cookie
        return str(data["token"]), str(data["owner"])

    async def claim(self, user_token: str, guest_token: str) -> tuple[str, int]:
        """Move the guest session's jobs to the user: (the user's owner id, jobs moved)."""
        try:
            data = await self.json("POST", "/api/sessions/claim", auth=False,
                                   json={"token": guest_token},
                                   headers={"Authorization": f"Bearer {user_token}"})
        except JobNotFound as exc:  # the route's 404 is about the guest session
            raise SessionNotFound(exc.status, exc.detail) from None
        return str(data["owner"]), int(data["moved"])

    async def check(self, token: str) -> None:
        """Unauthorized unless the server knows `token` (a cheap authenticated read)."""
        await self.request("GET", "/api/jobs", auth=False, params={"limit": 1},
                           headers={"Authorization": f"Bearer {token}"})

    async def submit(self, task: str, input: JSON, key: str | None, delay: float | None = None,
                     run_at: datetime | str | None = None, priority: int | None = None
                     ) -> tuple[dict[str, JSON], bool]:
        body: dict[str, JSON] = {"task": task, "input": input}
        if key is not None:
            body["key"] = key
        if delay is not None:
            body["delay"] = delay
        if run_at is not None:
            body["run_at"] = run_at.isoformat() if isinstance(run_at, datetime) else run_at
        if priority is not None:
            body["priority"] = priority
        data = await self.json("POST", "/api/jobs", json=body)
        return data["job"], bool(data["created"])

    async def jobs(self, status: str | None = None, limit: int = 50,
                   id_prefix: str | None = None) -> list[dict[str, JSON]]:
        params: dict[str, JSON] = {"limit": limit}
        if status is not None:
            params["status"] = status
        if id_prefix is not None:
            params["id_prefix"] = id_prefix
        jobs: list[dict[str, JSON]] = await self.json("GET", "/api/jobs", params=params)
        return jobs

    async def job(self, job_id: str) -> dict[str, JSON]:
        job: dict[str, JSON] = await self.json("GET", _path(job_id))
        return job

    async def events(self, job_id: str, after: int, wait: float = 0) -> list[dict[str, JSON]]:
        """Events with seq > after; with `wait`, a long-poll held up to that many seconds."""
        got = await self.json("GET", _path(job_id, "/events"),
                              params={"after": after, "wait": wait},
                              timeout=httpx.Timeout(wait + 10.0))
        events: list[dict[str, JSON]] = got["events"]
        return events

    async def cancel(self, job_id: str) -> dict[str, JSON]:
        job: dict[str, JSON] = await self.json("POST", _path(job_id, "/cancel"))
        return job

    async def delete(self, job_id: str) -> None:
        await self.request("DELETE", _path(job_id))

    async def state(self, job_id: str) -> Snapshot:
        """The job and its items at one seq. Items are read consistently with the counts;
        the job row, read just before, is brought up to the items' seq by folding the
        events in between, so both describe the same seq."""
        while True:
            job = await self.job(job_id)
            got = await self.json("GET", _path(job_id, "/items"))
            snap = Snapshot(job, {})
            while snap.seq < got["seq"]:
                events = await self.events(job_id, snap.seq)
                if not events or events[0]["seq"] != snap.seq + 1:
                    break  # the log moved under us (pruned?): read again
                for ev in events:
                    if ev["seq"] > got["seq"]:
                        break
                    snap = snap.apply(ev)
            if snap.seq == got["seq"]:
                return Snapshot(snap.job, {it["ref"]: it for it in got["items"]})

