"""FastAPI dependencies: the process runtime and the calling owner."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import Depends, HTTPException, Path
from starlette.requests import HTTPConnection

from jobwire.api.auth import authenticate, owner_of, redeem, token_of
from jobwire.api.identity import Caller
from jobwire.api.schemas import NO_NUL
from jobwire.model import Job
from jobwire.runtime import EVERY_OWNER, NotStarted, Runtime

log = logging.getLogger("jobwire")

NOT_STARTED = ("jobwire was mounted but never started: enter `jobs.lifespan()` in your "
               "app's lifespan")


def runtime(conn: HTTPConnection) -> Runtime:
    """The runtime of the app serving `conn`; NotStarted (503) when it is not running,
    which for a mounted app means the host never entered its lifespan: said loudly, on
    every request, rather than losing the request."""
    rt: Runtime = conn.app.state.runtime
    if not rt.started:
        log.error(NOT_STARTED)
        raise NotStarted(NOT_STARTED)
    return rt


async def _runtime(conn: HTTPConnection) -> Runtime:
    """`runtime` as a dependency: async, since FastAPI runs a plain function in a worker
    thread (a thread hand-over per request, ~10% of a small request's cost)."""
    return runtime(conn)


RuntimeDep = Annotated[Runtime, Depends(_runtime)]


async def owner(conn: HTTPConnection) -> str:
    """The owner a write acts as: the service key must name one. (The runtime is looked
    up here, not as a sub-dependency: each one costs FastAPI's resolver on every submit.)"""
    who = await owner_of(conn, runtime(conn).store)
    if who is None:
        raise HTTPException(400, "X-Jobwire-Owner header required: the service key writes "
                                 "only as a named owner")
    return who


async def reader(conn: HTTPConnection) -> str | None:
    """The owner whose jobs a read sees; None: every owner's (the service key alone)."""
    return await owner_of(conn, runtime(conn).store)


async def caller(conn: HTTPConnection, rt: RuntimeDep) -> Caller:
    return await authenticate(conn, rt.store, token_of(conn, allow_query=False))


async def stream_caller(conn: HTTPConnection, rt: RuntimeDep) -> Caller:
    """Like `caller`, also taking ?ticket= or ?token= (EventSource cannot set headers)."""
    ticket = conn.query_params.get("ticket")
    if ticket:
        return await redeem(rt.store, ticket)
    return await authenticate(conn, rt.store, token_of(conn, allow_query=True))


JobId = Annotated[str, Path(max_length=200, pattern=NO_NUL)]
Owner = Annotated[str, Depends(owner)]
Reader = Annotated[str | None, Depends(reader)]
CallerDep = Annotated[Caller, Depends(caller)]
StreamCaller = Annotated[Caller, Depends(stream_caller)]


async def owned_job(rt: Runtime, job_id: str, who: str | None) -> Job:
    """The job if `who` owns it (None: any owner's); NotFound (404) alike for missing and
    foreign jobs, so ids reveal nothing."""
    return await rt.get(EVERY_OWNER if who is None else who, job_id)
