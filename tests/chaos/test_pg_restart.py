"""The PostgreSQL server itself restarts (a fast shutdown, then a crash) under a running
jobwire: an API server with workers and a separate worker process, jobs with items, and
live WebSocket watchers. On a private PostgreSQL instance the test starts, since the
shared one cannot be restarted. Nothing is lost: every job completes with counts equal
to its items, every watcher gets every seq once and in order, and the same server
process answers /healthz again."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.chaos.conftest import APP, Serve
from tests.chaos.test_database import consistent
from tests.chaos.wire import ws_watch
from tests.conftest import free_port, guest

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(240)]


class PrivatePostgres:
    """A PostgreSQL instance of the test's own: a data directory, a port on 127.0.0.1,
    trust authentication. It refuses to run as root, so as root it runs as `postgres`."""

    def __init__(self, bin_dir: Path, home: Path) -> None:
        self.bin_dir = bin_dir
        self.data = home / "data"
        self.home = home
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def run(self, tool: str, *args: str, timeout: float = 60) -> None:
        cmd = [str(self.bin_dir / tool), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              cwd=self.home)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)}: {done.stdout}{done.stderr}")

    def init(self) -> None:
        self.run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust",
                 "--no-sync", "--no-instructions")

    def ctl(self, action: str, *mode: str) -> None:
        # fsync off: the machine does not crash here, only PostgreSQL; its WAL is replayed
        # from the OS's cache all the same.
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.home} "
                   "-c fsync=off -c shared_buffers=16MB -c max_connections=60")
        self.run("pg_ctl", action, "-D", str(self.data), "-l", str(self.home / "log"),
                 "-w", "-t", "60", "-o", options, *mode)


def postgres_bin() -> Path | None:
    """The newest Debian-installed PostgreSQL's programs, else those on PATH."""
    def version(initdb: str) -> int:
        number = Path(initdb).parts[-3]
        return int(number) if number.isdigit() else 0

    on_path = shutil.which("initdb")
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb") or ([on_path] if on_path else [])
    newest = max(found, key=version, default=None)
    return None if newest is None else Path(newest).parent


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("initdb not found (in /usr/lib/postgresql/*/bin or on PATH): "
                    "cannot start a private PostgreSQL to restart")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root with no `postgres` user: PostgreSQL refuses root")
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: PostgreSQL refuses root")
    # Not under pytest's tmp_path: as root that is closed to the `postgres` user.
    home = Path(tempfile.mkdtemp(prefix="jobwire-pg-"))
    if os.geteuid() == 0:
        shutil.chown(home, "postgres", "postgres")
    pg = PrivatePostgres(bin_dir, home)
    try:
        pg.init()
        pg.ctl("start")
        yield pg
    finally:
        with contextlib.suppress(RuntimeError, subprocess.SubprocessError):
            pg.ctl("stop", "-m", "immediate")
        shutil.rmtree(home, ignore_errors=True)


async def healthy_within(url: str, seconds: float) -> None:
    """Wait until /healthz answers 200; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get("/healthz")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise AssertionError(f"/healthz did not answer 200 within {seconds}s")


async def writing(c: Any, seconds: float = 60) -> None:
    """Returns once some job is running and has written items: the restart that follows
    then stops tasks mid-write, however slowly a loaded machine started them."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        jobs = (await c.http.get("/api/jobs", params={"status": "active"})).json()
        assert jobs, "mid-run: jobs and their items are being written"
        if any(j["status"] == "running" and j["progress"]["done"] for j in jobs):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no job was writing items within {seconds}s")


async def test_postgres_restarts_under_load(private_pg: PrivatePostgres, serve: Serve,
                                            procs: Any) -> None:
    url = private_pg.url
    srv = serve("--concurrency", "3", db=url)  # API with a few in-process workers
    worker = procs("worker", "--db", url, "--app", APP, "--lease", "2", "--concurrency", "15")
    c = await guest(srv.url)
    # Items written every 30 ms by 18 tasks: a write is in flight whenever the server goes.
    jobs = [(await c.submit("crunch", {"n": 30, "delay": 0.03}))[0]["id"] for _ in range(60)]
    watchers = [asyncio.create_task(ws_watch(srv.url, c.token, jobs[k::5])) for k in range(5)]
    server_pid = srv.proc.pid if srv.proc else None
    for mode in ("fast", "immediate"):  # a clean restart, then a crash and its recovery
        await asyncio.sleep(1.0)
        await writing(c)
        await asyncio.to_thread(private_pg.ctl, "restart", "-m", mode)
        await healthy_within(srv.url, 30)  # the same process, reconnected by itself
    assert srv.proc is not None and srv.proc.pid == server_pid and srv.proc.poll() is None
    assert worker.proc is not None and worker.proc.poll() is None
    retried = 0
    for job_id in jobs:
        job = await c.wait_terminal(job_id, timeout=90)
        assert job["status"] == "completed", (job["error"], job)
        await consistent(c, job_id)
        retried += job["attempt"] > 1
    assert retried, "the restarts stopped tasks mid-write, and their jobs were retried"
    for logs in await asyncio.wait_for(asyncio.gather(*watchers), 60):
        for job_id, log in logs.items():  # once each, in order (ws_watch checks as it goes)
            assert [e["seq"] for e in log] == [e["seq"] for e in await c.events(job_id)]
    job, created = await c.submit("steps", {"n": 2})
    assert created and (await c.wait_terminal(job["id"]))["status"] == "completed"
    await c.http.aclose()
