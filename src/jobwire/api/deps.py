"""FastAPI dependencies: the process runtime and the calling owner."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Path
from starlette.requests import HTTPConnection

from jobwire.api.auth import authenticate, owner_of, redeem, token_of
from jobwire.api.identity import Caller
from jobwire.api.schemas import NO_NUL
from jobwire.model import Job
from jobwire.server import Runtime


def runtime(conn: HTTPConnection) -> Runtime:
    rt: Runtime = conn.app.state.runtime
    return rt


async def _runtime(conn: HTTPConnection) -> Runtime:
    """`runtime` as a dependency: async, since FastAPI runs a plain function in a worker
    thread (a thread hand-over per request, ~10% of a small request's cost)."""
    return runtime(conn)


RuntimeDep = Annotated[Runtime, Depends(_runtime)]


async def owner(conn: HTTPConnection, rt: RuntimeDep) -> str:
    """The owner a write acts as: the service key must name one."""
    who = await owner_of(conn, rt.store)
    if who is None:
        raise HTTPException(400, "X-Jobwire-Owner header required: the service key writes "
                                 "only as a named owner")
    return who


async def reader(conn: HTTPConnection, rt: RuntimeDep) -> str | None:
    """The owner whose jobs a read sees; None: every owner's (the service key alone)."""
    return await owner_of(conn, rt.store)


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
    """The job if `who` owns it; 404 alike for missing and foreign jobs, so ids reveal nothing."""
    job = await rt.store.get_job(job_id, who)
    if job is None:
        raise HTTPException(404, "job not found")
    return job
