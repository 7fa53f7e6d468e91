"""The operator's routes (the page at /admin): counts across owners and a manual retry.

Only the service key, without X-Jobwire-Owner, may call them: it is the one caller that
reads across owners (docs/identity.md). Listing is `GET /api/jobs` with that key; cancel
and delete are the owner's own routes, called with X-Jobwire-Owner set to the job's owner.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Query
from starlette.requests import HTTPConnection

from jobwire.api.auth import owner_of
from jobwire.api.deps import JobId, RuntimeDep, owned_job
from jobwire.api.jobs import listable_owner
from jobwire.api.schemas import errors
from jobwire.app import Submission
from jobwire.model import Status


async def operator(conn: HTTPConnection, rt: RuntimeDep) -> None:
    """401 without a valid token; 403 for any caller but the service key acting as no one."""
    if await owner_of(conn, rt.store) is not None:
        raise HTTPException(403, "operator routes take the service key alone "
                                 "(no X-Jobwire-Owner)")


router = APIRouter(prefix="/api/admin", responses=errors(401, 403, 503),
                   dependencies=[Depends(operator)])


@router.get("/counts", responses=errors(400))
async def counts(rt: RuntimeDep, owner: str | None = Query(None, max_length=210)
                 ) -> dict[str, int]:
    """Jobs by status, every status named (0 when none): every owner's, or `owner`'s."""
    found = await rt.store.count_by_status(None if owner is None else listable_owner(owner))
    return {s.value: found.get(s.value, 0) for s in Status}


@router.post("/jobs/{job_id}/retry", status_code=201, responses=errors(404, 409, 429))
async def retry(job_id: JobId, rt: RuntimeDep) -> dict[str, object]:
    """Submit a failed or cancelled job again, as a new job of its owner with its task,
    input and key: the job itself stays as it ended, for the record. If an active job
    of that key exists meanwhile, that job is the answer (`created` false). It keeps the
    job's priority (a 422 naming it if the task no longer allows it)."""
    job = await owned_job(rt, job_id, None)
    if job.status not in (Status.FAILED, Status.CANCELLED):
        raise HTTPException(409, f"the job is {job.status.value}: only a failed or "
                                 "cancelled job can be retried")
    new, created = await rt.submit_checked(
        job.owner, Submission(task=job.task, input=job.input, key=job.key,
                              priority=job.priority))
    return {"retried": job.id, "created": created, "job": new.snapshot()}
