"""jobwire: deduplicated background jobs with one ordered event log per job and live,
resumable progress for web UIs."""

from jobwire.app import Fail, InputError, Jobwire, Retry
from jobwire.context import Cancelled, Context, SyncContext
from jobwire.model import Event, Item, ItemStatus, Job, Status
from jobwire.store import ItemUpdate
from jobwire.worker import Worker

__all__ = [
    "Cancelled",
    "Context",
    "Event",
    "Fail",
    "InputError",
    "Item",
    "ItemStatus",
    "ItemUpdate",
    "Job",
    "Jobwire",
    "Retry",
    "Status",
    "SyncContext",
    "Worker",
]
__version__ = "0.1.0"
