"""Tasks for the test suite: controllable timing, items, failures and cancellation."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path

from pydantic import BaseModel, Field

from jobwire import Cancelled, Context, Jobwire, SyncContext

jobwire = Jobwire()


class Steps(BaseModel):
    n: int = Field(ge=0, le=100_000)
    delay: float = Field(0.0, ge=0, le=5)
    fail_at: int | None = None  # item index whose processing fails
    gate: str | None = None  # a file path: wait for it to exist before each item


@jobwire.task(input=Steps, max_attempts=2)
async def steps(ctx: Context, input: Steps) -> dict[str, int]:
    """n items, each running then done (or failed at fail_at)."""
    items = await ctx.declare([f"i{k}" for k in range(input.n)])
    ran = 0
    for k, item in enumerate(items):
        if item.status in ("done", "failed"):
            continue
        while input.gate and not Path(input.gate).exists():
            await asyncio.sleep(0.02)
        await ctx.running(item.ref)
        if input.delay:
            await asyncio.sleep(input.delay)
        if k == input.fail_at:
            await ctx.failed(item.ref, "item failed on purpose")
        else:
            await ctx.done(item.ref, {"k": k, "pid": os.getpid()})
        ran += 1
    return {"ran": ran}


class Block(BaseModel):
    cooperative: bool = True


@jobwire.task(input=Block)
async def block(ctx: Context, input: Block) -> None:
    """Runs until cancelled: polls the flag, or (cooperative=false) just awaits."""
    await ctx.report({"stage": "blocking"})
    while True:
        if input.cooperative:
            ctx.raise_if_cancelled()
        await asyncio.sleep(0.01)


@jobwire.task(max_attempts=1)  # fails at once: what a failed job looks like
async def boom(ctx: Context, input: object) -> None:
    raise RuntimeError("boom on purpose")


@jobwire.task()
async def echo(ctx: Context, input: object) -> object:
    return input


class Hostile(BaseModel):
    names: list[str]
    error: str = "failed on purpose"
    gate: str | None = None  # a file path: wait for it to exist before the items


@jobwire.task(input=Hostile, max_attempts=1)
async def hostile(ctx: Context, input: Hostile) -> dict[str, list[str]]:
    """Items named by the guest; the first fails with `error`. Then the job fails with it
    too: every text the CLI or the log shows comes from the guest."""
    items = await ctx.declare(input.names)
    while input.gate and not Path(input.gate).exists():
        await asyncio.sleep(0.02)
    await ctx.failed(items[0].ref, input.error)
    for item in items[1:]:
        await ctx.done(item.ref, {"name": item.ref})
    await ctx.report({"stage": input.error})
    raise RuntimeError(input.error)


@jobwire.task(input=Steps, max_attempts=2)
def sync_steps(ctx: SyncContext, input: Steps) -> dict[str, object]:
    """`steps` as a plain def, on a thread: its items, a report, and the thread's name."""
    items = ctx.declare([f"i{k}" for k in range(input.n)])
    ctx.report({"stage": "items", "thread": threading.current_thread().name})
    for k, item in enumerate(items):
        ctx.running(item.ref)
        if input.delay:
            time.sleep(input.delay)
        if k == input.fail_at:
            ctx.failed(item.ref, "item failed on purpose")
        else:
            ctx.done(item.ref, {"k": k})
    return {"ran": len(items), "thread": threading.current_thread().name}


class Marked(BaseModel):
    marker: str  # a file the task writes what happened to it into, when it is over
    seconds: float = Field(0.0, ge=0, le=30)


@jobwire.task(input=Marked)
def sync_block(ctx: SyncContext, input: Marked) -> None:
    """Runs until cancelled, polling raise_if_cancelled; writes down what it saw."""
    ctx.report({"stage": "blocking"})
    try:
        while True:
            ctx.raise_if_cancelled()
            time.sleep(0.01)
    except Cancelled as exc:
        Path(input.marker).write_text(type(exc).__name__)
        raise


@jobwire.task(input=Marked, timeout=0.5, max_attempts=1)
async def nap(ctx: Context, input: Marked) -> str:
    """Sleeps `seconds`, past its 0.5 s timeout if asked."""
    await ctx.report({"stage": "napping"})
    await asyncio.sleep(input.seconds)
    return "woke"


@jobwire.task(input=Marked, timeout=0.5, max_attempts=1)
def sync_nap(ctx: SyncContext, input: Marked) -> str:
    """Blocks in time.sleep (deaf to cancellation), then tries to record its item and
    writes down whether that was refused, and when it returned."""
    ctx.declare(["late"])
    time.sleep(input.seconds)
    try:
        ctx.done("late", "recorded after the nap")
        outcome = "recorded"
    except Cancelled as exc:
        outcome = f"refused: {type(exc).__name__}: {exc}"
    Path(input.marker).write_text(json.dumps({"outcome": outcome, "at": time.time()}))
    return "woke"


@jobwire.task(priority=2, priority_range=(-5, 10), queue="media")
async def ranked(ctx: Context, input: object) -> object:
    """A task whose submitters may choose a priority from -5 to 10; in queue `media`."""
    return input
