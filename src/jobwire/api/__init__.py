"""The HTTP, Server-Sent Events and WebSocket API, plus the pages and static assets."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from jobwire.api import admin, jobs, live, metrics, ownerfeed, pages
from jobwire.api.headers import SecurityHeaders
from jobwire.api.identity import Identity
from jobwire.api.limits import BodyLimit, OwnerSlots
from jobwire.api.public import Cors, Origins, RateLimit, SameOrigin
from jobwire.app import InputError
from jobwire.settings import Settings
from jobwire.store import StoreError

STATIC = Path(__file__).resolve().parent.parent / "web" / "static"


def create_api(lifespan: Callable[[FastAPI], AbstractAsyncContextManager[Any]],
               settings: Settings) -> FastAPI:
    api = FastAPI(title="jobwire", version="0.1.0", lifespan=lifespan)
    api.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    api.state.origins = Origins(settings.allowed_origins)
    api.add_middleware(SameOrigin, origins=api.state.origins)  # before any body is read
    # Outermost, so BodyLimit's refusals carry the headers too.
    api.add_middleware(SecurityHeaders, exempt=frozenset(
        url for url in (api.docs_url, api.redoc_url, api.swagger_ui_oauth2_redirect_url) if url))
    api.add_middleware(Cors, origins=api.state.origins)  # outermost: refusals readable too
    api.state.connections = OwnerSlots(settings.max_connections,
                                       settings.max_live_connections)
    api.state.session_rate = RateLimit.parse(settings.session_rate)
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

    @api.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": str(exc)})

    @api.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
                  for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": errors})

    return api
