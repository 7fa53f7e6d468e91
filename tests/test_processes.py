"""`jobwire serve --processes N`: N processes on one port, each taking connections and
running jobs; events reach sockets on every process; one killed is replaced; SIGTERM
stops all (jobs handed back) and a killed supervisor takes its processes with it; the
guest-session rate is shared among them, not multiplied."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from jobwire.store import open_store
from tests.conftest import Proc, cli, guest
from tests.wsframes import Messages

WAIT = 30.0  # seconds for a process to start, stop or be replaced


def children(proc: Proc) -> list[int]:
    assert proc.proc is not None
    pid = proc.proc.pid
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def sockets_of(pid: int) -> int:
    """The sockets a process holds now (one it closes while they are counted is not)."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):
            count += os.readlink(fd).startswith("socket:")
    return count


async def until(check: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


def serving(procs: Any, tmp_path: Path, start: bool = True) -> Proc:
    """`jobwire serve --processes 2` on a SQLite file of the test's own."""
    proc: Proc = procs("serve", "--db", f"sqlite:///{tmp_path / 'jobwire.db'}",
                       "--processes", "2", start=start)
    return proc


@pytest.fixture
def two(procs: Any, tmp_path: Path) -> Proc:
    return serving(procs, tmp_path)


async def test_each_process_takes_connections_and_a_killed_one_is_replaced(two: Proc) -> None:
    first = children(two)
    assert len(first) == 2
    before = {pid: sockets_of(pid) for pid in first}
    held = []
    for _ in range(40):  # new connections, each answered, all kept open
        s = socket.create_connection(("127.0.0.1", two.port or 0))
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 200")
        held.append(s)
    assert all(sockets_of(pid) > before[pid] for pid in first), "both took connections"
    for s in held:
        s.close()
    os.kill(first[0], signal.SIGKILL)
    await until(lambda: len(children(two)) == 2 and first[0] not in children(two),
                "the killed process is replaced")
    async with httpx.AsyncClient(base_url=two.url) as http:
        for _ in range(10):
            assert (await http.get("/healthz")).status_code == 200


async def test_a_jobs_events_reach_its_subscribers_on_every_process(
        two: Proc, tmp_path: Path) -> None:
    client = await guest(two.url)
    gate = tmp_path / "gate"
    job, _ = await client.submit("steps", {"n": 20, "gate": str(gate)})
    url = two.url.replace("http://", "ws://") + f"/api/ws?token={client.token}"
    seen: list[list[int]] = []

    async def follow(ready: asyncio.Event, subscribed: list[None]) -> None:
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"op": "subscribe", "job": job["id"], "after": 0}))
            seqs: list[int] = []
            async for msg in Messages(ws):
                if msg.get("op") == "subscribed":
                    subscribed.append(None)
                    if len(subscribed) == 12:
                        ready.set()
                    continue
                seqs.append(msg["seq"])
                if msg["type"] in ("completed", "failed", "cancelled"):
                    break
            seen.append(seqs)

    ready, subscribed = asyncio.Event(), []
    following = [asyncio.create_task(follow(ready, subscribed)) for _ in range(12)]
    async with asyncio.timeout(WAIT):
        await ready.wait()
        gate.touch()
        await asyncio.gather(*following)
    done = await client.job(job["id"])
    assert done["status"] == "completed"
    assert seen == [list(range(1, done["seq"] + 1))] * 12, "every event, once, in order"
    await client.http.aclose()


async def stopped_by(proc: Proc, stop: Any, tmp_path: Path) -> None:
    """A job running when `stop(proc)` is called is handed back as every process stops."""
    client = await guest(proc.url)
    job, _ = await client.submit("block", {})
    while (await client.job(job["id"]))["status"] != "running":
        await asyncio.sleep(0.05)
    await client.http.aclose()
    pids = children(proc)
    assert proc.proc is not None
    stop(proc.proc)
    assert await asyncio.to_thread(proc.proc.wait, WAIT) == 0
    assert all(gone(pid) for pid in pids)
    store = open_store(f"sqlite:///{tmp_path / 'jobwire.db'}")
    await store.open()
    try:
        found = await store.get_job(job["id"])
        assert found is not None and found.status == "queued", "handed back, not left running"
    finally:
        await store.close()


async def test_sigterm_stops_every_process_and_hands_running_jobs_back(
        two: Proc, tmp_path: Path) -> None:
    await stopped_by(two, lambda p: p.send_signal(signal.SIGTERM), tmp_path)


async def test_ctrl_c_reaches_each_process_once_so_each_stops_cleanly(
        procs: Any, tmp_path: Path) -> None:
    """A terminal's Ctrl-C signals the whole foreground group: every process stops
    cleanly, running jobs handed back (a forced exit would skip that)."""
    proc = serving(procs, tmp_path, start=False)
    proc.preexec = os.setsid  # a group of its own, as a terminal's foreground job
    proc.start()
    await stopped_by(proc, lambda p: os.killpg(p.pid, signal.SIGINT), tmp_path)


async def test_a_killed_supervisor_takes_its_processes_with_it(two: Proc) -> None:
    pids = children(two)
    two.kill()
    await until(lambda: all(gone(pid) for pid in pids), "orphans stop themselves")


async def test_the_guest_session_rate_is_shared_not_multiplied(
        procs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One address, many new connections: the processes together allow the configured
    burst of 4 at most, however the kernel spreads the connections."""
    monkeypatch.setenv("JOBWIRE_SESSION_RATE", "4/3600s,4")
    server = serving(procs, tmp_path)
    codes = []
    for _ in range(30):
        async with httpx.AsyncClient(base_url=server.url) as http:  # a new connection
            codes.append((await http.post("/api/sessions")).status_code)
    assert set(codes) == {201, 429}
    assert 2 <= codes.count(201) <= 4, codes


def test_a_port_already_taken_fails_at_once_with_a_clear_line(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        r = cli("serve", "--db", f"sqlite:///{tmp_path / 'jobwire.db'}", "--processes", "2",
                "--port", str(port))
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("n", ["0", "-1", "65"])
def test_a_process_count_out_of_range_is_refused(n: str) -> None:
    r = cli("serve", "--processes", n)
    assert r.returncode == 2
    assert r.stderr.strip() == f"jobwire: --processes must be from 1 to 64, not {n}"
