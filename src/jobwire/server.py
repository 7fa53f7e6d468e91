"""`jobwire serve`: one runtime and its API as a top-level app, run by uvicorn."""

from __future__ import annotations

import logging
import socket
from typing import Any

import uvicorn
from fastapi import FastAPI

from jobwire import redact
from jobwire.api import create_api
from jobwire.api.frames import FrameProtocol
from jobwire.app import Jobwire
from jobwire.runtime import Runtime
from jobwire.settings import Settings
from jobwire.supervisor import supervise

STARTUP_FAILURE = 3  # as uvicorn.run exits when the server could not start


def create_server(settings: Settings, jobwire: Jobwire) -> FastAPI:
    """The API as a top-level app: its own lifespan starts and stops the runtime."""
    return create_api(Runtime(jobwire, settings))


def serve(settings: Settings, jobwire: Jobwire) -> int:
    """Serves until stopped; the exit status."""
    # Access lines and WebSocket handshake lines carry the query string: no token in them.
    # (uvicorn's logging setup replaces handlers, not logger filters, so this stays.)
    redact.install("uvicorn.access", "uvicorn.error")

    from jobwire.api.public import trusted_proxies

    # X-Forwarded-For/-Proto count only from JOBWIRE_TRUSTED_PROXIES (uvicorn's default
    # trusts 127.0.0.1: any local process could then pick its own address, and so its
    # own rate limit); uvicorn sets the client and scheme from them, rightmost untrusted
    # hop first.
    proxies = trusted_proxies(settings.trusted_proxies)
    processes = f" in {settings.processes} processes" if settings.processes > 1 else ""
    logging.getLogger("jobwire").info("serving http://%s:%d/ on %s%s", settings.host,
                                      settings.port, settings.describe(), processes)
    # No permessage-deflate: its per-socket zlib state costs ~150 KB per WebSocket and a
    # compression of every event for every subscriber (bench/README.md: 2.5x the memory of
    # 10,000 idle sockets, half the fan-out rate), for events of a few hundred bytes.
    options: dict[str, Any] = dict(
        host=settings.host, port=settings.port, log_level="info",
        access_log=settings.access_log, ws_max_size=settings.ws_max_frame_bytes,
        ws_per_message_deflate=False, ws=FrameProtocol, proxy_headers=bool(proxies),
        forwarded_allow_ips=proxies or None)
    if settings.processes == 1:
        uvicorn.run(create_server(settings, jobwire), **options)
        return 0

    def one() -> int:
        """One of the processes (jobwire.supervisor): its own app, its own socket."""
        family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        try:
            sock = socket.create_server((settings.host, settings.port), family=family,
                                        backlog=2048, reuse_port=True)
        except OSError as exc:
            logging.getLogger("jobwire").error("cannot listen on %s:%d: %s", settings.host,
                                               settings.port, exc)
            return STARTUP_FAILURE
        server = uvicorn.Server(uvicorn.Config(create_server(settings, jobwire), **options))
        server.run(sockets=[sock])
        return 0 if server.started else STARTUP_FAILURE

    return supervise(settings.processes, one)
