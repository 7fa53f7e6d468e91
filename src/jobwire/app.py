"""The task registry: what jobs exist, how their input is validated, how often they retry."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator

from jobwire.cron import Cron, Every, Schedule
from jobwire.model import JSON, MAX_OWNER_ID, valid_owner

if TYPE_CHECKING:
    from jobwire.context import Context, SyncContext

AsyncTaskFn = Callable[["Context", Any], Awaitable[JSON]]
SyncTaskFn = Callable[["SyncContext", Any], JSON]  # runs on a thread of its own
TaskFn = TypeVar("TaskFn", AsyncTaskFn, SyncTaskFn)


class InputError(ValueError):
    """A submit whose task or input is invalid; `loc` names the field, `type` says how
    (pydantic's error type, e.g. `model_type` for "not an object")."""

    def __init__(self, loc: tuple[str | int, ...], msg: str, type: str = "value_error") -> None:
        super().__init__(msg)
        self.loc = loc
        self.msg = msg
        self.type = type


class Submission(BaseModel):
    """What a submit names, checked the same way over HTTP and in-process."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, max_length=200)
    input: Any = None
    # No control characters: PostgreSQL text cannot hold NUL, and a key is an identifier.
    key: str | None = Field(default=None, min_length=1, max_length=500,
                            pattern=r"^[^\x00-\x1f\x7f]+$")

    @field_validator("task", "input", "key")
    @classmethod
    def storable(cls, value: Any) -> Any:
        """Text both databases can store: valid Unicode without NUL."""
        try:
            encoded = orjson.dumps(value)
        except orjson.JSONEncodeError as exc:  # lone surrogates, nesting past orjson's 255
            raise ValueError(f"cannot be stored as JSON: {exc}") from None
        if b"\\u0000" in encoded:
            raise ValueError("must not contain NUL (\\u0000)")
        return value


def deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays/objects nest more than `limit` deep in `value` (iterative: a deep
    value must not exhaust the stack)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def check_owner(owner: object) -> str:
    """`owner` if it is `user:<id>` or `guest:<id>` (the id 1 to 200 printable
    characters), else InputError naming it."""
    if not isinstance(owner, str) or valid_owner(owner) is None:
        raise InputError(("owner",), f"an owner is 'user:<id>' or 'guest:<id>', the id 1 "
                                     f"to {MAX_OWNER_ID} printable characters")
    return owner


def check_submit(owner: object, task: str, input: JSON, key: str | None,
                 max_depth: int) -> Submission:
    """What `POST /api/jobs` checks of its caller and body, for a submit made in-process
    (the runtime's, or in the host's own transaction): InputError naming the field."""
    check_owner(owner)
    try:
        sub = Submission(task=task, input=input, key=key)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        raise InputError(tuple(first["loc"]), first["msg"]) from None
    if isinstance(input, (dict, list)) and deeper_than(input, max_depth):
        raise InputError(("input",), f"JSON nested too deep: at most {max_depth} levels")
    return sub


@dataclasses.dataclass(frozen=True, slots=True)
class TaskSpec:
    name: str
    fn: AsyncTaskFn | SyncTaskFn
    input_model: type[pydantic.BaseModel] | None
    max_attempts: int
    key: Callable[[Any], str] | None = None  # dedup key derived from the input
    timeout: float | None = None  # seconds per attempt; None: the worker's default

    @property
    def sync(self) -> bool:
        """A plain `def`, run on a thread (jobwire.runner)."""
        return not inspect.iscoroutinefunction(self.fn)

    def parse(self, raw: JSON) -> Any:
        """The value handed to the task: the validated model, or the raw JSON."""
        if self.input_model is None:
            return raw
        return self.input_model.model_validate(raw)


@dataclasses.dataclass(frozen=True, slots=True)
class PeriodicSpec:
    """A task run on a schedule with a fixed input (jobwire.periodic runs them)."""

    task: str
    schedule: Schedule
    input: JSON
    catch_up: bool


class Jobwire:
    """A set of tasks. Register with `@jw.task(input=Model)` on a function
    `(ctx, input) -> JSON result`: an `async def` taking a `Context`, or a plain `def`
    taking a `SyncContext` (run on a thread)."""

    def __init__(self) -> None:
        self.tasks: dict[str, TaskSpec] = {}
        self.periodics: dict[str, PeriodicSpec] = {}

    def task(
        self,
        name: str | None = None,
        *,
        input: type[pydantic.BaseModel] | None = None,
        max_attempts: int = 3,
        key: Callable[[Any], str] | None = None,
        timeout: float | None = None,
    ) -> Callable[[TaskFn], TaskFn]:
        """`key(input)` gives submissions without an explicit key one, so the same input
        while a job for it is active joins that job. `timeout` (seconds per attempt)
        replaces the worker's default (`Settings.task_timeout`)."""
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if timeout is not None and not timeout > 0:
            raise ValueError("timeout must be more than 0 seconds")

        def register(fn: TaskFn) -> TaskFn:
            task_name = name or fn.__name__
            if task_name in self.tasks:
                raise ValueError(f"task {task_name!r} is already registered")
            self.tasks[task_name] = TaskSpec(task_name, fn, input, max_attempts, key, timeout)
            return fn

        return register

    def periodic(
        self,
        cron: str | None = None,
        *,
        every: int | None = None,
        tz: str = "UTC",
        input: JSON = None,
        catch_up: bool = True,
    ) -> Callable[[TaskFn], TaskFn]:
        """Run a task on a schedule: `@jw.periodic("0 3 * * *", tz="Europe/Paris")` (cron,
        jobwire.cron) or `@jw.periodic(every=300)` (seconds), above its `@jw.task`. Each
        tick is one job with `input` (validated now; default `{}`), owned by
        `periodic.OWNER`, however many workers run; a tick whose previous job is still
        active is skipped. `catch_up`: on start, a worker runs the latest tick missed
        while none ran (one job however many were missed); False skips them."""
        schedule: Schedule
        if cron is not None and every is None:
            schedule = Cron(cron, tz)
        elif every is not None and cron is None and tz == "UTC":
            schedule = Every(every)  # ticks at multiples since the epoch: no zone
        else:
            raise ValueError("periodic takes a cron expression (and its tz) or every=SECONDS")

        def register(fn: TaskFn) -> TaskFn:
            spec = next((s for s in self.tasks.values() if s.fn is fn), None)
            if spec is None:
                raise ValueError(f"{fn.__name__} is not a task: put @periodic above @task")
            if spec.name in self.periodics:
                raise ValueError(f"task {spec.name!r} already has a schedule")
            _, value, _ = self.validate(spec.name, {} if input is None else input)
            self.periodics[spec.name] = PeriodicSpec(spec.name, schedule, value, catch_up)
            return fn

        return register

    def validate(self, task: str, raw: JSON, key: str | None = None
                 ) -> tuple[TaskSpec, JSON, str | None]:
        """Check a submission; returns the spec, the input as stored, and the dedup key."""
        spec = self.tasks.get(task)
        if spec is None:
            known = ", ".join(sorted(self.tasks)) or "none"
            raise InputError(("task",), f"unknown task {task!r} (known: {known})")
        value: Any = raw
        if spec.input_model is not None:
            try:
                value = spec.input_model.model_validate(raw)
            except pydantic.ValidationError as exc:
                first = exc.errors()[0]
                raise InputError(("input", *first["loc"]), first["msg"], first["type"]) from None
        if key is None and spec.key is not None:
            key = spec.key(value)
        if isinstance(value, pydantic.BaseModel):
            value = value.model_dump(mode="json")
        return spec, value, key


def load(spec: str) -> Jobwire:
    """Import `module:attribute` naming a Jobwire instance (the CLI's --app)."""
    module_name, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr or "jobwire")
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load app {spec!r}: {exc}") from exc
    if not isinstance(obj, Jobwire):
        raise ValueError(f"{spec!r} is a {type(obj).__name__}, not a jobwire.Jobwire")
    return obj
