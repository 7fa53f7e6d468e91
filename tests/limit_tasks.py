"""Tasks of the concurrency-limit tests (tests/test_limits.py): each run appends a
`start` and an `end` line to the file JOBWIRE_TEST_RUN_LOG, so the order of the lines
(appends from any number of processes are serialised) tells how many ran at once."""

from __future__ import annotations

import asyncio
import json
import os

from jobwire import Context, Jobwire

jobwire = Jobwire()


def _log(ctx: Context, group: str, what: str) -> None:
    line = json.dumps({"job": ctx.job.id, "group": group, "owner": ctx.job.owner,
                       "what": what}) + "\n"
    fd = os.open(os.environ["JOBWIRE_TEST_RUN_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


async def _run(ctx: Context, group: str, seconds: float) -> None:
    _log(ctx, group, "start")
    await asyncio.sleep(seconds)
    _log(ctx, group, "end")


@jobwire.task(concurrency=1)
async def one_per_owner(ctx: Context, input: dict[str, float]) -> None:
    """At most one running per owner: an import."""
    await _run(ctx, ctx.job.owner, input["s"])


@jobwire.task(concurrency=3, concurrency_key=lambda input, owner: f"{owner} {input['api']}")
async def three_per_api(ctx: Context, input: dict[str, float]) -> None:
    """At most three running per owner and API: calls of a rate-limited service."""
    await _run(ctx, f"{ctx.job.owner} {input['api']}", input["s"])
