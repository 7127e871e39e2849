"""OpenAI's error JSON with the right HTTP status, for every way a request can fail.

Owns: the `APIError` family the routes raise (400 invalid request naming the parameter, 401, 404, 413, 503
with Retry-After, 500 for an engine failure), turning pydantic / FastAPI validation errors into a 400 that
names the parameter (never FastAPI's default 422 body), and the last-resort 500 that hides a bug's details
from the client and logs them instead.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

Does not know: which requests are valid (protocol.py, serving.py decide), auth or body limits (middleware.py
builds its own responses with `error_json`, since it runs outside FastAPI's exception handling).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmserve.api.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

# Seconds a client should wait before retrying when the queue is full; the openai client honours it.
RETRY_AFTER_S = 1


class APIError(Exception):
    """An error the client should see as is: status, OpenAI error type, parameter, code."""

    status_code = 400
    error_type = "invalid_request_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        return error_response(
            self.status_code, self.message, self.error_type, self.param, self.code, self.headers
        )


class InvalidRequestError(APIError):
    """400: the request itself is wrong; `param` names the field to fix."""


class NotFoundError(APIError):
    status_code = 404


class RequestTooLargeError(APIError):
    status_code = 413


class ServiceUnavailableError(APIError):
    """503 with Retry-After: the engine's queue is full or the engine is not running."""

    status_code = 503
    error_type = "server_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(RETRY_AFTER_S)})


class EngineError(APIError):
    """500: the engine failed while running the request (not the request's fault, not a server bug here)."""

    status_code = 500
    error_type = "server_error"


def error_json(message: str, error_type: str, param: str | None = None, code: str | None = None) -> str:
    return ErrorResponse(
        error=ErrorInfo(message=message, type=error_type, param=param, code=code)
    ).model_dump_json()


def error_response(
    status_code: int,
    message: str,
    error_type: str,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=error_type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status_code, headers=dict(headers or {}))


# ------------------------------------------------------------------------------------------ validation errors

# Labels pydantic puts into an error location for union members and wrappers ("str", "list[ContentPart]",
# "function-after[...]", "ImageURL"): not fields, so they are dropped from the parameter path.
_TYPE_LABELS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "bytes"})


def param_path(loc: Sequence[str | int]) -> str | None:
    """('body', 'messages', 0, 'content', 'list[ContentPart]', 1, 'image_url') -> messages[0].content[1].image_url"""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
            continue
        if part == "body" and not path:
            continue
        if part in _TYPE_LABELS or any(c in part for c in "[(-") or part[:1].isupper():
            continue
        path += f".{part}" if path else part
    return path or None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def validation_error(errors: Sequence[Mapping[str, Any]]) -> InvalidRequestError:
    """One 400 for pydantic's error list: the most specific error (deepest location), named by parameter.

    A value that matches no member of a union yields one error per member; the deepest is the one that got
    furthest into the value, i.e. the member the client most likely meant.
    """
    if not errors:
        return InvalidRequestError("The request body is invalid.")
    for err in errors:
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            return InvalidRequestError(
                f"The request body is not valid JSON ({detail}); send a JSON object with Content-Type "
                "application/json.",
                code="invalid_json",
            )
    best = max(errors, key=lambda e: len([p for p in e.get("loc", ()) if param_path([p])]))
    if tuple(best.get("loc", ())) == ("body",) and best.get("type") in ("model_attributes_type", "dict_type"):
        return InvalidRequestError(
            "The request body must be a JSON object; send one with Content-Type: application/json.",
            code="invalid_json",
        )
    param = param_path(best.get("loc", ()))
    msg = str(best.get("msg", "invalid value")).removeprefix("Value error, ")
    if best.get("type") == "missing":
        return InvalidRequestError(f"Missing required parameter: '{param}'.", param=param)
    if param is None:
        return InvalidRequestError(f"Invalid request body: {msg}.", param=None)
    return InvalidRequestError(
        f"Invalid value for '{param}': {msg} (got {_shown(best.get('input'))}).", param=param
    )


# ------------------------------------------------------------------------------------------ handlers

_TYPE_BY_STATUS = {401: "authentication_error", 404: "invalid_request_error", 405: "invalid_request_error"}


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def _request_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return validation_error(exc.errors()).response()


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = f"Unknown request URL: {request.method} {request.url.path}."
        code: str | None = "unknown_url"
    else:
        message, code = str(exc.detail), None
    error_type = _TYPE_BY_STATUS.get(exc.status_code, "invalid_request_error")
    if exc.status_code >= 500:
        error_type = "server_error"
    return error_response(exc.status_code, message, error_type, None, code, exc.headers)


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    # A bug, not bad input: the details go to the log, the client gets a generic message.
    logger.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(
        500, "The server had an error while processing your request; it has been logged.", "server_error"
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(Exception, _unhandled)
