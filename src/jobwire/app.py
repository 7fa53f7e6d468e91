"""The task registry: what jobs exist, how their input is validated, how often they retry."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import pydantic

from jobwire.cron import Cron, Every, Schedule
from jobwire.model import JSON, backoff

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
    ) -> Callable[[TaskFn], TaskFn]:
        """`key(input)` gives submissions without an explicit key one, so the same input
        while a job for it is active joins that job. `timeout` (seconds per attempt)
        replaces the worker's default (`Settings.task_timeout`).

        An attempt that raises (or times out, or loses its worker) is retried until
        `max_attempts` attempts were made; after an error the retry waits a random time
        up to `min(retry_max_delay, retry_delay * 2**(attempt - 1))` seconds (full
        jitter). `retry_on` names the exception types that retry; others fail the job at
        once, as `Fail` always does. `Retry(delay=...)` asks for a retry."""
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if timeout is not None and not timeout > 0:
            raise ValueError("timeout must be more than 0 seconds")
        if not 0 <= retry_delay <= retry_max_delay <= MAX_RETRY_DELAY:
            raise ValueError(f"need 0 <= retry_delay <= retry_max_delay <= "
                             f"{MAX_RETRY_DELAY:g} seconds")

        def register(fn: TaskFn) -> TaskFn:
            task_name = name or fn.__name__
            if task_name in self.tasks:
                raise ValueError(f"task {task_name!r} is already registered")
            self.tasks[task_name] = TaskSpec(task_name, fn, input, max_attempts, key, timeout,
                                             retry_delay, retry_max_delay, retry_on)
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
