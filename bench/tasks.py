"""The jobwire tasks the benchmarks run: a no-op, and a job reporting many item updates."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from pydantic import BaseModel, Field

from jobwire import Context, Jobwire, SyncContext

jobwire = Jobwire()


@jobwire.task(max_attempts=1)
async def noop(ctx: Context, input: object) -> None:
    return None


class Progress(BaseModel):
    items: int = Field(ge=1, le=100_000)
    gate: str  # a file: the task starts reporting once it exists (all subscribers ready)
    rate: float | None = Field(None, gt=0, le=1e6)  # updates/s at most; None: all it can


@jobwire.task(input=Progress, max_attempts=1)
async def progress(ctx: Context, input: Progress) -> int:
    """Declares `items` items, then marks each done with the wall time of the call as
    its result, so a subscriber measures the latency from here to its screen. With a
    `rate`, the k-th update is made no earlier than k / rate seconds after the first."""
    refs = [str(k) for k in range(input.items)]
    await ctx.declare(refs)
    deadline = time.monotonic() + 120
    while not Path(input.gate).exists():  # noqa: ASYNC240 - a cheap stat, polled
        if time.monotonic() > deadline:
            raise TimeoutError("the subscribers never got ready")
        await asyncio.sleep(0.01)
    start = time.monotonic()
    for k, ref in enumerate(refs):
        if input.rate is not None and (ahead := start + k / input.rate - time.monotonic()) > 0:
            await asyncio.sleep(ahead)
        await ctx.done(ref, {"t": time.time()})
    return input.items


class Busy(BaseModel):
    seconds: float = Field(gt=0, le=600)


@jobwire.task(input=Busy, max_attempts=1)
def spin(ctx: SyncContext, input: Busy) -> int:
    """A sync task that keeps the CPU busy in pure Python (holding the GIL) for a while,
    or until cancelled."""
    end, rounds = time.monotonic() + input.seconds, 0
    while time.monotonic() < end and not ctx.cancelled:
        rounds += sum(range(1000)) > 0
    return rounds


@jobwire.task(input=Busy, max_attempts=1)
def snooze(ctx: SyncContext, input: Busy) -> None:
    """A sync task blocked in a call that releases the GIL (I/O, a C library's wait) for a
    while, or until cancelled."""
    end = time.monotonic() + input.seconds
    while time.monotonic() < end and not ctx.cancelled:
        time.sleep(0.1)
