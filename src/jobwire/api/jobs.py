"""REST routes: sessions, submitting, listing, reading, cancelling and deleting jobs."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, HTTPException, Query, Request, Response

from jobwire import periodic
from jobwire.api import cursor
from jobwire.api.auth import (
    COOKIE,
    bearer_token,
    hash_token,
    new_session,
    new_ticket,
    owner_of,
    session_caller,
)
from jobwire.api.bodies import BodyRoute
from jobwire.api.cursor import MAX_CURSOR
from jobwire.api.deps import CallerDep, JobId, Owner, Reader, RuntimeDep, owned_job, runtime
from jobwire.api.public import check_session_rate
from jobwire.api.schemas import (
    NO_NUL,
    ClaimOut,
    ClaimRequest,
    ErrorOut,
    ItemsOut,
    JobOut,
    SessionOut,
    SignInRequest,
    SubmitOut,
    SubmitRequest,
    TicketOut,
    errors,
)
from jobwire.model import valid_owner
from jobwire.runtime import EVERY_OWNER, ID_PREFIX, MAX_LIST, NotFound, Runtime, StatusFilter
from jobwire.store import OwnerConflict

router = APIRouter(prefix="/api", responses=errors(503), route_class=BodyRoute)

NEXT_CURSOR = "X-Next-Cursor"


@router.post("/sessions", status_code=201, response_model=SessionOut,
             response_model_exclude_unset=True, responses={
    200: {"model": SessionOut, "description": "the caller's session (bearer or cookie), "
          "which is valid: returned as it is, not replaced"},
    **errors(403, 429)})
async def create_session(rt: RuntimeDep, request: Request, response: Response
                         ) -> dict[str, str | None]:
    """A new guest session. The token is also set as an HttpOnly cookie for browsers.
    A caller that already has a valid session keeps it: 200 with its owner, and the
    token only if it came as a bearer token (a cookie's stays out of reach of scripts)."""
    try:
        who = await owner_of(request, rt.store)
    except HTTPException:
        who = None  # none, or not valid any more: a new one
    if who is not None:  # (the service key alone is no owner: it gets a new guest too)
        response.status_code = 200
        return {"token": bearer_token(request), "owner": who}
    if not request.app.state.builtin_auth:
        raise HTTPException(403, "guest sessions are off: this app signs you in")
    check_session_rate(request)
    token, who = await new_session(rt.store, ttl=rt.settings.guest_ttl_seconds)
    set_cookie(rt, request, response, token, rt.settings.guest_ttl_seconds)
    # Said, so a page can tell its visitor why their jobs are gone; not by whom: the
    # cookie's holder need not be the user who claimed it.
    ended = bearer_token(request) is None and COOKIE in request.cookies
    return {"token": token, "owner": who, **({"previous": "ended"} if ended else {})}


# How long a browser keeps a user's token signed in: user tokens do not expire, and
# browsers keep a cookie at most about this long anyway.
USER_COOKIE_SECONDS = 400 * 24 * 3600.0


def set_cookie(rt: Runtime, request: Request, response: Response, token: str,
               seconds: float) -> None:
    """The session cookie: HttpOnly, so no script of the page (or injected into it) reads
    the token; SameSite=Strict, so no other site's request carries it."""
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict", max_age=int(seconds),
                        secure=rt.settings.secure_cookies or request.url.scheme == "https")


@router.post("/sessions/signin", response_model=ClaimOut, responses={
    **errors(401, 413),
    403: {"model": ErrorOut, "description": "not a user's token, or a cross-site request"},
    409: {"model": ErrorOut,
          "description": "an active job of each side has the same task and key"}})
async def sign_in(body: SignInRequest, rt: RuntimeDep, request: Request, response: Response
                  ) -> dict[str, object]:
    """Sign a browser in as a user (the dashboard's Sign in): `token` is one of the user's
    tokens (`jobwire users add`). The guest session of the request's cookie, if it has
    one, is claimed by the user as by /sessions/claim, and the cookie then holds the
    user's token, still out of reach of the page's scripts."""
    if not request.app.state.builtin_auth:
        raise HTTPException(403, "jobwire's own sign-in is off: this app signs you in")
    user = await session_caller(rt.store, body.token)
    if user.owner is None or not user.owner.startswith("user:"):
        raise HTTPException(403, "not a user's token: sign in with a token from "
                                 "`jobwire users add`")
    moved = 0
    guest = request.cookies.get(COOKIE)
    if guest is not None and guest != body.token:
        try:
            claimed = await rt.store.claim_session(hash_token(guest), user.owner)
        except OwnerConflict as exc:
            raise HTTPException(409, str(exc)) from None
        if claimed is not None:  # (the cookie was no guest's, or no longer valid: kept)
            moved = claimed
            rt.live.end(hash_token(guest))
    set_cookie(rt, request, response, body.token, USER_COOKIE_SECONDS)
    return {"owner": user.owner, "moved": moved}


@router.post("/tickets", status_code=201, response_model=TicketOut, responses=errors(400, 401))
async def create_ticket(rt: RuntimeDep, caller: CallerDep) -> dict[str, object]:
    """A single-use ticket for the caller's session, valid for `expires_in` seconds: pass it
    as `?ticket=` to `/stream` where the token cannot go in a header (EventSource). The
    stream it opens ends with the session, like one opened with the token."""
    ttl = rt.settings.ticket_seconds
    return {"ticket": await new_ticket(rt.store, caller, ttl), "expires_in": ttl}


@router.post("/sessions/claim", response_model=ClaimOut, responses={
    **errors(400, 401, 413),
    403: {"model": ErrorOut, "description": "the caller is not a user, or a cross-site "
          "request with the session cookie"},
    404: {"model": ErrorOut, "description": "no such guest session, or it expired"},
    409: {"model": ErrorOut,
          "description": "an active job of each side has the same task and key"}})
