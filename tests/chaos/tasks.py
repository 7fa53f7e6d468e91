"""The test tasks plus two the chaos suite needs: bulky events and attempt-stamped items."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from pydantic import BaseModel, Field

from jobwire import Context, Jobwire
from jobwire.model import ItemStatus
from jobwire.store import ItemUpdate
from tests.tasks import jobwire as base

jobwire = Jobwire()
jobwire.tasks.update(base.tasks)


class Chatter(BaseModel):
    n: int = Field(ge=1, le=100_000)
    size: int = Field(0, ge=0, le=1 << 20)
    batch: int = Field(100, ge=1, le=1000)
    gate: str | None = None  # a file path: start once it exists


async def wait_for_gate(gate: str | None) -> None:
    while gate and not Path(gate).exists():
        await asyncio.sleep(0.02)


@jobwire.task(input=Chatter, max_attempts=1)
async def chatter(ctx: Context, input: Chatter) -> int:
    """n items finished in batches, each with a result of `size` bytes: many big events."""
    await wait_for_gate(input.gate)
    pad = "x" * input.size
    refs = [f"c{k}" for k in range(input.n)]
    await ctx.declare(refs)
    for start in range(0, input.n, input.batch):
        await ctx.update([ItemUpdate(ref, ItemStatus.DONE, {"pad": pad})
                          for ref in refs[start:start + input.batch]])
    return input.n


class Crunch(BaseModel):
    n: int = Field(ge=0, le=1000)
    delay: float = Field(0.0, ge=0, le=1)


@jobwire.task(input=Crunch, max_attempts=4)
async def crunch(ctx: Context, input: Crunch) -> dict[str, int]:
    """n items, each stamped with the pid and attempt that ran it, so a test can tell
    whether a worker wrote after losing its lease."""
    items = await ctx.declare([f"k{k}" for k in range(input.n)])
    for item in items:
        if item.status in ("done", "failed"):
            continue
        await ctx.running(item.ref)
        await asyncio.sleep(input.delay)
        await ctx.done(item.ref, {"pid": os.getpid(), "attempt": ctx.attempt})
    return {"attempt": ctx.attempt}
