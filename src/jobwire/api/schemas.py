"""Request and response bodies of the HTTP API, as OpenAPI shows them."""

from __future__ import annotations

from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field

from jobwire.app import Submission

NO_NUL = "^[^\x00]*$"  # PostgreSQL text cannot hold NUL, so neither backend accepts it


SubmitRequest = Submission  # the body of POST /api/jobs: what the runtime validates


class ErrorOut(BaseModel):
    detail: str


ERRORS = {
    400: "the body is not valid JSON",
    401: "no token, or an invalid or expired one",
    403: "the caller is not allowed to do this (or a cross-site request with the cookie)",
    404: "no such job (a job of another owner answers the same)",
    409: "the job's state does not allow this",
    413: "the request body is over the size limit",
    429: "over a limit of this caller (the detail says which); retry later",
    503: "the database is unavailable; retry later",
}


def bad_last_event_id(what: str) -> RequestValidationError:
    """A 422 in the shape of every other validation error, naming the header."""
    return RequestValidationError([{"loc": ("header", "last-event-id"),
                                    "msg": f"Last-Event-ID must be {what}",
                                    "type": "value_error"}])


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error statuses, each answered as {"detail": "..."}."""
    return {code: {"model": ErrorOut, "description": ERRORS[code]} for code in codes}


class ProgressOut(BaseModel):
    total: int
    done: int
    failed: int


class JobOut(BaseModel):
    id: str
    task: str
    key: str | None
    owner: str
    status: Literal["queued", "running", "completed", "failed", "cancelled"]
    progress: ProgressOut
    result: Any = None
    error: str | None = None
    info: Any = None
    attempt: int
    cancel_requested: bool
    seq: int
    created_at: str
    updated_at: str
    finished_at: str | None = None
    run_at: str | None = Field(default=None, description=(
        "not started before this (a delayed submit, or a retry's backoff); null: at once"))
    priority: int = Field(default=0, description="claimed before jobs of lower priority")
    queue: str = Field(default="default", description="claimed by workers serving it")


class SubmitOut(BaseModel):
    created: bool
    job: JobOut


class SessionOut(BaseModel):
    token: str | None = Field(description="null for a session the request's HttpOnly "
                                          "cookie holds")
    owner: str
    previous: Literal["ended"] | None = Field(None, description=(
        "`ended`: the request's session cookie named a session that has ended (claimed by "
        "a user, revoked or expired), so this is a new guest without its jobs"))


class TicketOut(BaseModel):
    ticket: str
    expires_in: int  # seconds


class ClaimRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=1, max_length=500, description="the guest session's token")


class SignInRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=1, max_length=500, description="a user's token")


class ClaimOut(BaseModel):
    owner: str
    moved: int


class ItemOut(BaseModel):
    ref: str
    status: Literal["pending", "running", "done", "failed"]
    result: Any = None
    error: str | None = None


class ItemsOut(BaseModel):
    job: str
    seq: int
    items: list[ItemOut]


class EventOut(BaseModel):
    job: str
    seq: int
    type: str
    data: dict[str, Any]
    at: str


class EventsOut(BaseModel):
    job: str
    events: list[EventOut]