async def claim_session(body: ClaimRequest, rt: RuntimeDep, who: Owner) -> dict[str, object]:
    """Move a guest session's jobs to the calling user (the user's token authorizes, the
    guest's token is in the body), all or none; the guest token then stops working."""
    if not who.startswith("user:"):
        raise HTTPException(403, "only a user can claim a guest session: send a user's token")
    guest = hash_token(body.token)
    try:
        moved = await rt.store.claim_session(guest, who)
    except OwnerConflict as exc:
        raise HTTPException(409, str(exc)) from None
    if moved is None:
        raise HTTPException(404, "guest session not found or expired")
    rt.live.end(guest)  # its sockets here close now; other processes' at their next check
    return {"owner": who, "moved": moved}


@router.post("/jobs", status_code=201, response_model=SubmitOut,
             responses={200: {"model": SubmitOut, "description": "an active job with this key"},
                        **errors(400, 401, 403, 413),
                        429: {"model": ErrorOut, "description": (
                            "the owner has the most active jobs allowed "
                            "(JOBWIRE_MAX_ACTIVE_JOBS); a submit of an active job's key "
                            "is never refused"),
                            "headers": {"Retry-After": {
                                "description": "seconds to wait before submitting again",
                                "schema": {"type": "integer"}}}}})
async def submit(body: SubmitRequest, request: Request, who: Owner) -> Response:
    """A job, run as soon as a worker is free, or not before `delay` seconds (measured by
    the database's clock) or `run_at`. Dedup applies to a delayed job like any other."""
    # The runtime is not a dependency here: `who` has checked it is running.
    job, created = await runtime(request).submit_checked(who, body)
    # Encoded here rather than checked against SubmitOut and encoded again: the hot route.
    return Response(orjson.dumps({"created": created, "job": job.snapshot()}),
                    status_code=201 if created else 200, media_type="application/json")


@router.get("/jobs", response_model=list[JobOut], responses={
    200: {"description": "a page of jobs, newest first", "headers": {NEXT_CURSOR: {
        "description": "present when the page is full: pass it as `before` for the next",
        "schema": {"type": "string"}}}},
    **errors(400, 401, 403)})
async def list_jobs(rt: RuntimeDep, who: Reader, response: Response,
                    status: StatusFilter | None = None,
                    limit: int = Query(50, ge=1, le=MAX_LIST),
                    owner: str | None = Query(None, max_length=210),
                    id_prefix: str | None = Query(None, pattern=ID_PREFIX),
                    task: str | None = Query(None, min_length=1, max_length=200,
                                             pattern=NO_NUL),
                    since: float | None = Query(None, ge=0, allow_inf_nan=False),
                    until: float | None = Query(None, ge=0, allow_inf_nan=False),
                    before: str | None = Query(None, max_length=MAX_CURSOR)
                    ) -> list[dict[str, object]]:
    """The caller's jobs, newest first. `status=active` is queued and running only;
    `id_prefix` keeps the ids starting with it (a short id as the dashboard shows it);
    `task`, and `since`/`until` (epoch seconds: created in [since, until)) filter.
    The service key without X-Jobwire-Owner lists every owner's, or `owner`'s.
    A full page has an X-Next-Cursor header: `before=` it resumes after the page's last
    job, so jobs created meanwhile never shift a page (the list itself stays a list)."""
    if owner is not None:
        if who is not None:
            raise HTTPException(403, "the owner filter is for the service key without "
                                     "X-Jobwire-Owner")
        who = listable_owner(owner)
    if since is not None and until is not None and until <= since:
        raise cursor.invalid("until", "must be after since")
    jobs = await rt.list(EVERY_OWNER if who is None else who, status, limit, id_prefix,
                         task=task, since=since, until=until,
                         before=None if before is None else cursor.decode(before))
    if len(jobs) == limit:
        response.headers[NEXT_CURSOR] = cursor.encode(jobs[-1])
    return [j.snapshot() for j in jobs]


def listable_owner(owner: str) -> str:
    """`owner` if the service key may list it: a session's owner or the periodic jobs'."""
    if valid_owner(owner) is None and owner != periodic.OWNER:
        raise HTTPException(400, f"owner must be user:<id>, guest:<id> or {periodic.OWNER}")
    return owner


@router.get("/jobs/{job_id}", response_model=JobOut, responses=errors(401, 404))
async def get_job(job_id: JobId, rt: RuntimeDep, who: Reader) -> dict[str, object]:
    return (await owned_job(rt, job_id, who)).snapshot()


@router.get("/jobs/{job_id}/items", response_model=ItemsOut, responses=errors(401, 404))
async def get_items(job_id: JobId, rt: RuntimeDep, who: Reader) -> dict[str, object]:
    """The job's items at one seq: their states agree with the job's counts at that seq."""
    found = await rt.store.job_with_items(job_id, who)
    if found is None:
        raise NotFound(job_id)
    job, items = found
    return {"job": job.id, "seq": job.seq, "items": [i.as_dict() for i in items]}


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, responses=errors(401, 403, 404))
async def cancel(job_id: JobId, rt: RuntimeDep, who: Owner) -> dict[str, object]:
    """Cancel a queued job at once, or ask a running one to stop. Idempotent."""
    return (await rt.cancel(who, job_id)).snapshot()


@router.delete("/jobs/{job_id}", status_code=204,
               responses=errors(401, 403, 404, 409))
async def delete(job_id: JobId, rt: RuntimeDep, who: Owner) -> Response:
    await rt.delete(who, job_id)
    return Response(status_code=204)
