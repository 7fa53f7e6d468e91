"""The `jobwire` client commands as a user runs them: in a terminal, in a pipe, and when
things go wrong (one clear line on stderr, a non-zero exit, never a traceback)."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

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
    (["watch", "0123abcd"], "jobwire: job 0123abcd not found", 2),
    (["rm", "0123abcd"], "jobwire: job 0123abcd not found", 2),
    (["submit", "steps", "--input", "{nope"], "jobwire: --input is not valid JSON", 2),
    (["submit", "nope"], "jobwire: task: unknown task 'nope'", 2),
    (["submit", "steps", "--input", '{"n": -1}'], "jobwire: input.n:", 2),
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
