"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` for every failure.

FastAPI's 422 becomes 400; unknown routes are 404 and wrong methods 405, both in the same shape;
an unexpected exception is a 500 whose body says nothing about the internals.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("fmforge.serve")


class APIError(Exception):
    """An error answered with `status` and the OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type, self.headers = type, headers or {}


def error_body(
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict:
    """Return the OpenAI error body."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    """Return `error` as a JSON response with its status and headers."""
    body = error_body(error.message, error.type, error.param, error.code)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def sse_error(error: APIError) -> str:
    """Return `error` as an in-band SSE event (for errors after a stream has started)."""
    return "data: " + json.dumps(error_body(error.message, error.type, error.param, error.code))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None, "invalid_value"
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    # Union members add their type names to the location (e.g. "str", "list[...]"): drop them.
    loc = [part for part in loc if not any(c in part for c in "[]") and part not in _TYPE_NAMES]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return "the request body is not valid JSON", None, "invalid_json"
    if kind == "missing" and not loc:
        return "the request body is missing; send a JSON object", None, "invalid_value"
    if kind in ("model_attributes_type", "dict_type") and not loc:
        return "the request body must be a JSON object", None, "invalid_value"
    message = str(first.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param, "unknown_parameter"
    return f"{param}: {message}" if param else message, param, "invalid_value"


_TYPE_NAMES = {"str", "int", "float", "bool", "function-after", "TextPart", "ChatMessage"}


def install_error_handlers(app: FastAPI) -> None:
    """Make every error response of `app` OpenAI-shaped."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = _validation_message(exc)
        return error_response(APIError(400, message, param, code))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"Unknown request URL: {request.method} {request.url.path}"
            return error_response(APIError(404, message, code="unknown_url"))
        if exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
            return error_response(APIError(405, message, code="method_not_allowed"))
        code = "invalid_request" if exc.status_code < 500 else "server_error"
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(APIError(exc.status_code, str(exc.detail), code=code, type=kind))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        error = APIError(
            500, "The server had an error processing your request.", type="server_error"
        )
        error.code = "internal_error"
        return error_response(error)
