"""The demo tasks `jobwire serve` runs by default: real work, no sleeping."""

from __future__ import annotations

import asyncio
import ipaddress
import re
from typing import Annotated

import httpx
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints
from pydantic_core import PydanticCustomError

from jobwire import Context, ItemStatus, Jobwire
from jobwire.context import Cancelled
from jobwire.demo.audio import features
from jobwire.demo.posts import POSTS, extract, render_post
from jobwire.netguard import FetchError, Page, Unavailable, fetch, redact
from jobwire.runner import error_text
from jobwire.settings import Settings
from jobwire.store import StoreError

jobwire = Jobwire()

TrackId = Annotated[str, StringConstraints(min_length=1, max_length=100)]
MAX_PAGE_BYTES = 2 * 1024 * 1024
SAMPLE_PATH = re.compile(r"/demo/posts/([0-9]+)")


class Tracks(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tracks: list[TrackId] = Field(min_length=1, max_length=5000)


def _web_url(url: str) -> str:
    if not re.fullmatch(r"https?://[^\s]+", url):
        raise PydanticCustomError("web_url", "must be an http:// or https:// address")
    return url


class Post(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: Annotated[str, Field(max_length=2000), AfterValidator(_web_url)]


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


def sample_post(url: str) -> Page | None:
    """The page of a sample post at a loopback host (what the dashboard submits: this
    server's own /demo/posts/N), made here: loopback is never fetched by default."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return None  # fetch() refuses it
    found = SAMPLE_PATH.fullmatch(parsed.path)
    if found is None or int(found[1]) >= len(POSTS) or parsed.userinfo:
        return None
    host = parsed.host.rstrip(".")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost" or host.endswith(".localhost")
    if not loopback:
        return None
    return Page(url, 200, render_post(int(found[1])).encode(), "utf-8")


# Keyed by the URL as it may be quoted: the key is in every job listing and event.
# Retried (with backoff) only when the fetch may work later: a 404 or a refused address
# fails at once.
@jobwire.task(input=Post, key=lambda post: redact(post.url), retry_on=(Unavailable,))
async def extract_post(ctx: Context, input: Post) -> dict[str, object]:
    """Title, text and links of a web page (the same URL while active is one job)."""
    await ctx.declare(["fetch", "extract"])
    step = "fetch"
    try:
        await ctx.running(step)
        # Read at call time: the fetch settings come from the environment alone.
        settings = Settings()
        page = sample_post(input.url) or await fetch(
            input.url, max_bytes=MAX_PAGE_BYTES, deadline=settings.fetch_deadline,
            allow_private=settings.fetch_allow_private)
        await ctx.done(step, {"status": page.status, "bytes": len(page.body)})
        ctx.raise_if_cancelled()
        step = "extract"
        await ctx.running(step)
        post = extract(page.text, page.url)
    except (Cancelled, StoreError):
        raise  # not the step's failure: cancelled, or the database failed under it
    except Exception as exc:
        # The step that was running shows that it failed and why; only when no attempt
        # follows, since an item that failed stays failed.
        if not isinstance(exc, Unavailable) or ctx.final_attempt:
            await ctx.failed(step, str(exc) if isinstance(exc, FetchError) else error_text(exc))
        raise
    await ctx.done(step, {"links": len(post.links)})
    return post.as_dict()
