"""Storage backends behind one protocol; `open_store` picks one from a URL."""

from __future__ import annotations

from jobwire.store.base import (
    Hint,
    ItemUpdate,
    JobActive,
    Lease,
    LeaseLost,
    OwnerConflict,
    Store,
    StoreError,
    UnknownItem,
    Written,
)


def open_store(url: str) -> Store:
    """`postgresql://…` for the distributed backend, anything else is a SQLite path or URL."""
    if url.startswith(("postgres://", "postgresql://")):
        from jobwire.store.postgres import PostgresStore

        return PostgresStore(url)
    from jobwire.store.sqlite import SQLiteStore

    return SQLiteStore(url)


__all__ = [
    "Hint",
    "ItemUpdate",
    "JobActive",
    "Lease",
    "LeaseLost",
    "OwnerConflict",
    "Store",
    "StoreError",
    "UnknownItem",
    "Written",
    "open_store",
]
