"""jobwire: deduplicated background jobs with one ordered event log per job and live,
resumable progress for web UIs."""

from typing import TYPE_CHECKING, Any

from jobwire.app import Fail, InputError, Jobwire, Retry
from jobwire.context import Cancelled, Context, SyncContext
from jobwire.model import Event, Item, ItemStatus, Job, Status
from jobwire.runtime import NotFound, NotStarted, Runtime
from jobwire.settings import Settings
from jobwire.store import ItemUpdate, JobActive, TooManyActive
from jobwire.worker import Worker

if TYPE_CHECKING:
    from jobwire.embed import Embedded, asgi


def __getattr__(name: str) -> Any:
    # The web side loads only for apps that mount it (FastAPI takes a while to import).
    if name in ("asgi", "Embedded"):
        from jobwire import embed

        return getattr(embed, name)
    raise AttributeError(f"module 'jobwire' has no attribute {name!r}")

__all__ = [
    "Cancelled",
    "Context",
    "Embedded",
    "Event",
    "Fail",
    "InputError",
    "Item",
    "ItemStatus",
    "ItemUpdate",
    "Job",
    "JobActive",
    "Jobwire",
    "NotFound",
    "NotStarted",
    "Retry",
    "Runtime",
    "Settings",
    "Status",
    "SyncContext",
    "TooManyActive",
    "Worker",
    "asgi",
]
__version__ = "0.1.0"
