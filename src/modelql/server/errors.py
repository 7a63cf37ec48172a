"""Error mapping at the HTTP edge, done once.

Every failure, on every route (OpenAI group, knowledge group, operations, unknown paths), leaves
the server in OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`, so the official
clients raise a typed error carrying the message, and LARQL-shaped clients read `error.message`.

`ModelqlError.http_status` / `.code` (and an optional `.param`) decide the status; request
validation failures (FastAPI's 422) become 400 naming the offending parameter; an unexpected
exception is a 500 with a generic message (the traceback goes to the log, never to the client).
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from ..errors import ModelqlError

log = logging.getLogger("modelql.server")

OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
          404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error"}
_CODES = {401: "invalid_api_key", 413: "request_too_large", 429: "rate_limit_exceeded",
          503: "service_unavailable"}


class HttpError(ModelqlError):
    """A failure decided at the HTTP edge, with its status, OpenAI code/param and extra headers."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.http_status = status
        self.code = code if code is not None else _CODES.get(status)
        self.param = param
        self.headers = headers or {}


class InvalidValue(HttpError):
    """400 `invalid_value` naming the offending request field."""

    def __init__(self, param: str, message: str):
        super().__init__(400, message, code="invalid_value", param=param)


class ServiceUnavailable(HttpError):
    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(503, message, code="service_unavailable", headers=headers)


def is_openai_path(path: str) -> bool:
    return path in OPENAI_PATHS or path == "/v1/models" or path.startswith("/v1/models/")


def openai_error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    etype = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    if code == etype:  # a class-level default such as ModelqlError.code is a type, not a code
        code = None
    return {"error": {"message": message, "type": etype, "param": param, "code": code}}


def error_body(path: str, status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    """The one error envelope (`path` is kept for callers that answer before routing)."""
    return openai_error_body(status, message, code, param)


def error_response(path: str, status: int, message: str, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(path, status, message, code, param), status_code=status, headers=headers)


def error_bytes(path: str, status: int, message: str, code: str | None = None) -> bytes:
    """The body of an error answered by ASGI middleware (before routing)."""
    return json.dumps(error_body(path, status, message, code)).encode()


def modelql_error_parts(exc: BaseException) -> tuple[int, str, str | None, str | None]:
    """(status, message, code, param) of any exception; unknown ones are a generic 500."""
    if isinstance(exc, ModelqlError):
        return int(exc.http_status), str(exc) or type(exc).__name__, exc.code, getattr(exc, "param", None)
    return 500, "internal server error", None, None


def _param_of(loc: tuple) -> str | None:
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    # tagged unions add the type name (e.g. "str", "list[int]") as a location step: drop them
    parts = [p for p in parts if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "float",
                                                                                "bool", "dict", "list")))]
    if not parts:
        return None
    out = str(parts[0])
    for p in parts[1:]:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    err = errors[0]
    if err.get("type") == "json_invalid":
        return "We could not parse the JSON body of your request: " + str(err.get("ctx", {}).get("error", "")), None
    param = _param_of(tuple(err.get("loc", ())))
    msg = str(err.get("msg", "invalid value"))
    if err.get("type") == "missing":
        return (f"missing required parameter: '{param}'" if param else "request body is required"), param
    if param is None:
        if err.get("type") in ("model_attributes_type", "dict_type"):
            return "the request body must be a JSON object (Content-Type: application/json)", None
        return f"invalid request body: {msg}", None
    return f"invalid value for '{param}': {msg}", param


def install(app: FastAPI) -> None:
    """Register the exception handlers on `app`."""

    @app.exception_handler(ModelqlError)
    async def _modelql(request: Request, exc: ModelqlError):
        status, message, code, param = modelql_error_parts(exc)
        return error_response(request.url.path, status, message, code, param, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        code = "invalid_value" if param else None
        return error_response(request.url.path, 400, message, code, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        status = exc.status_code
        message = str(exc.detail) if exc.detail else "error"
        if status == 404 and exc.detail == "Not Found":
            message = f"route not found: {request.method} {request.url.path}"
        elif status == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        code = "not_found" if status == 404 else None
        return error_response(request.url.path, status, message, code, None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request.url.path, 500, "internal server error")
