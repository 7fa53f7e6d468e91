"""The client commands of `jobwire`: submit, watch, jobs, cancel, rm, against a server URL,
with the session token kept per URL in the user's config directory."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import IO

from rich.console import Console
from rich.table import Table
from rich.text import Text

from jobwire.client.core import Client
from jobwire.client.display import display_for
from jobwire.client.errors import JobNotFound, JobwireError
from jobwire.client.session import default_path
from jobwire.text import printable

DEFAULT_URL = "http://127.0.0.1:8000"
EXIT_JOB_FAILED = 1  # the job ended failed or cancelled
EXIT_ERROR = 2  # bad arguments, unreachable server, refused request


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def client_parser(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--url", default=os.environ.get("JOBWIRE_URL", DEFAULT_URL),
                       help="server (env JOBWIRE_URL; default %(default)s)")
        p.add_argument("--token", default=os.environ.get("JOBWIRE_TOKEN"),
                       help="a user token (env JOBWIRE_TOKEN); default: a saved guest session")
        return p

    p = client_parser("submit", "submit a job and print its id")
    p.add_argument("task")
    p.add_argument("--input", default="null", help="the job's input as JSON")
    p.add_argument("--key", help="dedup key: an active job with it is reused")
    p.add_argument("--watch", action="store_true", help="then follow it like `watch`")
    p = client_parser("watch", "follow a job live until it ends")
    p.add_argument("id")
    p = client_parser("jobs", "list your jobs, newest first")
    p.add_argument("--status", choices=["active", "queued", "running", "completed", "failed",
                                        "cancelled"])
    p.add_argument("--limit", type=int, default=50)
    p = client_parser("cancel", "cancel a job")
    p.add_argument("id")
    p = client_parser("rm", "delete an ended job")
    p.add_argument("id")
    p = client_parser("login", "use a user's token from now on; your guest jobs move to the user")
    p.add_argument("user_token", help="printed by `jobwire users add NAME`")


def say(line: str, file: IO[str] | None = None) -> None:
    """Print one line with whatever came from the server or a task made `printable`: a
    job's name or error must not retitle the terminal or draw a line of its own."""
    print(printable(line), file=file or sys.stdout, flush=True)


async def _follow(client: Client, job_id: str) -> int:
    display = display_for(sys.stdout)
    last = None
    try:
        async for snap in client.watch(job_id):
            display.show(snap)
            last = snap
    finally:
        display.close()
    return 0 if last is not None and last.status == "completed" else EXIT_JOB_FAILED


async def _submit(client: Client, args: argparse.Namespace) -> int:
    try:
        value = json.loads(args.input)
    except ValueError as exc:
        raise JobwireError(f"--input is not valid JSON: {exc}") from None
    job, created = await client.submit(args.task, value, args.key)
    say(f"job {job['id']} " + ("created" if created else
                               f"reused (already {job['status']} with key {job['key']})"))
    return await _follow(client, job["id"]) if args.watch else 0


async def _watch(client: Client, args: argparse.Namespace) -> int:
    return await _follow(client, args.id)


async def _jobs(client: Client, args: argparse.Namespace) -> int:
    jobs = await client.jobs(args.status, args.limit)
    rows = [[printable(cell) for cell in (
        j["id"], j["task"], j["status"], f"{j['progress']['done']}/{j['progress']['total']}",
        j["created_at"])] for j in jobs]
    console = Console()
    if console.is_terminal:
        table = Table("id", "task", "status", "done", "created")
        for row in rows:
            table.add_row(*map(Text, row))  # Text: never read as markup
        console.print(table)
    else:
        for row in rows:
            print("\t".join(row))
    return 0


async def _cancel(client: Client, args: argparse.Namespace) -> int:
    job = await client.cancel(args.id)
    state = "cancel requested" if job["status"] == "running" else job["status"]
    say(f"job {job['id']} {state}")
    return 0


async def _rm(client: Client, args: argparse.Namespace) -> int:
    await client.delete(args.id)
    say(f"job {args.id} deleted")
    return 0


async def _login(client: Client, args: argparse.Namespace) -> int:
    moved = await client.login(args.user_token)
    say(f"logged in; {moved} job(s) of the guest session now belong to the user")
    return 0


Command = Callable[[Client, argparse.Namespace], Awaitable[int]]
COMMANDS: dict[str, Command] = {"submit": _submit, "watch": _watch, "jobs": _jobs,
                                "cancel": _cancel, "rm": _rm, "login": _login}


async def _run(args: argparse.Namespace) -> int:
    async with Client(args.url, args.token, state_file=default_path()) as client:
        return await COMMANDS[args.command](client, args)


def run(args: argparse.Namespace) -> int:
    """Runs a client command; a failure prints one line, never a traceback."""
    try:
        return asyncio.run(_run(args))
    except JobNotFound:
        message = f"job {getattr(args, 'id', '')} not found".replace("  ", " ")
    except JobwireError as exc:
        message = str(exc)
    except OSError as exc:  # the session file could not be written
        message = f"cannot keep the session in {default_path()}: {exc}"
    say(f"jobwire: {message}", sys.stderr)
    return EXIT_ERROR
