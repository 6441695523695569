"""Every error the API returns, in the OpenAI shape, mapped to HTTP in this one place.

``{"error": {"message", "type", "param", "code"}}``. Client mistakes are 400 with ``param`` naming
the field; a 5xx only for a real server fault. Messages never echo prompt text (pydantic's
``input`` is dropped) and never show Python internals.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("kvproxy")


class ApiError(Exception):
    """An error the client sees; subclasses fix the status and type."""

    status: int = 400
    type: str = "invalid_request_error"
    default_code: str | None = None

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
        self.code = code if code is not None else self.default_code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type_=self.type, param=self.param, code=self.code)


class InvalidRequest(ApiError):
    status = 400


class ContextLengthExceeded(ApiError):
    status = 400
    default_code = "context_length_exceeded"


class AuthenticationFailed(ApiError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"

    def __init__(self, message: str = "Invalid or missing API key.") -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class PermissionDenied(ApiError):
    status = 403
    type = "permission_error"
    default_code = "admin_required"


class NotFound(ApiError):
    status = 404
    type = "not_found_error"


class ModelNotFound(NotFound):
    default_code = "model_not_found"


class PayloadTooLarge(ApiError):
    status = 413
    default_code = "request_too_large"


class ServiceUnavailable(ApiError):
    """The server is healthy but cannot take this request now; the client should retry."""

    status = 503
    type = "server_error"

    def __init__(self, message: str, *, code: str, retry_after_s: int = 1) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after_s)})


def error_body(
    message: str, *, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ---- the Anthropic shape (/v1/messages) ---------------------------------------------------------

ANTHROPIC_PREFIX = "/v1/messages"
OVERLOADED_STATUS = 529
"""Anthropic's status for "try again later" (its SDK maps it to ``OverloadedError``)."""
_ANTHROPIC_TYPES: Mapping[int, str] = MappingProxyType(
    {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        405: "invalid_request_error",
        413: "request_too_large",
        429: "rate_limit_error",
        OVERLOADED_STATUS: "overloaded_error",
    }
)


def is_anthropic(path: str) -> bool:
    return path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/")


def anthropic_error(status: int, message: str) -> tuple[int, dict[str, Any]]:
    """``(status, body)`` in Anthropic's shape ``{"type": "error", "error": {"type", "message"}}``:
    a 503 (queue full, shutting down) is its 529 ``overloaded_error``; field paths are dotted
    (``messages.0.content``)."""
    if status == 503:
        status = OVERLOADED_STATUS
    kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    message = re.sub(r"\[(\d+)\]", r".\1", message)
    return status, {"type": "error", "error": {"type": kind, "message": message}}


def error_response(
    request: Request, status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The response for an OpenAI-shaped error ``body``, reshaped on Anthropic's routes."""
    if is_anthropic(request.url.path):
        status, body = anthropic_error(status, str(body["error"]["message"]))
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def loc_to_param(loc: Sequence[int | str]) -> str | None:
    """``("body", "messages", 0, "content")`` -> ``"messages[0].content"``."""
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    param = ""
    for part in parts:
        if isinstance(part, int):
            param += f"[{part}]"
        elif "[" in str(part) or "function-" in str(part) or " " in str(part):
            # pydantic names union branches ("str", "list[ContentPart]") and tagged-union tags
            # ("text block"); they are not fields.
            continue
        else:
            param += f".{part}" if param else str(part)
    return param or None


def validation_error(errors: Sequence[Mapping[str, Any]]) -> InvalidRequest:
    """The first schema error, as a 400 naming the field (the request's text is never echoed)."""
    if not errors:
        return InvalidRequest("Invalid request body.")
    # A union field reports one error per branch; the deepest one is the most specific.
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    param = loc_to_param(first.get("loc", ()))
    kind = first.get("type", "")
    if kind == "missing":
        message = f"Missing required parameter: '{param}'."
    else:
        detail = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        message = f"Invalid value for '{param}': {detail}."
    return InvalidRequest(
        message, param=param, code="missing_required_parameter" if kind == "missing" else "invalid_value"
    )


def from_pydantic(exc: ValidationError) -> InvalidRequest:
    return validation_error(exc.errors(include_url=False, include_input=False))


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(request, exc.status, exc.body(), exc.headers)


async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = validation_error(exc.errors())
    return error_response(request, err.status, err.body())


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        body = error_body("Unknown route.", type_="not_found_error", code="not_found")
    elif exc.status_code == 405:
        body = error_body(
            "Method not allowed for this route.", type_="invalid_request_error", code="method_not_allowed"
        )
    else:
        kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        body = error_body(str(exc.detail), type_=kind)
    return error_response(request, exc.status_code, body, exc.headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # A real fault: log the traceback here, show the client nothing of it.
    log.error("internal error", exc_info=exc)
    return error_response(
        request,
        500,
        error_body("The server had an internal error.", type_="server_error", code="internal_error"),
    )


class InternalErrors:
    """Answers an unexpected exception with the 500 body right here (ASGI middleware).

    Starlette hands an ``Exception`` handler to its outermost error middleware, which sends the
    response and then re-raises: uvicorn logs a second traceback and drops the keep-alive
    connection without ``Connection: close``, so a pooled client's next request on it fails.
    Caught here, inside that middleware, the connection stays usable."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if started:  # too late for a status line: let the server close the stream
                raise
            response = await _unexpected(Request(scope), exc)
            await response(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    # Starlette types handlers as taking Exception; each is registered for its own class only.
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _request_validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)  # the last resort, should InternalErrors fail
    app.add_middleware(InternalErrors)
