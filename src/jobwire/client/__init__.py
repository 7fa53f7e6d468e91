"""Python client for jobwire: `Client` (async) and `SyncClient`, with typed errors."""

from jobwire.client.core import Client
from jobwire.client.errors import (
    ApiError,
    InvalidRequest,
    JobActive,
    JobCancelled,
    JobEnded,
    JobFailed,
    JobNotFound,
    JobwireError,
    ServerUnavailable,
    TokenError,
    Unauthorized,
    Unavailable,
)
from jobwire.client.snapshot import Snapshot
from jobwire.client.sync import SyncClient

__all__ = [
    "ApiError", "Client", "InvalidRequest", "JobActive", "JobCancelled", "JobEnded",
    "JobFailed", "JobNotFound", "JobwireError", "ServerUnavailable", "Snapshot", "SyncClient",
    "TokenError", "Unauthorized", "Unavailable",
]
