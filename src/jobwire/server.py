"""Wires a store, the hub, workers and the HTTP API into one process, and runs it."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI

from jobwire.app import Jobwire
from jobwire.hub import Hub
from jobwire.store import Store, open_store
from jobwire.worker import Worker


def _env_limit(name: str, default: int) -> int:
    """A limit's default, overridable by the environment variable JOBWIRE_<NAME>."""
    return dataclasses.field(
        default_factory=lambda: int(os.environ.get(f"JOBWIRE_{name.upper()}", default)))


@dataclasses.dataclass
class Settings:
    db: str = "sqlite:///jobwire.db"
    app: str = "jobwire.demo:jobwire"
    host: str = "127.0.0.1"
    port: int = 8000
    concurrency: int = 10  # jobs run at once by this process's worker; 0 runs none
    lease_seconds: float = 30.0
    retention_seconds: float = 24 * 3600.0
    guest_ttl_seconds: float = 30 * 24 * 3600.0
    # Limits on what one client may use (docs/guarantees.md); each refusal says which.
    max_body_bytes: int = _env_limit("max_body_bytes", 1 << 20)
    max_items_per_job: int = _env_limit("max_items_per_job", 100_000)
    max_subscriptions: int = _env_limit("max_subscriptions", 1_000)  # per WebSocket
    max_connections: int = _env_limit("max_connections", 100)  # WS + SSE per owner
    ws_buffer_bytes: int = _env_limit("ws_buffer_bytes", 4 << 20)  # queued for one socket
    ws_max_frame_bytes: int = _env_limit("ws_max_frame_bytes", 64 << 10)


@dataclasses.dataclass
class Runtime:
    """Everything a request handler needs, reachable as `request.app.state.runtime`."""

    settings: Settings
    jobwire: Jobwire
    store: Store
    hub: Hub
    worker: Worker | None


def create_server(settings: Settings, jobwire: Jobwire) -> FastAPI:
    from jobwire.api import create_api

    @contextlib.asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[None]:
        store = open_store(settings.db)
        await store.open()
        hub = Hub(store)
        worker = None
        if settings.concurrency > 0:
            worker = Worker(jobwire, store, concurrency=settings.concurrency,
                            lease_seconds=settings.lease_seconds,
                            retention_seconds=settings.retention_seconds,
                            max_items=settings.max_items_per_job)
            await worker.start()
        api.state.runtime = Runtime(settings, jobwire, store, hub, worker)
        try:
            yield
        finally:
            if worker is not None:
                await worker.stop()
            await store.close()

    return create_api(lifespan, settings)


def serve(settings: Settings, jobwire: Jobwire) -> None:
    uvicorn.run(create_server(settings, jobwire), host=settings.host, port=settings.port,
                log_level="info", ws_max_size=settings.ws_max_frame_bytes)
