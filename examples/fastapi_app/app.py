"""A FastAPI app with jobwire inside it: mounted at /jobs, the callers identified by the
app's own login, and a route of the app submitting jobs in-process. The lines marked
`# jobwire` are all the jobwire-specific code (README.md in this folder: how to run it)."""

from __future__ import annotations

import os

from fastapi import FastAPI, Request

import jobwire  # jobwire
from examples import hostapp
from jobwire.demo import jobwire as tasks  # jobwire: the demo's analyze_tracks task

settings = jobwire.Settings(db=os.environ.get("JOBWIRE_DB", "sqlite:///fastapi_app.db"))  # jobwire
# The app's own session names the caller, on HTTP, SSE and the WebSocket alike: its
# "user:<name>" or "guest:<id>", or None (401).
jobs = jobwire.asgi(tasks, settings, authenticate=hostapp.owner_of)  # jobwire
app = FastAPI(lifespan=jobs.lifespan)  # jobwire: the app's lifespan starts and stops it
app.mount("/jobs", jobs)  # jobwire: the API, SSE and WebSocket under /jobs/api
app.include_router(hostapp.router({"jobwire-url": "/jobs", "submit-url": "/analyse"},
                                  guests=True))


@app.post("/analyse")
async def analyse(request: Request) -> dict[str, str]:
    """Starts "analyse my liked tracks" for the signed-in user, in-process."""
    owner = hostapp.signed_in(request)
    job, _ = await jobs.submit(owner, "analyze_tracks",  # jobwire
                               {"tracks": hostapp.liked_tracks(owner)})  # jobwire
    return {"job": job.id}  # jobwire


if __name__ == "__main__":
    hostapp.run(app, default_port=8002)
