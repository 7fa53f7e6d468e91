"""Coalescing concurrent identical store calls: shared, but never answered from a call that
started before the caller arrived (a claimed session or a finished job is seen at once)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from jobwire.coalesce import Coalescer


async def test_callers_queued_together_share_the_first_callers_call() -> None:
    """The first caller runs its own call at once; the 49 that arrive while it runs (as
    a store call always suspends) share one next call, the first of them's."""
    shared: Coalescer[str, str] = Coalescer()
    made: list[int] = []

    def call(n: int) -> Callable[[], Awaitable[str]]:
        async def run() -> str:
            made.append(n)
            await asyncio.sleep(0)
            return f"made by {n}"
        return run

    answers = await asyncio.gather(*(shared.run("k", call(n)) for n in range(50)))
    assert made == [0, 1]
    assert answers == [("made by 0", True), ("made by 1", True)] + [("made by 1", False)] * 48


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
        n = calls
        await asyncio.sleep(0)
        if n == 2:
            await release.wait()
            raise RuntimeError("database unavailable")
        return n

    alone = asyncio.create_task(shared.run("k", flaky))
    first = [asyncio.create_task(shared.run("k", flaky)) for _ in range(3)]
    while calls < 2:  # the first caller's call, then the round of the three behind it
        await asyncio.sleep(0)
    later = asyncio.create_task(shared.run("k", flaky))
    await asyncio.sleep(0)
    release.set()
    assert await alone == (1, True)
    for task in first:
        with pytest.raises(RuntimeError, match="database unavailable"):
            await task
    assert await later == (3, True)


async def test_callers_that_hang_up_leave_the_others_answered() -> None:
    shared: Coalescer[str, str] = Coalescer()
    release = asyncio.Event()

    def call(name: str) -> Callable[[], Awaitable[str]]:
        async def run() -> str:
            await release.wait()
            return name
        return run

    running = asyncio.create_task(shared.run("k", call("running")))
    gone = asyncio.create_task(shared.run("k", call("gone")))
    stays = [asyncio.create_task(shared.run("k", call(f"c{n}"))) for n in range(3)]
    await asyncio.sleep(0)  # all queued behind the running call
    gone.cancel()
    release.set()
    assert await running == ("running", True)
    assert await asyncio.gather(*stays) == [("c0", True), ("c0", False), ("c0", False)]
    assert gone.cancelled()


async def test_a_cancelled_lone_caller_hands_the_next_round_on() -> None:
    """The caller running its own call hangs up: those who arrived meanwhile still get
    a call of theirs."""
    shared: Coalescer[str, str] = Coalescer()
    never = asyncio.Event()

    async def stuck() -> str:
        await never.wait()
        return "stuck"

    async def fine() -> str:
        return "fine"

    lone = asyncio.create_task(shared.run("k", stuck))
    await asyncio.sleep(0)
    waiting = asyncio.create_task(shared.run("k", fine))
    await asyncio.sleep(0)
    lone.cancel()
    assert await asyncio.wait_for(waiting, 5) == ("fine", True)


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
