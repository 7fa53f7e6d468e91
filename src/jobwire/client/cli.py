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
from jobwire.client.errors import (
    ApiError,
    InvalidRequest,
    JobNotFound,
    JobwireError,
    Unauthorized,
)
from jobwire.client.session import default_path
from jobwire.client.snapshot import JSON
from jobwire.model import ACTIVE, Status
from jobwire.text import printable

DEFAULT_URL = "http://127.0.0.1:8000"
EXIT_JOB_FAILED = 1  # the job ended failed or cancelled
EXIT_ERROR = 2  # bad arguments, unreachable server, refused request
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT
EXIT_PIPE_CLOSED = 141  # the reader went away, as a shell reports SIGPIPE
MAX_LIST = 500  # the most one `GET /api/jobs` answers
MIN_PREFIX = 4  # a shorter prefix matches too many jobs to be worth resolving
SHORT = 8  # how many characters of an id the dashboard, the bar and messages show
CANDIDATES = 10  # an ambiguous prefix lists this many of its jobs


def _limit(text: str) -> int:
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIST:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_LIST}")
    return limit


def _job_ref(text: str) -> str:
    """A job id or its first characters (as `jobs` and the dashboard show them)."""
    ref = text.strip().lower()
    if not MIN_PREFIX <= len(ref) <= 32 or any(c not in "0123456789abcdef" for c in ref):
        raise argparse.ArgumentTypeError(
            f"a job id is hex: give it whole or its first {MIN_PREFIX} or more characters")
    return ref


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def client_parser(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--url", default=os.environ.get("JOBWIRE_URL", DEFAULT_URL),
                       help="server (env JOBWIRE_URL; default %(default)s)")
        p.add_argument("--token", default=os.environ.get("JOBWIRE_TOKEN"),
                       help="a user token (env JOBWIRE_TOKEN); default: a saved guest session")
        return p

    def job_parser(name: str, help: str) -> None:
        client_parser(name, help).add_argument(
            "id", type=_job_ref, help=f"the job's id, or its first {MIN_PREFIX}+ characters")

    p = client_parser("submit", "submit a job and print its id")
    p.add_argument("task")
    p.add_argument("--input", default="null", help="the job's input as JSON")
    p.add_argument("--key", help="dedup key: an active job with it is reused")
    p.add_argument("--delay", type=float, metavar="S",
                   help="start it no sooner than S seconds from now")
    p.add_argument("--priority", type=int, metavar="N",
                   help="claim it before lower priorities (within the range the task allows)")
    p.add_argument("--watch", action="store_true", help="then follow it like `watch`")
    job_parser("watch", "follow a job live until it ends")
    p = client_parser("jobs", "list your jobs, newest first")
    p.add_argument("--status", choices=["active", "queued", "running", "completed", "failed",
                                        "cancelled"])
    p.add_argument("--limit", type=_limit, default=50,
                   help=f"show at most this many (1 to {MAX_LIST}; default %(default)s)")
    job_parser("cancel", "cancel a job (exits 0 if it had already ended)")
    job_parser("rm", "delete an ended job")
    p = client_parser("login", "use a user's token from now on; your guest jobs move to the user")
    p.add_argument("user_token", help="printed by `jobwire users add NAME`")


def say(line: str, file: IO[str] | None = None) -> None:
    """Print one line with whatever came from the server or a task made `printable`: a
    job's name or error must not retitle the terminal or draw a line of its own."""
    print(printable(line), file=file or sys.stdout, flush=True)


def short(job_id: str) -> str:
    return job_id[:SHORT]


async def _resolve(client: Client, ref: str) -> dict[str, JSON]:
    """The job whose id is `ref` or starts with it. The server filters (an owner may
    have more jobs than one listing shows); the check here guards against a server
    that ignores `id_prefix`."""
    found = [j for j in await client.jobs(limit=CANDIDATES + 1, id_prefix=ref)
             if str(j["id"]).startswith(ref)]
    if not found:
        raise JobwireError(f"no job starts with {ref}")
    if len(found) > 1:
        more = "at least " if len(found) > CANDIDATES else ""
        lines = [f"{ref} matches {more}{len(found)} jobs; give more of the id:"]
        lines += [f"  {j['id']}  {j['task']}  {j['status']}  {j['created_at']}"
                  for j in found[:CANDIDATES]]
        raise JobwireError("\n".join(lines))
    return found[0]


async def _follow(client: Client, job_id: str) -> int:
    last = None
    try:
        display = display_for(sys.stdout)
        try:
            async for snap in client.watch(job_id):
                display.show(snap)
                last = snap
        finally:
            display.close()
    except asyncio.CancelledError:  # Ctrl-C: asyncio.run cancels us, then raises it
        say(f"stopped watching; job {short(job_id)} keeps running — "
            f"`jobwire watch {short(job_id)}` to watch again", sys.stderr)
        raise
    return 0 if last is not None and last.status == "completed" else EXIT_JOB_FAILED


async def _submit(client: Client, args: argparse.Namespace) -> int:
    try:
        value = json.loads(args.input)
    except ValueError as exc:
        raise JobwireError(f"--input is not valid JSON: {exc}") from None
    job, created = await client.submit(args.task, value, args.key, delay=args.delay,
                                       priority=args.priority)
    when = f", to run at {job['run_at']}" if job.get("run_at") else ""
    say(f"job {job['id']} " + (f"created{when}" if created else
                               f"reused (already {job['status']} with key {job['key']})"))
    return await _follow(client, str(job["id"])) if args.watch else 0


