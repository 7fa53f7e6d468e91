"""jobwire inside a host ASGI app: `jobs = jobwire.asgi(tasks, ...)` is both the app the
host mounts (`app.mount("/jobs", jobs)`) and the runtime its backend submits jobs with
(`await jobs.submit(owner, task, input)`).

Starlette runs the lifespan of the top-level app only, so the host starts jobwire in
its own: `FastAPI(lifespan=jobs.lifespan)`, or `async with jobs.lifespan(): yield` among
its other resources. Forgetting it is loud: every request to the mount answers 503 and
logs "jobwire was mounted but never started", and `jobs.submit` raises NotStarted. It
does not start by itself on a first request: nothing would ever stop it (running jobs
would wait out their leases after every deploy) and a host's in-process submits before
that first request would still fail.
"""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

from jobwire.api import create_api
from jobwire.api.auth import Authenticate
from jobwire.api.deps import NOT_STARTED
from jobwire.app import Jobwire
from jobwire.runtime import Runtime
from jobwire.settings import Settings


class Embedded(Runtime):
    """A runtime with its HTTP API, dashboard and live delivery as one ASGI app."""

    not_started = NOT_STARTED

    def __init__(self, jobwire: Jobwire, settings: Settings | None = None, *,
                 authenticate: Authenticate | None = None,
                 builtin_auth: bool | None = None) -> None:
        super().__init__(jobwire, settings)
        self.app = create_api(self, authenticate=authenticate, builtin_auth=builtin_auth)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def asgi(jobwire: Jobwire, settings: Settings | None = None, *,
         authenticate: Authenticate | None = None,
         builtin_auth: bool | None = None) -> Embedded:
    """jobwire for mounting in a host app, started by the host's lifespan.

    `authenticate(conn) -> owner | None` (sync or async, given Starlette's
    HTTPConnection for HTTP, SSE and WebSocket alike) names the caller from the host's
    own sign-in: `"user:<id>"` or `"guest:<id>"`. When it answers None, jobwire's own
    sessions decide if `builtin_auth` (default: only when there is no hook), else 401."""
    return Embedded(jobwire, settings, authenticate=authenticate, builtin_auth=builtin_auth)
