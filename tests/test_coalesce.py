"""Coalescing concurrent identical store calls: shared, but never answered from a call that
started before the caller arrived (a claimed session or a finished job is seen at once)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from jobwire.coalesce import Coalescer


async def test_callers_queued_together_share_the_first_callers_call() -> None:
    shared: Coalescer[str, str] = Coalescer()
    made: list[int] = []

    def call(n: int) -> Callable[[], Awaitable[str]]:
        async def run() -> str:
            made.append(n)
            return f"made by {n}"
        return run

    answers = await asyncio.gather(*(shared.run("k", call(n)) for n in range(50)))
    assert made == [0]
    assert answers == [("made by 0", True)] + [("made by 0", False)] * 49


async def test_a_caller_arriving_during_a_call_gets_the_next_call() -> None:
    """The state changes (a session is claimed) while a lookup runs; a caller that arrives
    after the change must not be answered by the lookup that started before it."""
    shared: Coalescer[str, str | None] = Coalescer()
    session: dict[str, str | None] = {"owner": "guest:g"}
    started, release = asyncio.Event(), asyncio.Event()

    async def lookup() -> str | None:
        seen = session["owner"]
        started.set()
        await release.wait()
        return seen

    early = asyncio.create_task(shared.run("token", lookup))
    await started.wait()
    session["owner"] = None  # claimed: the guest token must stop working now
    late = asyncio.create_task(shared.run("token", lookup))
    await asyncio.sleep(0)
    release.set()
    assert await early == ("guest:g", True)
    assert await late == (None, True)


async def test_an_error_reaches_its_round_only() -> None:
    shared: Coalescer[str, int] = Coalescer()
    calls = 0
    release = asyncio.Event()

    async def flaky() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            await release.wait()
            raise RuntimeError("database unavailable")
        return calls

    first = [asyncio.create_task(shared.run("k", flaky)) for _ in range(3)]
    await asyncio.sleep(0)
    later = asyncio.create_task(shared.run("k", flaky))
    release.set()
    for task in first:
        with pytest.raises(RuntimeError, match="database unavailable"):
            await task
    assert await later == (2, True)


async def test_callers_that_hang_up_leave_the_others_answered() -> None:
    shared: Coalescer[str, str] = Coalescer()

    def call(name: str) -> Callable[[], Awaitable[str]]:
        async def run() -> str:
            return name
        return run

    gone = asyncio.create_task(shared.run("k", call("gone")))
    stays = [asyncio.create_task(shared.run("k", call(f"c{n}"))) for n in range(3)]
    await asyncio.sleep(0)  # all queued; the round has not started yet
    gone.cancel()
    assert await asyncio.gather(*stays) == [("c0", True), ("c0", False), ("c0", False)]
    assert gone.cancelled()


async def test_keys_do_not_wait_for_each_other() -> None:
    shared: Coalescer[str, str] = Coalescer()
    release = asyncio.Event()

    async def slow() -> str:
        await release.wait()
        return "slow"

    async def fast() -> str:
        return "fast"

    blocked = asyncio.create_task(shared.run("a", slow))
    assert await asyncio.wait_for(shared.run("b", fast), 5) == ("fast", True)
    release.set()
    assert await blocked == ("slow", True)
