"""Keeps secrets that clients put in URLs (`?token=`, `?ticket=`) out of the server's logs,
and the password of a database URL out of the lines that name the database.

uvicorn logs every request's path with its query string (access log) and every WebSocket
handshake's (error log). A filter on those loggers rewrites the value of each secret
parameter to `[redacted]`, keeping the rest of the line (`after=`, `wait=`) useful.
Parameter names are matched as the server reads them: URL-decoded, in any case.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote_plus

SECRET_PARAMS = frozenset({"token", "ticket"})
# A request target holds no whitespace, so a query string ends at the first one.
_QUERY = re.compile(r"\?\S*")


def _redact_param(param: str) -> str:
    name, eq, _ = param.partition("=")
    if eq and unquote_plus(name).lower() in SECRET_PARAMS:
        return f"{name}=[redacted]"
    return param


def redact(text: str) -> str:
    """`text` with the value of every secret query parameter in it replaced."""
    return _QUERY.sub(
        lambda m: "?" + "&".join(_redact_param(p) for p in m.group(0)[1:].split("&")), text)


_PASSWORD = re.compile(r"(?P<head>://[^/@:?#]*:)[^/?#]*(?=@)")  # to the last @
_PASSWORD_PARAM = re.compile(r"(?i)([?&]password=)[^&#]*")


def database_url(url: str) -> str:
    """A database URL as it may be logged: a password (`user:secret@`, `?password=`) is
    `***`, the user, host, port and database stay."""
    return _PASSWORD_PARAM.sub(r"\1***", _PASSWORD.sub(r"\g<head>***", url))


class RedactSecrets(logging.Filter):
    """Redacts a record's message and its string arguments (uvicorn's access formatter
    unpacks the arguments, so they are rewritten in place rather than merged)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        return True


_FILTER = RedactSecrets()


def install(*loggers: str) -> None:
    """Add the filter to the named loggers (once each, however often it is called)."""
    for name in loggers:
        logging.getLogger(name).addFilter(_FILTER)
