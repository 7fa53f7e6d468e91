"""`jobwire serve --processes N`: N server processes on one port, for an API that needs
more than one CPU.

Each process is forked before it builds anything (its runtime, store, hub and workers are
its own, as if started alone) and binds the port with SO_REUSEPORT, so the kernel spreads
connections over them. What one process writes reaches the others' subscribers through
the database, as between any processes sharing it (store/doorbell.py on SQLite,
LISTEN/NOTIFY on PostgreSQL). A process that dies is replaced; SIGTERM or SIGINT to the
supervisor stops each the way a lone server stops (running jobs handed back). The
processes sit in a process group of their own, so a terminal's Ctrl-C reaches them once,
through the supervisor; and each stops itself should the supervisor be killed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

log = logging.getLogger("jobwire")

# A process that exits of itself this soon after it started failed to start (the port
# taken, the database unreachable): the others would too, so all stop rather than restart
# forever. One killed by a signal is replaced, after a pause if it was this young.
STARTUP_SECONDS = 5.0
RESTART_PAUSE_SECONDS = 1.0
ORPHAN_CHECK_SECONDS = 1.0


def supervise(processes: int, serve: Callable[[], int]) -> int:
    """Runs `serve` in `processes` forked processes until SIGTERM or SIGINT, replacing any
    that dies; the exit status (1 if one failed to start)."""
    children: dict[int, float] = {}  # pid -> when it started
    stopping = False
    failed = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def start() -> None:
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:
            _child(supervisor, serve)
        children[pid] = time.monotonic()
        if stopping:  # SIGTERM came during the fork
            os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for _ in range(processes):
        start()
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        started = children.pop(pid, None)
        if started is None or stopping:
            continue
        code = os.waitstatus_to_exitcode(status)  # -N: killed by signal N
        young = time.monotonic() - started < STARTUP_SECONDS
        if young and code >= 0:
            log.error("server process %d exited as it started (status %d): stopping all",
                      pid, code)
            failed = True
            stop()
            continue
        log.warning("server process %d ended (status %d); starting another", pid, code)
        if young:  # killed as it started: not in a tight loop
            time.sleep(RESTART_PAUSE_SECONDS)
        if not stopping:
            start()
    return 1 if failed else 0


def _child(supervisor: int, serve: Callable[[], int]) -> None:
    """In a forked process: serve, then exit without returning into the supervisor's code."""
    code = 1
    try:
        os.setpgid(0, 0)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)  # the server installs its own
        threading.Thread(target=_stop_when_orphaned, args=(supervisor,), daemon=True).start()
        code = serve()
    except BaseException:
        log.exception("server process %d failed", os.getpid())
    finally:
        logging.shutdown()
        os._exit(code)


def _stop_when_orphaned(supervisor: int) -> None:
    while os.getppid() == supervisor:
        time.sleep(ORPHAN_CHECK_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)
