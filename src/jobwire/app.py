"""The task registry: what jobs exist, how their input is validated, how often they retry."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import random
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator

from jobwire.cron import Cron, Every, Schedule
from jobwire.model import JSON, MAX_OWNER_ID, backoff, valid_owner
from jobwire.store.base import Placement

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


# Priorities are -MAX_PRIORITY to MAX_PRIORITY: a sane integer for every database.
MAX_PRIORITY = 1000
# A queue's name: short, and safe in a command line, a log and a metric label.
QUEUE_NAME = re.compile(r"[a-z0-9_-]{1,50}")
# Key function results longer than this (or with control characters) are stored hashed.
MAX_LIMIT_KEY = 200


def check_queue(name: object) -> str:
    """`name` if it can name a queue, else ValueError saying what one is."""
    if not isinstance(name, str) or QUEUE_NAME.fullmatch(name) is None:
        raise ValueError(f"a queue name is 1 to 50 of a-z, 0-9, _ and -, not {name!r}")
    return name


class Submission(BaseModel):
    """What a submit names, checked the same way over HTTP and in-process."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, max_length=200)
    input: Any = None
    # No control characters: PostgreSQL text cannot hold NUL, and a key is an identifier.
    key: str | None = Field(default=None, min_length=1, max_length=500,
                            pattern=r"^[^\x00-\x1f\x7f]+$")
    # Not before then: seconds from now (the database's clock), or a time; not both.
    # Their upper bound is JOBWIRE_MAX_DELAY_SECONDS, checked by the runtime.
    delay: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    run_at: datetime | None = Field(default=None, description="ISO 8601 with a time zone")
    # Within the range the task allows (TaskSpec.priority_range); None: the task's own.
    priority: int | None = Field(default=None, ge=-MAX_PRIORITY, le=MAX_PRIORITY,
                                 strict=True)

    @field_validator("run_at", mode="before")
    @classmethod
    def iso_with_zone(cls, value: Any) -> Any:
        """An ISO 8601 text naming its time zone: a bare local time means nothing to a
        server elsewhere, and a number could be seconds or milliseconds. (In-process, an
        aware datetime too.)"""
        if value is None:
            return None
        if isinstance(value, datetime):
            parsed = value
        elif not isinstance(value, str):
            raise ValueError("must be an ISO 8601 time with a time zone, as text")
        else:
            try:
                parsed = datetime.fromisoformat(value)
            except ValueError:
                raise ValueError("must be an ISO 8601 time, e.g. 2030-01-01T12:00:00Z"
                                 ) from None
        if parsed.tzinfo is None:
            raise ValueError("must name its time zone (Z or +hh:mm)")
        try:
            return parsed.astimezone(UTC)
        except OverflowError:  # 0001-01-01T00:00+01:00 is in year 0 in UTC
            raise ValueError("must fall within the years 1 to 9999 in UTC") from None

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
                 max_depth: int, delay: float | None = None,
                 run_at: datetime | None = None, priority: int | None = None) -> Submission:
    """What `POST /api/jobs` checks of its caller and body, for a submit made in-process
    (the runtime's, or in the host's own transaction): InputError naming the field."""
    check_owner(owner)
    try:
        sub = Submission(task=task, input=input, key=key, delay=delay, run_at=run_at,
                         priority=priority)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        raise InputError(tuple(first["loc"]), first["msg"]) from None
    if isinstance(input, (dict, list)) and deeper_than(input, max_depth):
        raise InputError(("input",), f"JSON nested too deep: at most {max_depth} levels")
    return sub


class Fail(Exception):
    """Raised by a task: the job fails now with this message, whatever attempts are left
    (a 404, bad data: trying again would give the same answer)."""


class Retry(Exception):
    """Raised by a task: try again (while attempts are left; else the job fails with this
    message) after `delay` seconds, or after the task's backoff when None. Retried
    whatever `retry_on` says."""

    def __init__(self, message: str = "retry requested", *, delay: float | None = None
                 ) -> None:
        if delay is not None and not 0 <= delay <= MAX_RETRY_DELAY:
            raise ValueError(f"Retry delay must be 0 to {MAX_RETRY_DELAY:g} s, not {delay}")
        super().__init__(message)
        self.delay = delay


# The longest wait between attempts that a task can ask for (30 days, as for a submit's).
MAX_RETRY_DELAY = 30 * 24 * 3600.0


