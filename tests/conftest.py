"""Fixtures: a database per backend, real server processes, and an HTTP client helper.

PostgreSQL tests run when CI is set or JOBWIRE_TEST_PG names a server; each run gets
its own schema so runs never collide.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobwire.store import Store, open_store

ROOT = Path(__file__).resolve().parent.parent
# Processes the tests start run this checkout's code (and its tests' task modules), even
# with a virtualenv whose editable install points at another checkout.
PYTHONPATH = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"
# Test servers make many guest sessions from 127.0.0.1; a test of the rate sets its own.
SERVER_ENV = {"JOBWIRE_SESSION_RATE": "1000000/1s,1000000"}


def pg_base_url() -> str | None:
    url = os.environ.get("JOBWIRE_TEST_PG")
    if url:
        return url
    return DEFAULT_PG if os.environ.get("CI") else None


BACKENDS = ["sqlite", "postgres"]


@contextlib.contextmanager
def fresh_db(backend: str, directory: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{directory / 'jobwire.db'}"
        return
    base = pg_base_url()
    if base is None:
        pytest.skip("PostgreSQL tests need CI=1 or JOBWIRE_TEST_PG=postgresql://…")
    from tests.pg import fresh_schema_url

    with fresh_schema_url(base) as url:
        yield url


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each backend."""
    with fresh_db(request.param, tmp_path) as url:
        yield url


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    """An open store on a fresh database of each backend."""
    s = open_store(db_url)
    await s.open()
    yield s
    await s.close()


@pytest.fixture
def pg_url(tmp_path: Path) -> Iterator[str]:
    """A fresh PostgreSQL schema, for tests of that backend alone."""
    with fresh_db("postgres", tmp_path) as url:
        yield url


@pytest.fixture(scope="module", params=BACKENDS)
def shared_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[Proc]:
    """One server per module and backend, for tests that isolate themselves by session."""
    directory = tmp_path_factory.mktemp("shared")
    with fresh_db(request.param, directory) as url:
        proc = Proc("serve", "--app", "tests.tasks:jobwire", "--db", url, "--lease", "2",
                    port=free_port(), log=directory / "serve.log")
        proc.start()
        yield proc
        proc.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m jobwire ARGS` as a user runs it (output captured)."""
    return subprocess.run([sys.executable, "-m", "jobwire", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": PYTHONPATH, **(env or {})})


class Proc:
    """A jobwire process (`serve` or `worker`) that tests can start, SIGKILL and restart."""

    def __init__(self, *args: str, port: int | None = None, log: Path,
                 module: str = "jobwire") -> None:
        self.module = module  # run as `python -m MODULE ARGS` (a wrapper of jobwire's CLI)
        self.args = list(args)
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.preexec: Callable[[], None] | None = None  # run in the child before exec

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> Proc:
        cmd = [sys.executable, "-m", self.module, *self.args]
        if self.port is not None:
            cmd += ["--port", str(self.port)]
        env = {**SERVER_ENV, **os.environ, "PYTHONPATH": PYTHONPATH}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=ROOT, preexec_fn=self.preexec)
        if wait and self.port is not None:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server did not start: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Any]:
    """Factory: procs("serve", "--db", url, ...) -> Proc; all are stopped at teardown."""
    started: list[Proc] = []

    def make(command: str, *args: str, port: bool | None = None, start: bool = True) -> Proc:
        has_port = command == "serve" if port is None else port
        p = Proc(command, "--app", "tests.tasks:jobwire", *args,
                 port=free_port() if has_port else None,
                 log=tmp_path / f"{command}-{len(started)}.log")
        started.append(p)
        return p.start() if start else p

    yield make
    for p in started:
        p.stop()


@pytest.fixture
def server(procs: Any, db_url: str) -> Proc:
    """One server with in-process workers on a fresh database of each backend."""
    proc: Proc = procs("serve", "--db", db_url, "--lease", "2")
    return proc


class Client:
    """A guest session against a server: thin sugar over httpx for tests."""

    def __init__(self, http: httpx.AsyncClient, token: str, owner: str) -> None:
        self.http = http
        self.token = token
        self.owner = owner

    async def submit(self, task: str, input: Any = None, key: str | None = None
                     ) -> tuple[dict[str, Any], bool]:
        body: dict[str, Any] = {"task": task, "input": input}
        if key is not None:
            body["key"] = key
        r = await self.http.post("/api/jobs", json=body)
        assert r.status_code in (200, 201), r.text
        data = r.json()
        return data["job"], data["created"]

    async def submit_with(self, task: str, input: Any = None, key: str | None = None,
                          **schedule: Any) -> tuple[dict[str, Any], bool]:
        """`submit` with more of the body: delay=..., run_at=..."""
        r = await self.http.post("/api/jobs", json={"task": task, "input": input, "key": key,
                                                    **schedule})
        assert r.status_code in (200, 201), r.text
        data = r.json()
        return data["job"], data["created"]

    async def job(self, job_id: str) -> dict[str, Any]:
        r = await self.http.get(f"/api/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    async def events(self, job_id: str, after: int = 0, wait: float = 0) -> list[dict[str, Any]]:
        r = await self.http.get(f"/api/jobs/{job_id}/events",
                                params={"after": after, "wait": wait})
        assert r.status_code == 200, r.text
        return list(r.json()["events"])

    async def wait_terminal(self, job_id: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = await self.job(job_id)
            if job["status"] in ("completed", "failed", "cancelled"):
                return job
            await self.events(job_id, after=job["seq"], wait=1)
        raise AssertionError(f"job {job_id} did not finish in {timeout}s: {job}")


async def guest(base_url: str) -> Client:
    http = httpx.AsyncClient(base_url=base_url, timeout=30)
    r = await http.post("/api/sessions")
    assert r.status_code == 201, r.text
    data = r.json()
    http.headers["Authorization"] = f"Bearer {data['token']}"
    http.cookies.clear()  # tests authenticate by header unless they say otherwise
    return Client(http, data["token"], data["owner"])


@pytest.fixture
async def client(shared_server: Proc) -> AsyncIterator[Client]:
    """A new guest on the module's shared server."""
    c = await guest(shared_server.url)
    yield c
    await c.http.aclose()


def assert_alike(a: httpx.Response, b: httpx.Response) -> None:
    """Two responses a client cannot tell apart: status, body bytes and every header
    but the date."""
    def headers(r: httpx.Response) -> list[tuple[str, str]]:
        return [(k, v) for k, v in r.headers.multi_items() if k != "date"]

    assert (a.status_code, a.content) == (b.status_code, b.content), (a.url, b.url)
    assert headers(a) == headers(b), (a.url, b.url)


def new_id() -> str:
    return uuid.uuid4().hex
