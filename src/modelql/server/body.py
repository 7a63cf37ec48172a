"""The one JSON reader of every request body and WebSocket message (`read_json`), and the route class
(`JsonRoute`) that makes FastAPI's own body parsing use it.

Why one reader: `json.loads` raises `RecursionError` on deeply nested input (100k `[`), accepts
`NaN` / `Infinity` (not JSON; LARQL's serde rejects them) and lets `"\\ud800"` (a lone surrogate)
through as a string no encoder can write back. Each of those became a 500 on some route. Here they
are one `BodyError` (a 400 with a message) wherever a body is read.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE_ESCAPE_STR = re.compile(r"\\u[dD][89a-fA-F]|[\ud800-\udfff]")


OFFLOAD_BYTES = 256 * 1024  # bodies at least this large are parsed off the event loop


class BodyError(json.JSONDecodeError):
    """A body that is not acceptable JSON. A `JSONDecodeError`, so FastAPI's own parsing turns it
    into the 400 "We could not parse the JSON body of your request: ..." like any syntax error."""

    def __init__(self, msg: str, doc: str = "", pos: int = 0):
        super().__init__(msg, doc, pos)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _check(value: Any) -> None:
    """Lone-surrogate check of every key and string, iteratively."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            for k, item in v.items():
                _check_text(k)
                stack.append(item)
        elif isinstance(v, list):
            stack.extend(item for item in v if isinstance(item, (dict, list, str)))
        elif isinstance(v, str):
            _check_text(v)


def _check_text(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise BodyError("JSON string contains a lone UTF-16 surrogate (\\ud800-\\udfff)") from None


def read_json(raw: bytes | str) -> Any:
    """Parse a request body or WebSocket text message; `BodyError` for anything that is not strict,
    encodable JSON."""
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except BodyError:
        raise
    except json.JSONDecodeError as exc:
        raise BodyError(f"{exc.msg} at position {exc.pos}") from None
    except RecursionError:
        raise BodyError("JSON nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise BodyError(f"body is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:
        raise BodyError(str(exc)) from None
    if (_SURROGATE_ESCAPE_STR if isinstance(raw, str) else _SURROGATE_ESCAPE).search(raw):
        _check(data)
    return data


class JsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = read_json(await self.body())
        return self._json


class JsonRoute(APIRoute):
    """An `APIRoute` whose body parsing goes through `read_json`."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route_handler(request: Request):
            return await handler(JsonRequest(request.scope, request.receive))

        return route_handler


def use_json_reader(app) -> None:
    """Give every API route of `app` (whatever router declared it) the one JSON reader."""
    from fastapi import routing

    for route in app.router.routes:
        if isinstance(route, APIRoute) and not isinstance(route, JsonRoute):
            route.__class__ = JsonRoute
            asgi = routing.request_response(route.get_route_handler())  # as APIRoute.__init__ builds it
            if hasattr(routing, "wrap_app_with_body_limit"):
                asgi = routing.wrap_app_with_body_limit(asgi, getattr(route, "max_body_size", None))
            route.app = asgi
