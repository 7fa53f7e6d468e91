"""Wires a store, the hub, workers and the HTTP API into one process, and runs it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI

from jobwire import redact
from jobwire.app import Jobwire
from jobwire.hub import Hub
from jobwire.sessions import LiveSessions
from jobwire.settings import Settings
from jobwire.store import Store, open_store
from jobwire.worker import Worker


@dataclasses.dataclass
class Runtime:
    """Everything a request handler needs, reachable as `request.app.state.runtime`."""

    settings: Settings
    jobwire: Jobwire
    store: Store
    hub: Hub
    worker: Worker | None
    live: LiveSessions


def create_server(settings: Settings, jobwire: Jobwire) -> FastAPI:
    from jobwire.api import create_api

    @contextlib.asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[None]:
        store = open_store(settings.db, max_active_jobs=settings.max_active_jobs)
        await store.open()
        hub = Hub(store)
        worker = None
        if settings.concurrency > 0:
            worker = Worker(jobwire, store, concurrency=settings.concurrency,
                            lease_seconds=settings.lease_seconds,
                            retention_seconds=settings.retention_seconds,
                            max_items=settings.max_items_per_job,
                            threads=settings.sync_threads or None,
                            task_timeout=settings.task_timeout or None)
            await worker.start()
        live = LiveSessions()
        checker = asyncio.create_task(live.run(store, settings.session_check_seconds))
        api.state.runtime = Runtime(settings, jobwire, store, hub, worker, live)
        try:
            yield
        finally:
            checker.cancel()
            if worker is not None:
                await worker.stop()
            await store.close()

    return create_api(lifespan, settings)


def serve(settings: Settings, jobwire: Jobwire) -> None:
    # Access lines and WebSocket handshake lines carry the query string: no token in them.
    # (uvicorn's logging setup replaces handlers, not logger filters, so this stays.)
    redact.install("uvicorn.access", "uvicorn.error")

    from jobwire.api.public import trusted_proxies

    # X-Forwarded-For/-Proto count only from JOBWIRE_TRUSTED_PROXIES (uvicorn's default
    # trusts 127.0.0.1: any local process could then pick its own address, and so its
    # own rate limit); uvicorn sets the client and scheme from them, rightmost untrusted
    # hop first.
    proxies = trusted_proxies(settings.trusted_proxies)
    # No permessage-deflate: its per-socket zlib state costs ~150 KB per WebSocket and a
    # compression of every event for every subscriber (bench/README.md: 2.5x the memory of
    # 10,000 idle sockets, half the fan-out rate), for events of a few hundred bytes.
    uvicorn.run(create_server(settings, jobwire), host=settings.host, port=settings.port,
                log_level="info", ws_max_size=settings.ws_max_frame_bytes,
                ws_per_message_deflate=False,
                proxy_headers=bool(proxies), forwarded_allow_ips=proxies or None)
