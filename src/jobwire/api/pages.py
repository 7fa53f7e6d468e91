"""The pages at `/` and `/admin`, and the sample posts the demo's extract_post reads."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, HTMLResponse

from jobwire.demo.posts import POSTS, render_post

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    from jobwire.api import STATIC

    return FileResponse(STATIC / "index.html")


@router.get("/admin")
async def admin() -> FileResponse:
    """The operator view: static, so it asks for the service key before it shows anything."""
    from jobwire.api import STATIC

    return FileResponse(STATIC / "admin.html")


@router.get("/demo/posts/{n}", response_class=HTMLResponse)
async def demo_post(n: int) -> str:
    if not 0 <= n < len(POSTS):
        raise HTTPException(404, f"there are posts 0 to {len(POSTS) - 1}")
    return render_post(n)
