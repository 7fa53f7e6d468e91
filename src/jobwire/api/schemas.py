"""Request and response bodies of the HTTP API, as OpenAPI shows them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class SubmitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, max_length=200)
    input: Any = None
    key: str | None = Field(default=None, min_length=1, max_length=500)


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


class SubmitOut(BaseModel):
    created: bool
    job: JobOut


class SessionOut(BaseModel):
    token: str
    owner: str


class ClaimRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=1, max_length=500, description="the guest session's token")


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