@dataclasses.dataclass(frozen=True, slots=True)
class TaskSpec:
    name: str
    fn: AsyncTaskFn | SyncTaskFn
    input_model: type[pydantic.BaseModel] | None
    max_attempts: int
    key: Callable[[Any], str] | None = None  # dedup key derived from the input
    timeout: float | None = None  # seconds per attempt; None: the worker's default
    retry_delay: float = 1.0  # backoff base: the first retry waits up to this long
    retry_max_delay: float = 300.0  # and no retry waits longer than this
    retry_on: tuple[type[BaseException], ...] | None = None  # None: every error retries
    priority: int = 0
    priority_range: tuple[int, int] = (0, 0)  # what a submit may ask for instead
    queue: str = "default"
    concurrency: int | None = None  # running at once per owner, or per concurrency_key
    concurrency_key: Callable[[Any, str], str] | None = None

    def placement(self, value: Any, owner: str, priority: int | None) -> Placement:
        """How a job of this task with input `value` (as the task gets it) for `owner` is
        claimed; InputError naming `priority` if the submit asks for one outside the
        task's range."""
        lo, hi = self.priority_range
        if priority is not None and not lo <= priority <= hi:
            raise InputError(("priority",), f"must be between {lo} and {hi}" if lo < hi else
                             f"cannot be chosen for task {self.name!r}: it is {lo}")
        limit_key = None
        if self.concurrency is not None:
            key = owner if self.concurrency_key is None else derived(
                self.concurrency_key, value, owner)
            if not isinstance(key, str):
                raise TypeError(f"concurrency_key of task {self.name!r} returned "
                                f"{type(key).__name__}, not str")
            if len(key) > MAX_LIMIT_KEY or not key.isprintable():
                key = "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")
                                                 ).hexdigest()
            limit_key = f"{self.name}\x1f{key}"
        return Placement(self.priority if priority is None else priority, self.queue,
                         limit_key, self.concurrency)

    def retry_after(self, exc: BaseException, attempt: int) -> float | None:
        """Seconds to wait before retrying an attempt that raised `exc` (attempts
        permitting), or None if the job is to fail now."""
        if isinstance(exc, Retry):
            if exc.delay is not None:
                return exc.delay
        elif isinstance(exc, Fail) or (self.retry_on is not None
                                       and not isinstance(exc, self.retry_on)):
            return None
        return backoff(attempt, self.retry_delay, self.retry_max_delay, random.random())

    @property
    def sync(self) -> bool:
        """A plain `def`, run on a thread (jobwire.runner)."""
        return not inspect.iscoroutinefunction(self.fn)

    def parse(self, raw: JSON) -> Any:
        """The value handed to the task: the validated model, or the raw JSON."""
        if self.input_model is None:
            return raw
        try:
            return self.input_model.model_validate(raw)
        except pydantic.ValidationError as exc:  # the same input would fail again
            raise Fail(f"ValidationError: {exc}") from None


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
        retry_delay: float = 1.0,
        retry_max_delay: float = 300.0,
        retry_on: tuple[type[BaseException], ...] | None = None,
        priority: int = 0,
        priority_range: tuple[int, int] | None = None,
        queue: str = "default",
        concurrency: int | None = None,
        concurrency_key: Callable[[Any, str], str] | None = None,
    ) -> Callable[[TaskFn], TaskFn]:
        """`key(input)` gives submissions without an explicit key one, so the same input
        while a job for it is active joins that job. `timeout` (seconds per attempt)
        replaces the worker's default (`Settings.task_timeout`).

        An attempt that raises (or times out, or loses its worker) is retried until
        `max_attempts` attempts were made; after an error the retry waits a random time
        up to `min(retry_max_delay, retry_delay * 2**(attempt - 1))` seconds (full
        jitter). `retry_on` names the exception types that retry; others fail the job at
        once, as `Fail` always does. `Retry(delay=...)` asks for a retry.

        Claims take higher `priority` first (-1000 to 1000); a submit may ask for
        another within `priority_range` (default: none but `priority`, so no caller
        jumps the line). Jobs go to `queue`: `jobwire worker --queue NAME` serves only
        the queues named. `concurrency=N`: at most N jobs of this task run at once per
        owner, or per `concurrency_key(input, owner)` (a str) when given, across every
        worker; the key is fixed when the job is submitted."""
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if timeout is not None and not timeout > 0:
            raise ValueError("timeout must be more than 0 seconds")
        if not 0 <= retry_delay <= retry_max_delay <= MAX_RETRY_DELAY:
            raise ValueError(f"need 0 <= retry_delay <= retry_max_delay <= "
                             f"{MAX_RETRY_DELAY:g} seconds")

        lo, hi = (priority, priority) if priority_range is None else priority_range
        if not -MAX_PRIORITY <= lo <= priority <= hi <= MAX_PRIORITY:
            raise ValueError(f"need -{MAX_PRIORITY} <= priority_range[0] <= priority <= "
                             f"priority_range[1] <= {MAX_PRIORITY}")
        check_queue(queue)
        if concurrency is not None and not 1 <= concurrency <= 1_000_000:
            raise ValueError("concurrency must be 1 to 1000000 (None: no limit)")
        if concurrency_key is not None and concurrency is None:
            raise ValueError("concurrency_key needs concurrency=N, the limit per key")

        def register(fn: TaskFn) -> TaskFn:
            task_name = name or fn.__name__
            if task_name in self.tasks:
                raise ValueError(f"task {task_name!r} is already registered")
            self.tasks[task_name] = TaskSpec(task_name, fn, input, max_attempts, key, timeout,
                                             retry_delay, retry_max_delay, retry_on,
                                             priority, (lo, hi), queue, concurrency,
                                             concurrency_key)
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
        spec, value, key = self._parse(task, raw, key)
        return spec, _stored(value), key

    def prepare(self, task: str, raw: JSON, key: str | None, owner: str,
                priority: int | None = None) -> tuple[TaskSpec, JSON, str | None, Placement]:
        """`validate`, and how the job of `owner` is claimed (TaskSpec.placement)."""
        spec, value, key = self._parse(task, raw, key)
        return spec, _stored(value), key, spec.placement(value, owner, priority)

    def _parse(self, task: str, raw: JSON, key: str | None) -> tuple[TaskSpec, Any, str | None]:
        """The spec, the input as the task gets it, and the dedup key."""
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
            key = derived(spec.key, value)
        return spec, value, key


def derived(fn: Callable[..., str], *args: Any) -> str:
    """What a task's `key` or `concurrency_key` function makes of a submit's input. When it
    cannot (an untyped input without the field it reads), that input is the caller's
    mistake: InputError, a 422, not a 500 and a traceback in the log per request."""
    try:
        return fn(*args)
    except Exception as exc:
        raise InputError(("input",), f"does not fit the task: {type(exc).__name__}: "
                                     f"{str(exc)[:200]}") from None


def _stored(value: Any) -> JSON:
    """The input as stored: a model's JSON."""
    return value.model_dump(mode="json") if isinstance(value, pydantic.BaseModel) else value


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
