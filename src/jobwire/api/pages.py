"""The page at `/` and the sample posts the demo's extract_post task reads offline."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, HTMLResponse

from jobwire.demo.posts import POSTS, render_post

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    from jobwire.api import STATIC

    return FileResponse(STATIC / "index.html")


@router.get("/demo/posts/{n}", response_class=HTMLResponse)
async def demo_post(n: int) -> str:
    if not 0 <= n < len(POSTS):
        raise HTTPException(404, f"there are posts 0 to {len(POSTS) - 1}")
    return render_post(n)
