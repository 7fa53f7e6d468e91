"""Storage backends behind one protocol; `open_store` picks one from a URL."""

from __future__ import annotations

from jobwire.store.base import (
    End,
    Hint,
    ItemUpdate,
    JobActive,
    Lease,
    LeaseLost,
    OwnerChanges,
    OwnerConflict,
    OwnerHint,
    Placement,
    Store,
    StoreError,
    TooManyActive,
    UnknownItem,
    Written,
)


def open_store(url: str, max_active_jobs: int | None = None) -> Store:
    """`postgresql://…` for the distributed backend, anything else is a SQLite path or URL.
    `max_active_jobs` caps each owner's queued + running jobs (default: the Settings one)."""
    if url.startswith(("postgres://", "postgresql://")):
        from jobwire.store.postgres import PostgresStore

        return PostgresStore(url, max_active_jobs=max_active_jobs)
    from jobwire.store.sqlite import SQLiteStore

    return SQLiteStore(url, max_active_jobs=max_active_jobs)


__all__ = [
    "End",
    "Hint",
    "ItemUpdate",
    "JobActive",
    "Lease",
    "LeaseLost",
    "OwnerChanges",
    "OwnerConflict",
    "OwnerHint",
    "Placement",
    "Store",
    "StoreError",
    "TooManyActive",
    "UnknownItem",
    "Written",
    "open_store",
]
