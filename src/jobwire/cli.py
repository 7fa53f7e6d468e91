"""The `jobwire` command: run servers and workers, migrate, manage users, and (through
jobwire.client.cli) submit, watch, list, cancel and delete jobs."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence

from jobwire.app import Jobwire, check_queue, load
from jobwire.client import cli as client_cli
from jobwire.settings import SettingError, Settings
from jobwire.store import StoreError, open_store

MAX_PROCESSES = 64


class CLIError(Exception):
    """A problem the user can fix; printed without a traceback."""


def _db_default() -> str:
    return os.environ.get("JOBWIRE_DB", Settings.db)


def _add_db(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=_db_default(),
                   help="sqlite:///path.db or postgresql://… (env JOBWIRE_DB; default %(default)s)")


def _add_runtime(p: argparse.ArgumentParser) -> None:
    _add_db(p)
    p.add_argument("--app", default=Settings.app, help="module:attribute of a jobwire.Jobwire")
    p.add_argument("--concurrency", type=int, default=Settings.concurrency,
                   help="jobs run at once by this process (default %(default)s)")
    p.add_argument("--lease", type=float, default=Settings.lease_seconds,
                   help="seconds a worker holds a job without a heartbeat (default %(default)s)")
    p.add_argument("--retention", type=float, default=Settings.retention_seconds,
                   help="seconds finished jobs are kept (default %(default)s)")
    p.add_argument("--queue", action="append", dest="queues", metavar="NAME",
                   help="claim only jobs of this queue (repeatable; default: every queue)")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="jobwire", description=__doc__)
    root.add_argument("-v", "--verbose", action="store_true")
    sub = root.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the API, the dashboard and (unless --no-workers) workers")
    _add_runtime(p)
    p.add_argument("--host", default=Settings.host)
    p.add_argument("--port", type=int, default=Settings.port)
    p.add_argument("--no-workers", action="store_true", help="serve the API only")
    p.add_argument("--no-access-log", action="store_true",
                   help="no log line per request (env JOBWIRE_ACCESS_LOG=0)")
    p.add_argument("--processes", type=int, default=1,
                   help="server processes sharing the port, each with its own workers and "
                        f"limits' share (1-{MAX_PROCESSES}; default %(default)s)")

    p = sub.add_parser("worker", help="run workers only")
    _add_runtime(p)

    p = sub.add_parser("migrate", help="create or upgrade the database schema")
    _add_db(p)

    p = sub.add_parser("users", help="manage users")
    users = p.add_subparsers(dest="users_command", required=True)
    add = users.add_parser("add", help="create user NAME and print its token")
    add.add_argument("--new-token", action="store_true",
                     help="NAME exists: issue another token (the others keep working)")
    revoke = users.add_parser("revoke", help="revoke all of NAME's tokens (live connections "
                              "using them close within seconds)")
    tokens = users.add_parser("tokens", help="list NAME's tokens (ids, never the tokens)")
    for p in (add, revoke, tokens):
        p.add_argument("name")
        _add_db(p)
    client_cli.add_commands(sub)
    return root


def _settings(args: argparse.Namespace) -> tuple[Settings, Jobwire]:
    if args.concurrency < 0 or args.lease <= 0 or args.retention <= 0:
        raise CLIError("--concurrency must be >= 0, --lease and --retention > 0")
    try:
        queues = None if args.queues is None else tuple(check_queue(q) for q in args.queues)
    except ValueError as exc:
        raise CLIError(f"--queue: {exc}") from None
    try:
        jobwire = load(args.app)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    settings = Settings(db=args.db, app=args.app, concurrency=args.concurrency,
                        lease_seconds=args.lease, retention_seconds=args.retention,
                        queues=queues)
    return settings, jobwire


async def _run_worker(settings: Settings, jobwire: Jobwire) -> None:
    from jobwire.runtime import Runtime

    settings.concurrency = settings.concurrency or 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Runtime(jobwire, settings) as rt:
        assert rt.worker is not None
        logging.getLogger("jobwire").info("worker %s running on %s", rt.worker.id,
                                          settings.describe())
        await stop.wait()


async def _migrate(url: str) -> None:
    store = open_store(url)
    await store.open()
    await store.close()


async def _users(args: argparse.Namespace) -> str:
    """What `jobwire users …` prints."""
    from jobwire.api.auth import new_session

    name = args.name.strip()
    if not name or len(name) > 100 or ":" in name:
        raise CLIError("a user name is 1 to 100 characters without ':'")
    owner = f"user:{name}"
    store = open_store(args.db)
    await store.open()
    try:
        if args.users_command == "revoke":
            return f"revoked {await store.revoke_sessions(owner)} token(s) of {name}"
        sessions = await store.sessions_of(owner)
        if args.users_command == "tokens":
            # A token is never shown again: its id is the start of its hash.
            return "\n".join(f"{h[:8]}  created {_utc(created)}"
                             f"{'' if expires is None else '  expires ' + _utc(expires)}"
                             for h, created, expires in sessions) or f"{name} has no tokens"
        if sessions and not args.new_token:
            raise CLIError(f"user {name} exists ({len(sessions)} token(s)); "
                           "--new-token issues another")
        token, _ = await new_session(store, owner, ttl=None)
        return token
    finally:
        await store.close()


def _processes(n: int) -> int:
    if not 1 <= n <= MAX_PROCESSES:
        raise CLIError(f"--processes must be from 1 to {MAX_PROCESSES}, not {n}")
    if n > 1 and not (hasattr(os, "fork") and hasattr(socket, "SO_REUSEPORT")):
        raise CLIError("--processes above 1 needs fork() and SO_REUSEPORT (Linux, BSD, macOS)")
    return n


def _utc(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def run(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command in client_cli.COMMANDS:
        return client_cli.run(args)  # before logging setup: httpx would log every request
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        settings, jobwire = _settings(args)
        settings.host, settings.port = args.host, args.port
        if args.no_workers:
            settings.concurrency = 0
        if args.no_access_log:
            settings.access_log = False
        settings.processes = _processes(args.processes)
        from jobwire.server import serve  # uvicorn and FastAPI load only for serving

        return serve(settings, jobwire)
    elif args.command == "worker":
        settings, jobwire = _settings(args)
        asyncio.run(_run_worker(settings, jobwire))
    elif args.command == "migrate":
        asyncio.run(_migrate(args.db))
        print(f"schema is up to date on {args.db}")
    elif args.command == "users":
        print(asyncio.run(_users(args)))
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    try:
        sys.exit(run(argv))
    except (CLIError, SettingError, StoreError) as exc:
        print(f"jobwire: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
