"""The HTTP, Server-Sent Events and WebSocket API, plus the pages and static assets."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from jobwire.api import admin, jobs, live, metrics, ownerfeed, pages
from jobwire.api.auth import Authenticate
from jobwire.api.headers import SecurityHeaders
from jobwire.api.identity import Identity
from jobwire.api.limits import BodyLimit, OwnerSlots
from jobwire.api.public import Cors, Origins, RateLimit, SameOrigin
from jobwire.app import InputError
from jobwire.runtime import NotFound, NotStarted, Runtime
from jobwire.store import JobActive, StoreError, TooManyActive

STATIC = Path(__file__).resolve().parent.parent / "web" / "static"
# When an owner at the active-job cap may try again: jobs end at no predictable time, and
# a client retrying every few seconds costs one cheap refused submit each time.
RETRY_AFTER = "5"


def create_api(rt: Runtime, *, authenticate: Authenticate | None = None,
               builtin_auth: bool | None = None) -> FastAPI:
    """The API, dashboard and static files of `rt`. As a top-level app its lifespan runs
    the runtime; mounted in another app, the host's lifespan must (see jobwire.embed).

    `authenticate(conn)` names the owner of a request from the host's own sign-in;
    `builtin_auth` keeps jobwire's own sessions (guest sessions, user tokens) for the
    requests it answers None for: by default only without a hook, so an app with its
    own sign-in does not also let anonymous visitors run jobs."""
    settings = rt.settings
    api = FastAPI(title="jobwire", version="0.1.0", lifespan=rt.lifespan)
    api.state.runtime = rt
    api.state.authenticate = authenticate
    api.state.builtin_auth = authenticate is None if builtin_auth is None else builtin_auth
    api.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    api.state.origins = Origins(settings.allowed_origins)
    api.add_middleware(SameOrigin, origins=api.state.origins)  # before any body is read
    # Outermost, so BodyLimit's refusals carry the headers too.
    api.add_middleware(SecurityHeaders, exempt=frozenset(
        url for url in (api.docs_url, api.redoc_url, api.swagger_ui_oauth2_redirect_url) if url))
    api.add_middleware(Cors, origins=api.state.origins)  # outermost: refusals readable too
    api.state.connections = OwnerSlots(settings.max_connections,
                                       settings.max_live_connections)
    api.state.session_rate = RateLimit.parse(settings.session_rate).share(settings.processes)
    api.state.identity = Identity(settings)
    api.include_router(ownerfeed.router)  # before jobs': /jobs/stream is no job id
    api.include_router(jobs.router)
    api.include_router(admin.router)
    api.include_router(live.router)
    api.include_router(metrics.router)
    api.include_router(pages.router)
    api.mount("/static", StaticFiles(directory=STATIC), name="static")

    @api.exception_handler(InputError)
    async def input_error(request: Request, exc: InputError) -> JSONResponse:
        # Same shape as FastAPI's own validation errors, so clients parse one format.
        return JSONResponse(status_code=422, content={"detail": [
            {"loc": ["body", *exc.loc], "msg": exc.msg, "type": exc.type}]})

    @api.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse(status_code=404, content={"detail": "job not found"})

    @api.exception_handler(JobActive)
    async def job_active(request: Request, exc: JobActive) -> JSONResponse:
        return JSONResponse(status_code=409, content={"detail": str(exc)})

    @api.exception_handler(TooManyActive)
    async def too_many_active(request: Request, exc: TooManyActive) -> JSONResponse:
        return JSONResponse(status_code=429, content={"detail": str(exc)},
                            headers={"Retry-After": RETRY_AFTER})

    @api.exception_handler(NotStarted)
    async def not_started(request: Request, exc: NotStarted) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": str(exc)})

    @api.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": str(exc)})

    @api.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
                  for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": errors})

    return api