async def _watch(client: Client, args: argparse.Namespace) -> int:
    return await _follow(client, str((await _resolve(client, args.id))["id"]))


async def _jobs(client: Client, args: argparse.Namespace) -> int:
    # One more than shown, to know whether the limit cut the list.
    jobs = await client.jobs(args.status, min(args.limit + 1, MAX_LIST))
    capped = len(jobs) > args.limit or len(jobs) == MAX_LIST
    jobs = jobs[:args.limit]
    rows = [[printable(str(cell)) for cell in (
        j["id"], j["task"], j["status"], f"{j['progress']['done']}/{j['progress']['total']}",
        j["progress"]["failed"], j["created_at"])] for j in jobs]
    console = Console()
    if not rows:  # notes go to stderr: a pipe reads only rows
        say(f"no {args.status} jobs" if args.status else "no jobs", sys.stderr)
    elif console.is_terminal:
        table = Table("id", "task", "status", "done", "failed", "created")
        for row in rows:
            table.add_row(*map(Text, row))  # Text: never read as markup
        console.print(table)
    else:
        for row in rows:
            print("\t".join(row))
    if capped:
        more = (f"--limit N (up to {MAX_LIST}) for more" if args.limit < MAX_LIST else
                "--status narrows the list")
        say(f"showing the newest {len(rows)}; {more}", sys.stderr)
    return 0


async def _cancel(client: Client, args: argparse.Namespace) -> int:
    job = await _resolve(client, args.id)
    if Status(str(job["status"])) in ACTIVE:
        job = await client.cancel(str(job["id"]))
        if job["status"] == "cancelled":  # it was queued: cancelled at once
            say(f"job {job['id']} cancelled")
            return 0
        if job["status"] == "running":
            say(f"job {job['id']} cancel requested")
            return 0
    # Already ended (or just now): the goal, a job that does not run, holds: exit 0.
    say(f"job {job['id']} had already {job['status']}; nothing to cancel")
    return 0


async def _rm(client: Client, args: argparse.Namespace) -> int:
    job_id = str((await _resolve(client, args.id))["id"])
    await client.delete(job_id)
    say(f"job {job_id} deleted")
    return 0


async def _login(client: Client, args: argparse.Namespace) -> int:
    try:
        moved = await client.login(args.user_token)
    except Unauthorized:
        raise JobwireError(f"that token is not a user token on {client.url}: "
                           "the server does not know it (or it expired)") from None
    except ApiError as exc:
        if exc.status != 403:
            raise
        raise JobwireError(f"that token is a guest session's, not a user's, on {client.url}: "
                           "`jobwire users add NAME` prints a user token") from None
    say(f"logged in; {moved} job(s) of the guest session now belong to the user")
    return 0


Command = Callable[[Client, argparse.Namespace], Awaitable[int]]
COMMANDS: dict[str, Command] = {"submit": _submit, "watch": _watch, "jobs": _jobs,
                                "cancel": _cancel, "rm": _rm, "login": _login}

# Where each option's value travels in a request, for naming it in the server's errors.
OPTIONS = {("body", "input"): "--input", ("body", "key"): "--key", ("body", "task"): "task",
           ("body", "delay"): "--delay", ("body", "priority"): "--priority",
           ("query", "limit"): "--limit", ("query", "status"): "--status"}
# pydantic's words for a wrong JSON type, in JSON's.
TYPES = {"model_type": "must be a JSON object", "dict_type": "must be a JSON object",
         "model_attributes_type": "must be a JSON object", "list_type": "must be a JSON array"}


def _invalid(exc: InvalidRequest) -> str:
    """The server's 422 in the CLI's terms: the option that carried each bad value, then
    the path inside it (`--input: tracks: Field required`)."""
    lines = []
    for field in exc.fields:
        loc = [str(p) for p in field.get("loc", [])]
        option = OPTIONS.get((loc[0], loc[1])) if len(loc) >= 2 else None
        if option is None:
            return str(exc)  # not one of ours: the server's own words
        where = ": ".join([option, ".".join(loc[2:])] if loc[2:] else [option])
        msg = TYPES.get(str(field.get("type")), str(field.get("msg")))
        lines.append(f"{where} {msg}" if msg in TYPES.values() else f"{where}: {msg}")
    return "; ".join(lines) or str(exc)


async def _run(args: argparse.Namespace) -> int:
    async with Client(args.url, args.token, state_file=default_path()) as client:
        return await COMMANDS[args.command](client, args)


def run(args: argparse.Namespace) -> int:
    """Runs a client command; a failure prints one message, never a traceback."""
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED  # what was interrupted said so, if it matters
    except BrokenPipeError:
        # The reader (`| head`) has all it wants. Quietly: stdout is pointed at /dev/null
        # so the interpreter's last flush at exit cannot complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE_CLOSED
    except JobNotFound as exc:  # the job went away after it was found
        message = f"job {args.id} not found" if "id" in args else str(exc)
    except InvalidRequest as exc:
        message = _invalid(exc)
    except JobwireError as exc:
        message = str(exc)
    except OSError as exc:  # the session file could not be written
        message = f"cannot keep the session in {default_path()}: {exc}"
    first, *rest = message.splitlines()
    say(f"jobwire: {first}", sys.stderr)
    for line in rest:
        say(line, sys.stderr)
    return EXIT_ERROR
