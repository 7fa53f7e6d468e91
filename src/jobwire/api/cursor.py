"""Page cursors: the (created_at, id) of a page's last job, opaque to callers.

Plain base64url JSON, not signed: a forged cursor can only name a place in the caller's
own listing, so there is nothing to protect, only input to validate (422, never a 500).
"""

from __future__ import annotations

import base64
import binascii
import math

import orjson
from fastapi.exceptions import RequestValidationError

from jobwire.model import Job

MAX_CURSOR = 300  # characters: a timestamp and an id of at most 200, encoded


def invalid(field: str, msg: str) -> RequestValidationError:
    """A 422 naming a query parameter, in FastAPI's own error shape."""
    return RequestValidationError([{"loc": ("query", field), "msg": msg, "type": "value_error"}])


def encode(job: Job) -> str:
    # orjson writes the shortest float that reads back exactly: the row compares equal.
    return base64.urlsafe_b64encode(orjson.dumps([job.created_at, job.id])).decode()


def decode(cursor: str, field: str = "before") -> tuple[float, str]:
    try:
        value = orjson.loads(base64.urlsafe_b64decode(cursor.encode("ascii")))
    except (UnicodeEncodeError, binascii.Error, ValueError):  # (JSONDecodeError too)
        value = None
    match value:
        case [int() | float() as at, str() as job_id] if (
                not isinstance(at, bool) and math.isfinite(at) and 0 < len(job_id) <= 200
                and job_id.isprintable()):
            return float(at), job_id
    raise invalid(field, "not a cursor this server gave: pass X-Next-Cursor as it came")
