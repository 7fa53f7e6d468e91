"""The errors the client raises, one type per thing a caller may want to handle."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class JobwireError(Exception):
    """Base of every client error."""


class TokenError(JobwireError):
    """The token function given to the client raised (its cause is the original error)."""


class Unavailable(JobwireError):
    """The server could not be reached (refused, timed out, connection dropped)."""


class ApiError(JobwireError):
    """The server answered with an error status. `fields` are a validation error's
    entries as the server sent them ({"loc": [...], "msg": ..., "type": ...})."""

    def __init__(self, status: int, detail: str,
                 fields: Sequence[dict[str, Any]] = ()) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.fields = list(fields)


class Unauthorized(ApiError):
    """401: the token is missing, invalid or expired."""


class JobNotFound(ApiError):
    """404: no such job for this owner (missing and foreign jobs look alike)."""


class SessionNotFound(ApiError):
    """404 from a claim: the guest session is unknown or expired."""


class JobActive(ApiError):
    """409: the job is still queued or running (e.g. on delete)."""


class InvalidRequest(ApiError):
    """422: an unknown task or a bad input; the message names the field."""


class ServerUnavailable(ApiError, Unavailable):
    """502/503/504: the server (or its database) cannot answer now; retrying may work."""


class JobEnded(JobwireError):
    """A job reached a terminal state other than completed."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        super().__init__(f"job {job['id']} {job['status']}"
                         + (f": {job['error']}" if job.get("error") else ""))


class JobFailed(JobEnded):
    """The job ended `failed`; `.job["error"]` says why."""


class JobCancelled(JobEnded):
    """The job ended `cancelled`."""


_BY_STATUS: dict[int, type[ApiError]] = {
    401: Unauthorized, 404: JobNotFound, 409: JobActive, 422: InvalidRequest,
    502: ServerUnavailable, 503: ServerUnavailable, 504: ServerUnavailable,
}


def api_error(status: int, detail: str, fields: Sequence[dict[str, Any]] = ()) -> ApiError:
    return _BY_STATUS.get(status, ApiError)(status, detail, fields)
