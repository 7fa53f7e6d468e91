"""The server-side CLI: users, migrations, and clear errors without tracebacks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Proc, cli

jobwire = cli


def test_users_add_prints_a_working_token(procs: Any, db_url: str) -> None:
    assert jobwire("migrate", "--db", db_url).returncode == 0
    out = jobwire("users", "add", "alice", "--db", db_url)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    server: Proc = procs("serve", "--db", db_url)
    r = httpx.post(server.url + "/api/jobs", json={"task": "echo", "input": 1},
                   headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 201 and r.json()["job"]["owner"] == "user:alice"


def test_bad_arguments_are_clear_messages(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'x.db'}"
    (tmp_path / "a-file").write_text("")
    for args, words in [
        (("worker", "--db", db, "--concurrency", "-1"), "--concurrency"),
        (("worker", "--db", db, "--app", "no.such.module:app"), "cannot load app"),
        (("users", "add", "a:b", "--db", db), "without ':'"),
        (("migrate", "--db", str(tmp_path / "a-file" / "x.db")), "database error"),
    ]:
        out = jobwire(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert words in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_serve_says_at_start_what_it_runs_with_without_the_password(procs: Any,
                                                                     db_url: str) -> None:
    # The test server trusts local connections, so a password in the URL is accepted
    # and ignored: what matters is that it never reaches the log.
    db = db_url.replace("postgresql://postgres@", "postgresql://postgres:hunter2@")
    server: Proc = procs("serve", "--db", db, "--concurrency", "3")
    api_only: Proc = procs("serve", "--db", db, "--no-workers")
    for proc, workers in ((server, "3 worker slots"), (api_only, "no workers")):
        log = proc.log.read_text()
        shown = db.replace(":hunter2@", ":***@")
        line = (f"serving http://127.0.0.1:{proc.port}/ on {shown} with app "
                f"tests.tasks:jobwire and {workers}")
        assert line in log, log
        assert "hunter2" not in log
