"""One error shape for every failure: {"error": {"message", "type", "param", "code"}}.

Clients key on the status and on a few words: openai-python maps statuses to exception
classes and retries 408/409/429/5xx; LiteLLM spots a context overflow by "exceeds the available
context size" and a rate limit by "rate limit" (so no other error says that).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmapp.runtime.core.engine import ContextLengthError, EngineStoppedError, QueueFullError
from llmapp.runtime.errors import LlmappError, ModelNotFoundError, TemplateError
from llmapp.runtime.text.constrain import ConstraintError

log = logging.getLogger("llmapp.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    503: "unavailable_error",
    500: "server_error",
}


class APIError(Exception):
    """An error answered to the client as it is."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        *,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        headers: dict[str, str] = {}
        if self.retry_after is not None:
            # Whole seconds: some clients parse Retry-After as an integer only.
            headers["Retry-After"] = str(max(1, round(self.retry_after)))
        if self.status >= 500:
            headers["x-should-retry"] = "true" if self.status == 503 else "false"
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def from_runtime(exc: Exception) -> APIError:
    """The API error for an exception the runtime raised while taking a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), code="context_length_exceeded", param="messages")
    if isinstance(exc, QueueFullError):
        return APIError(503, str(exc), code="queue_full", retry_after=exc.retry_after)
    if isinstance(exc, EngineStoppedError):
        return APIError(503, str(exc), code="engine_stopped", retry_after=1)
    if isinstance(exc, ModelNotFoundError):
        return APIError(404, str(exc), code="model_not_found", param="model")
    if isinstance(exc, ConstraintError):
        return APIError(400, str(exc), code="invalid_response_format", param="response_format")
    if isinstance(exc, TemplateError):
        return APIError(400, f"the chat template failed: {exc}", code="template_error")
    if isinstance(exc, LlmappError | ValueError):
        return APIError(400, str(exc))
    log.exception("internal error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "the request body is not valid", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    where = ".".join(loc) or "body"
    return f"{where}: {first.get('msg', 'invalid value')}", where


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return APIError(exc.status_code, message).response()

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        return from_runtime(exc).response()
