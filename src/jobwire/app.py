"""The task registry: what jobs exist, how their input is validated, how often they retry."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import pydantic

from jobwire.model import JSON

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


class Jobwire:
    """A set of tasks. Register with `@jw.task(input=Model)` on a function
    `(ctx, input) -> JSON result`: an `async def` taking a `Context`, or a plain `def`
    taking a `SyncContext` (run on a thread)."""

    def __init__(self) -> None:
        self.tasks: dict[str, TaskSpec] = {}

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
