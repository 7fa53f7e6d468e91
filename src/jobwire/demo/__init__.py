"""The demo tasks `jobwire serve` runs by default: real work, no sleeping."""

from __future__ import annotations

import asyncio
from typing import Annotated

import httpx
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from jobwire import Context, ItemStatus, Jobwire
from jobwire.demo.audio import features
from jobwire.demo.posts import extract

jobwire = Jobwire()

TrackId = Annotated[str, StringConstraints(min_length=1, max_length=100)]
MAX_PAGE_BYTES = 2 * 1024 * 1024


class Tracks(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tracks: list[TrackId] = Field(min_length=1, max_length=5000)


class Post(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(pattern=r"^https?://[^\s]+$", max_length=2000)


@jobwire.task(input=Tracks)
async def analyze_tracks(ctx: Context, input: Tracks) -> dict[str, object]:
    """Loudness, zero-crossing rate and tempo of each track; one item per track."""
    done: list[dict[str, float]] = []
    for item in await ctx.declare(input.tracks):
        if item.status == ItemStatus.DONE:  # finished by an earlier attempt
            done.append(item.result)
            continue
        if item.status == ItemStatus.FAILED:
            continue
        ctx.raise_if_cancelled()
        await ctx.running(item.ref)
        try:
            found = await asyncio.to_thread(features, item.ref)
        except Exception as exc:  # one bad track fails its item, not the job
            await ctx.failed(item.ref, f"{type(exc).__name__}: {exc}")
        else:
            await ctx.done(item.ref, found)
            done.append(found)
    if not done:
        return {"tracks": 0}
    return {
        "tracks": len(done),
        "mean_loudness_db": round(sum(r["loudness_db"] for r in done) / len(done), 2),
        "mean_tempo_bpm": round(sum(r["tempo_bpm"] for r in done) / len(done), 1),
    }


@jobwire.task(input=Post, key=lambda post: post.url)
async def extract_post(ctx: Context, input: Post) -> dict[str, object]:
    """Title, text and links of a web page (the same URL while active is one job)."""
    await ctx.declare(["fetch", "extract"])
    await ctx.running("fetch")
    async with httpx.AsyncClient(timeout=10, follow_redirects=True, max_redirects=5) as http:
        async with http.stream("GET", input.url) as response:
            response.raise_for_status()
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > MAX_PAGE_BYTES:
                    raise ValueError(f"page larger than {MAX_PAGE_BYTES} bytes")
                chunks.append(chunk)
            page = b"".join(chunks).decode(response.encoding or "utf-8", "replace")
            final_url = str(response.url)
    await ctx.done("fetch", {"status": response.status_code, "bytes": size})
    ctx.raise_if_cancelled()
    await ctx.running("extract")
    post = extract(page, final_url)
    await ctx.done("extract", {"links": len(post.links)})
    return post.as_dict()
