"""The `jobwire` client commands as a user runs them: in a terminal, in a pipe, and when
things go wrong (one clear line on stderr, a non-zero exit, never a traceback)."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest

from jobwire.store import open_store
from tests.conftest import PYTHONPATH, ROOT, Proc, cli, free_port


@pytest.fixture
def url(procs: Any, tmp_path: Path) -> str:
    """One server: the commands do not depend on the storage backend."""
    proc: Proc = procs("serve", "--db", f"sqlite:///{tmp_path / 'cli.db'}")
    return proc.url


@pytest.fixture
def env(tmp_path: Path, url: str) -> dict[str, str]:
    config = tmp_path / "config"
    return {**os.environ, "PYTHONPATH": PYTHONPATH, "XDG_CONFIG_HOME": str(config),
            "JOBWIRE_URL": url}


def jobwire(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return cli(*args, env=env)


def job_id_of(first_line: str) -> str:
    found = re.match(r"job ([0-9a-f]+) created$", first_line)
    assert found, first_line
    return found.group(1)


def test_submit_watch_in_a_pipe_prints_plain_lines(env: dict[str, str], tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    spec = json.dumps({"n": 3, "gate": str(gate)})
    proc = subprocess.Popen([sys.executable, "-m", "jobwire", "submit", "steps", "--input",
                             spec, "--watch"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline().rstrip("\n")
    job = job_id_of(first)
    assert proc.stdout.readline().startswith(f"job {job} steps: ")  # watching now
    gate.touch()
    rest = proc.stdout.read().splitlines()
    assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""

    assert [line.split(" {")[0] for line in rest if line.startswith("item ")] == [
        "item i0 done", "item i1 done", "item i2 done"]
    assert rest[-1] == f'job {job} completed (3/3 done, 0 failed): {{"ran":3}}'
    assert not any("\x1b" in line for line in rest)  # no terminal codes in a pipe


def read_pty(fd: int, until: str | None, deadline: float) -> str:
    """What the terminal shows, up to `until` (or the end of output)."""
    out = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
        if until is not None and until in out.decode(errors="replace"):
            break
    return out.decode(errors="replace")


@pytest.fixture
def terminal() -> Iterator[tuple[int, int]]:
    """A pseudo-terminal, 120 columns wide: (controller fd, terminal fd)."""
    controller, tty = os.openpty()
    fcntl.ioctl(tty, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    yield controller, tty
    os.close(controller)


def in_terminal(env: dict[str, str], tty: int, *args: str) -> subprocess.Popen[bytes]:
    """`jobwire ARGS` writing to the terminal `tty` (closed here: the child holds it)."""
    term_env = {k: v for k, v in env.items() if k not in ("NO_COLOR", "COLUMNS", "LINES")}
    proc = subprocess.Popen([sys.executable, "-m", "jobwire", *args],
                            env={**term_env, "TERM": "xterm-256color"},
                            cwd=ROOT, stdin=tty, stdout=tty, stderr=tty, close_fds=True)
    os.close(tty)
    return proc


def test_submit_watch_in_a_terminal_shows_a_live_bar(env: dict[str, str], tmp_path: Path,
                                                     terminal: tuple[int, int]) -> None:
    controller, tty = terminal
    gate = tmp_path / "gate"
    spec = json.dumps({"n": 3, "delay": 0.1, "gate": str(gate)})
    proc = in_terminal(env, tty, "submit", "steps", "--input", spec, "--watch")
    deadline = time.monotonic() + 60
    shown = read_pty(controller, " steps: ", deadline)
    gate.touch()
    shown += read_pty(controller, None, deadline)
    assert proc.wait(60) == 0, shown

    assert "\x1b[" in shown  # drawn with terminal control codes, redrawn in place
    assert "━" in shown and "items/s" in shown and "ETA" in shown
    assert "/3 done" in shown and "0 failed" in shown
    for k in range(3):
        assert f"item i{k} done" in shown
    assert "completed (3/3 done, 0 failed)" in shown


def test_commands_share_the_saved_session(env: dict[str, str], url: str,
                                          tmp_path: Path) -> None:
    submitted = jobwire(env, "submit", "block", "--input", "{}", "--key", "k")
    assert submitted.returncode == 0, submitted.stderr
    job = job_id_of(submitted.stdout.strip())
    deadline = time.monotonic() + 30
    while job not in jobwire(env, "jobs", "--status", "running").stdout:
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.05)
    again = jobwire(env, "submit", "block", "--input", "{}", "--key", "k")
    assert again.stdout.strip() == f"job {job} reused (already running with key k)"

    saved = json.loads((tmp_path / "config" / "jobwire" / "client.json").read_text())
    assert list(saved["servers"]) == [url] and saved["servers"][url]["token"]
    assert (tmp_path / "config" / "jobwire" / "client.json").stat().st_mode & 0o077 == 0

    listed = jobwire(env, "jobs", "--status", "active")
    assert listed.stdout.split("\t")[:2] == [job, "block"]

    removed = jobwire(env, "rm", job)
    assert removed.returncode == 2 and "cancel it first" in removed.stderr
    cancelled = jobwire(env, "cancel", job)
    assert cancelled.returncode == 0 and cancelled.stdout.startswith(f"job {job} ")
    watched = jobwire(env, "watch", job)
    assert watched.returncode == 1  # the job did not complete
    assert watched.stdout.splitlines()[-1].startswith(f"job {job} cancelled")
    assert jobwire(env, "rm", job).stdout.strip() == f"job {job} deleted"
    assert jobwire(env, "jobs").stdout == ""


def test_login_moves_the_guest_jobs_to_the_user(env: dict[str, str], tmp_path: Path) -> None:
    job = job_id_of(jobwire(env, "submit", "block", "--input", "{}").stdout.strip())
    user_token = jobwire(env, "users", "add", "dave", "--db",
                         f"sqlite:///{tmp_path / 'cli.db'}").stdout.strip()
    done = jobwire(env, "login", user_token)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "logged in; 1 job(s) of the guest session now belong to the user"
    listed = jobwire(env, "jobs", "--status", "active")  # as the user now
    assert listed.stdout.split("\t")[:2] == [job, "block"]
    assert jobwire(env, "cancel", job).returncode == 0


@pytest.mark.parametrize(("args", "message", "code"), [
    (["watch", "0123abcd"], "jobwire: no job starts with 0123abcd", 2),
    (["rm", "0123abcd"], "jobwire: no job starts with 0123abcd", 2),
    (["submit", "steps", "--input", "{nope"], "jobwire: --input is not valid JSON", 2),
    (["submit", "nope"], "jobwire: task: unknown task 'nope'", 2),
    (["submit", "boom", "--watch"], "", 1),
])
def test_errors_are_one_line_and_a_non_zero_exit(env: dict[str, str], args: list[str],
                                                 message: str, code: int) -> None:
    done = jobwire(env, *args)
    assert done.returncode == code, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith(message)
    if args[:2] == ["submit", "boom"]:
        last = done.stdout.splitlines()[-1]
        assert " failed (0/0 done, 0 failed): " in last and last.endswith("boom on purpose")


def test_errors_name_the_option_that_carried_the_bad_value(env: dict[str, str]) -> None:
    """Checked here where the CLI can (argparse), named by option where only the server
    knows (the task's input schema, the key's limits): never the API's `body.input`."""
    for args, message in [
        (["submit", "steps", "--input", "[1, 2]"], "jobwire: --input must be a JSON object\n"),
        (["submit", "steps", "--input", "{}"], "jobwire: --input: n: Field required\n"),
        (["submit", "steps", "--input", '{"n": -1}'],
         "jobwire: --input: n: Input should be greater than or equal to 0\n"),
        (["submit", "echo", "--key", "k" * 501],
         "jobwire: --key: String should have at most 500 characters\n"),
    ]:
        done = jobwire(env, *args)
        assert (done.returncode, done.stderr) == (2, message), args
    for args, message in [
        (["jobs", "--limit", "501"], "argument --limit: must be between 1 and 500"),
        (["jobs", "--limit", "0"], "argument --limit: must be between 1 and 500"),
        (["watch", "abc"], "argument id: a job id is hex: give it whole or its first 4"),
        (["cancel", "xyz123"], "argument id: a job id is hex"),
    ]:
        done = jobwire(env, *args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr


def test_login_says_what_is_wrong_with_the_token(env: dict[str, str], url: str,
                                                 tmp_path: Path) -> None:
    not_known = (f"jobwire: that token is not a user token on {url}: the server does not "
                 "know it (or it expired)\n")
    bad = jobwire(env, "login", "not-a-token")  # no guest session yet: nothing to claim
    assert (bad.returncode, bad.stderr) == (2, not_known)
    assert jobwire(env, "submit", "echo").returncode == 0  # now there is a guest session
    bad = jobwire(env, "login", "not-a-token")
    assert (bad.returncode, bad.stderr) == (2, not_known)
    other_guest = httpx.post(f"{url}/api/sessions", timeout=10).json()["token"]
    guest = jobwire(env, "login", other_guest)
    assert (guest.returncode, guest.stderr) == (
        2, f"jobwire: that token is a guest session's, not a user's, on {url}: "
        "`jobwire users add NAME` prints a user token\n")

    # The saved guest session is unknown to the server (expired, or its database reset):
    # a good user token still logs in, bringing nothing along.
    saved = tmp_path / "config" / "jobwire" / "client.json"
    data = json.loads(saved.read_text())
    data["servers"][url]["token"] = "expired-guest-token"
    saved.write_text(json.dumps(data))
    user = jobwire(env, "users", "add", "erin", "--db",
                   f"sqlite:///{tmp_path / 'cli.db'}").stdout.strip()
    done = jobwire(env, "login", user)
    assert (done.returncode, done.stdout, done.stderr) == (
        0, "logged in; 0 job(s) of the guest session now belong to the user\n", "")
    assert jobwire(env, "jobs").returncode == 0  # as the user now


def test_unreachable_server(env: dict[str, str]) -> None:
    done = jobwire(env, "jobs", "--url", f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 2
    assert done.stderr.startswith("jobwire: cannot reach http://127.0.0.1:")
    assert "Traceback" not in done.stderr


# What a guest can put in the names, errors and keys a terminal shows: a title change
# (OSC 2), a line erase and carriage return drawing a fake line, a bidi override, 8-bit
# CSI, and rich markup.
HOSTILE = ["\x1b]2;pwned\x07", "\x1b[2K\rjob completed", "\u202egnp.exe", "[bold]x[/bold]"]
SHOWN = ["\\x1b]2;pwned\\x07", "\\x1b[2K\\rjob completed", "\\u202egnp.exe",
         "[bold]x[/bold]"]


def test_text_from_the_server_cannot_drive_the_terminal(env: dict[str, str], tmp_path: Path,
                                                        terminal: tuple[int, int]) -> None:
    controller, tty = terminal
    gate = tmp_path / "gate"
    spec = json.dumps({"names": HOSTILE, "error": "\x1b]2;error\x07[red]e[/red]",
                       "gate": str(gate)})
    proc = in_terminal(env, tty, "submit", "hostile", "--input", spec, "--watch")
    deadline = time.monotonic() + 60
    shown = read_pty(controller, " hostile: ", deadline)  # watching: items go live now
    gate.touch()
    shown += read_pty(controller, None, deadline)
    assert proc.wait(60) == 1, shown  # the job failed

    for name in SHOWN:  # each name in visible escaped form, as typed
        assert name in shown, (name, shown)
    assert "item \\x1b]2;pwned\\x07 failed: \\x1b]2;error\\x07[red]e[/red]" in shown
    assert "RuntimeError: \\x1b]2;error\\x07[red]e[/red]" in shown
    assert "\x1b]" not in shown  # no OSC: the title stays the terminal's
    assert "\x1b[2K\rjob" not in shown and "\u202e" not in shown
    assert "\x1b[1m" not in shown.split("[bold]x[/bold]")[0][-20:]  # markup stayed text

    # Keys may hold C1 codes (\x9b is CSI on 8-bit terminals) and bidi overrides.
    key = "\x9b2J\u202e[bold]k[/bold]"
    first = jobwire(env, "submit", "block", "--input", "{}", "--key", key)
    again = jobwire(env, "submit", "block", "--input", "{}", "--key", key)
    assert again.stdout.strip().endswith("with key \\x9b2J\\u202e[bold]k[/bold])"), again
    assert jobwire(env, "cancel", job_id_of(first.stdout.strip())).returncode == 0


def test_jobs_says_when_there_are_none_and_cancel_when_the_job_had_ended(
        env: dict[str, str]) -> None:
    none = jobwire(env, "jobs")
    assert (none.returncode, none.stdout, none.stderr) == (0, "", "no jobs\n")
    assert jobwire(env, "jobs", "--status", "active").stderr == "no active jobs\n"

    ran = jobwire(env, "submit", "steps", "--input", '{"n": 2, "fail_at": 1}', "--watch")
    job = job_id_of(ran.stdout.splitlines()[0])
    assert ran.stdout.splitlines()[-1].startswith(f"job {job} completed (1/2 done, 1 failed)")
    listed = jobwire(env, "jobs")
    assert listed.stdout.split("\t")[:5] == [job, "steps", "completed", "1/2", "1"]
    assert listed.stderr == ""  # not capped: no note

    cancelled = jobwire(env, "cancel", job[:8])
    assert (cancelled.returncode, cancelled.stdout) == (
        0, f"job {job} had already completed; nothing to cancel\n")
    assert jobwire(env, "rm", job[:6].upper()).stdout == f"job {job} deleted\n"


def test_short_ids_resolve_against_all_the_owners_jobs(
        procs: Any, tmp_path: Path, terminal: tuple[int, int]) -> None:
    """Two old jobs whose ids start alike, under 600 newer ones: more than one listing
    shows, so only the server's prefix lookup can find them."""
    db = f"sqlite:///{tmp_path / 'many.db'}"
    token = cli("users", "add", "fay", "--db", db).stdout.strip()
    # A uuid4's 13th digit is its version, 4: no other job can start like these.
    shared = "abcdabcdabcd0"
    old = [shared + "1" + "0" * 18, shared + "2" + "0" * 18]

    async def fill() -> None:
        store = open_store(db, max_active_jobs=1000)  # queued: the server runs no workers
        await store.open()
        try:
            for job_id in old:
                with mock.patch("uuid.uuid4", return_value=uuid.UUID(job_id)):
                    await store.submit("user:fay", "echo", None, None, 1)
            await asyncio.gather(*(store.submit("user:fay", "echo", k, None, 1)
                                   for k in range(600)))
        finally:
            await store.close()

    asyncio.run(fill())
    url = procs("serve", "--db", db, "--no-workers").url
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "XDG_CONFIG_HOME": str(tmp_path / "cfg"),
           "JOBWIRE_URL": url, "JOBWIRE_TOKEN": token}

    controller, tty = terminal  # where a bar would be drawn: nothing before the job is found
    proc = in_terminal(env, tty, "watch", shared.upper())
    shown = read_pty(controller, None, time.monotonic() + 30)
    assert proc.wait(30) == 2, shown
    assert f"jobwire: {shared} matches 2 jobs; give more of the id:" in shown
    assert old[0] in shown and old[1] in shown
    assert "\x1b[?25l" not in shown and "━" not in shown  # rich's live bar never started

    cancelled = jobwire(env, "cancel", old[0][:14])
    assert (cancelled.returncode, cancelled.stdout) == (0, f"job {old[0]} cancelled\n")
    again = jobwire(env, "cancel", old[0][:14])
    assert (again.returncode, again.stdout) == (
        0, f"job {old[0]} had already cancelled; nothing to cancel\n")
    assert jobwire(env, "rm", old[0][:14]).stdout == f"job {old[0]} deleted\n"
    gone = jobwire(env, "watch", old[0][:14])
    assert (gone.returncode, gone.stderr) == (2, f"jobwire: no job starts with {old[0][:14]}\n")

    listed = jobwire(env, "jobs")
    assert len(listed.stdout.splitlines()) == 50
    assert listed.stderr == "showing the newest 50; --limit N (up to 500) for more\n"
    listed = jobwire(env, "jobs", "--limit", "500")
    assert len(listed.stdout.splitlines()) == 500
    assert listed.stderr == "showing the newest 500; --status narrows the list\n"
    none = jobwire(env, "jobs", "--status", "running")
    assert (none.stdout, none.stderr) == ("", "no running jobs\n")

    # The API takes a prefix as hex digits only, bounded: nothing a query could read as
    # a pattern (% _), nothing longer than an id.
    auth = {"Authorization": f"Bearer {token}"}
    got = httpx.get(f"{url}/api/jobs", params={"id_prefix": shared}, headers=auth, timeout=10)
    assert [j["id"] for j in got.json()] == [old[1]]
    for prefix in ["%", "_", "abc%", "ab_d", "ABCD", "a" * 33, "abcd\n", ""]:
        r = httpx.get(f"{url}/api/jobs", params={"id_prefix": prefix}, headers=auth,
                      timeout=10)
        assert r.status_code == 422, prefix
        assert r.json()["detail"][0]["loc"] == ["query", "id_prefix"]


def test_a_closed_pipe_ends_the_command_quietly(env: dict[str, str]) -> None:
    """`jobwire jobs | head -1`: the reader leaves early; no BrokenPipe error, no traceback,
    141 as a shell reports a command SIGPIPE ended (what `cat` would give)."""
    assert jobwire(env, "submit", "echo").returncode == 0
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    proc = subprocess.Popen([sys.executable, "-m", "jobwire", "jobs"], env=env, cwd=ROOT,
                            stdout=write, stderr=subprocess.PIPE, text=True)
    os.close(write)
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (141, "")


def test_ctrl_c_stops_watching_and_the_job_keeps_running(
        env: dict[str, str], terminal: tuple[int, int]) -> None:
    job = job_id_of(jobwire(env, "submit", "block", "--input", "{}").stdout.strip())
    controller, tty = terminal
    proc = in_terminal(env, tty, "watch", job[:8])
    deadline = time.monotonic() + 60
    shown = read_pty(controller, " running", deadline)
    proc.send_signal(signal.SIGINT)
    shown += read_pty(controller, None, deadline)
    assert proc.wait(30) == 130, shown
    assert (f"stopped watching; job {job[:8]} keeps running — `jobwire watch {job[:8]}` "
            "to watch again") in shown
    assert "Traceback" not in shown and "KeyboardInterrupt" not in shown
    assert jobwire(env, "jobs", "--status", "running").stdout.startswith(job)
    assert jobwire(env, "cancel", job).returncode == 0


def test_the_bar_of_an_ended_job_stands_still(env: dict[str, str], tmp_path: Path,
                                              terminal: tuple[int, int]) -> None:
    """Cancelled half way: the last frame says so and shows no rate or ETA, which would
    say work goes on."""
    gate = tmp_path / "gate"
    spec = json.dumps({"n": 40, "delay": 0.05, "gate": str(gate)})
    job = job_id_of(jobwire(env, "submit", "steps", "--input", spec).stdout.strip())
    controller, tty = terminal
    proc = in_terminal(env, tty, "watch", job[:8])
    deadline = time.monotonic() + 60
    shown = read_pty(controller, " steps: ", deadline)
    gate.touch()
    shown += read_pty(controller, "item i3 done", deadline)
    assert jobwire(env, "cancel", job).returncode == 0
    shown += read_pty(controller, None, deadline)
    assert proc.wait(30) == 1, shown  # cancelled
    assert "items/s" in shown and "ETA" in shown  # while it ran

    # The last frame: rich erases the line (ESC [2K) before each redraw.
    last = shown.rsplit("\x1b[2K", 1)[-1]
    assert f"{job[:8]} cancelled" in last and "/40 done" in last, repr(last)
    assert "items/s" not in last and "ETA" not in last, repr(last)
