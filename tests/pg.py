"""A PostgreSQL schema of its own for each test, so runs and tests never collide."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql


def with_params(url: str, **params: str) -> str:
    """The URL with libpq parameters added (`options` values are appended)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    for name, value in params.items():
        query[name] = f"{query[name]} {value}" if name == "options" and name in query else value
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote)))


@contextlib.contextmanager
def fresh_schema_url(base: str) -> Iterator[str]:
    """Create a uniquely named schema and yield a URL whose every connection uses it
    (and is named after it); afterwards drop it, with whatever is still connected."""
    schema = f"jw_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        yield with_params(base, options=f"-csearch_path={schema}", application_name=schema)
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            # Servers a test left running would otherwise hold locks the DROP waits on.
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE application_name LIKE %s", (schema + "%",))
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
