"""JSON from clients, for request bodies and WebSocket messages alike: parsed by orjson
and nested at most `max_json_depth` arrays/objects deep. A deep document costs every
reader of a job (each decode, each render) and is legitimate input for no task."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute

from jobwire.api.deps import runtime
from jobwire.app import deeper_than


class TooDeep(ValueError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"JSON nested too deep: at most {limit} levels")


def loads(raw: bytes | str, limit: int) -> Any:
    """The parsed document; orjson.JSONDecodeError if it is not JSON, TooDeep if it nests
    deeper than `limit`."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth" in exc.msg or "recursion" in exc.msg:  # orjson's own limit (1024)
            raise TooDeep(limit) from None
        raise
    # Fewer brackets than the limit cannot nest past it: most documents skip the walk.
    opens = raw.count(b"[") + raw.count(b"{") if isinstance(raw, bytes) else \
        raw.count("[") + raw.count("{")
    if opens > limit and isinstance(value, (dict, list)) and deeper_than(value, limit):
        raise TooDeep(limit)
    return value


class _BodyRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            limit = runtime(self).settings.max_json_depth
            try:
                self._json = loads(await self.body(), limit)
            except TooDeep as exc:
                # An HTTPException, so FastAPI passes it on rather than answering 400;
                # the body has the shape of its validation errors.
                raise HTTPException(422, [{"loc": ["body"], "msg": str(exc),
                                           "type": "json_too_deep"}]) from None
        return self._json


class BodyRoute(APIRoute):
    """A route whose JSON body is read by `loads` (orjson.JSONDecodeError is a
    json.JSONDecodeError, so invalid JSON still answers FastAPI's 422 json_invalid)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            return await handler(_BodyRequest(request.scope, request.receive))

        return handle
