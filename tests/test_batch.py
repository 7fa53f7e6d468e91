"""Group commit: calls that arrive together share one write, and each caller still gets
its own outcome."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from jobwire.store.batch import Batcher


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def write(self, requests: list[int]) -> Sequence[str | BaseException]:
        self.batches.append(requests)
        await self.gate.wait()
        if 13 in requests:
            raise OSError("disk full")
        return [ValueError(f"odd {r}") if r % 2 else f"ok {r}" for r in requests]


async def test_calls_of_one_moment_share_a_write_and_later_ones_the_next() -> None:
    rec = Recorder()
    rec.gate.clear()
    batch = Batcher(rec.write)
    first = [asyncio.create_task(batch(r)) for r in (0, 2, 4)]
    await asyncio.sleep(0.01)
    assert rec.batches == [[0, 2, 4]]
    later = [asyncio.create_task(batch(r)) for r in (6, 8)]  # while the first is written
    await asyncio.sleep(0.01)
    assert rec.batches == [[0, 2, 4]], "one write at a time"
    rec.gate.set()
    assert await asyncio.gather(*first, *later) == ["ok 0", "ok 2", "ok 4", "ok 6", "ok 8"]
    assert rec.batches == [[0, 2, 4], [6, 8]]


async def test_each_caller_gets_its_own_outcome_or_the_writes_failure() -> None:
    rec = Recorder()
    batch = Batcher(rec.write)
    outcomes = await asyncio.gather(batch(2), batch(3), batch(4), return_exceptions=True)
    assert outcomes[0] == "ok 2" and outcomes[2] == "ok 4"
    assert isinstance(outcomes[1], ValueError) and str(outcomes[1]) == "odd 3"
    failed = await asyncio.gather(batch(12), batch(13), return_exceptions=True)
    assert all(isinstance(o, OSError) for o in failed), "a failed write fails its whole batch"
    assert await batch(10) == "ok 10", "and the next batch is written as usual"


async def test_a_caller_that_stops_waiting_still_has_its_request_written() -> None:
    rec = Recorder()
    rec.gate.clear()
    batch = Batcher(rec.write)
    waiting = asyncio.create_task(batch(2))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    rec.gate.set()
    assert await batch(4) == "ok 4"
    assert rec.batches == [[2], [4]]
