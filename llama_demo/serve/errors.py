"""Errors as OpenAI's clients expect them: `{"error": {"message", "type", "param", "code"}}` with
the HTTP status, for every /v1 path (unknown ones included); under /v1/messages as Anthropic's
clients expect them (`{"type": "error", "error": {"type", "message"}}`); and a request-body size
limit."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as p


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers
        self.info = p.ErrorInfo(message=message, type=type, param=param, code=code)

    def response(self, path: str = "") -> JSONResponse:
        body = anthropic_error(self) if is_anthropic_path(path) else p.ErrorResponse(error=self.info).model_dump()
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# HTTP status -> Anthropic's error type (its API reference's list); its clients pick the exception by status
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                         500: "api_error", 503: "overloaded_error", 529: "overloaded_error"}


def is_anthropic_path(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def anthropic_error(e: ApiError) -> dict:
    """Anthropic's error body; it has no param field, so our messages name the field first."""
    kind = ANTHROPIC_ERROR_TYPES.get(e.status, "api_error" if e.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": e.info.message}}


def install_error_handlers(app: FastAPI) -> None:
    def count(request: Request, status: int) -> None:
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None and status != 499:
            metrics.refused(request.url.path, status)

    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        count(request, e.status)
        return e.response(request.url.path)

    async def invalid_body(request: Request, e: RequestValidationError) -> JSONResponse:
        if not is_api_path(request.url.path):
            return await request_validation_exception_handler(request, e)
        count(request, 400)
        # OpenAI answers 400 for a malformed body; say which field and why. A union field (prompt:
        # str | list[str] | list[int]) fails once per member: one line, the members' reasons joined.
        reasons: dict[str, list[str]] = {}
        for err in e.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body" and not _is_type_tag(x))
            reasons.setdefault(where, []).append(err.get("msg", "invalid value"))
        where, msgs = next(iter(reasons.items()))
        return ApiError(400, f"{where or 'body'}: {'; or '.join(dict.fromkeys(msgs))}",
                        param=where or None).response(request.url.path)

    async def http_error(request: Request, e: StarletteHTTPException):
        from fastapi.exception_handlers import http_exception_handler

        if not is_api_path(request.url.path):
            return await http_exception_handler(request, e)
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", type=kind,
                        headers=getattr(e, "headers", None)).response(request.url.path)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(StarletteHTTPException, http_error)


def is_api_path(path: str) -> bool:
    """Paths whose errors take OpenAI's shape: /v1/..., and vLLM's /tokenize and /detokenize."""
    return path.startswith("/v1/") or path in ("/tokenize", "/detokenize")


def _is_type_tag(loc_part) -> bool:
    """pydantic names a union member in an error's loc ("str", "list[int]"): not a field."""
    return isinstance(loc_part, str) and (loc_part in ("str", "int", "float", "bool", "list", "dict")
                                          or "[" in loc_part)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is a 413 before it is read into memory
    (by its Content-Length, or while it streams in when it has none)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_big = ApiError(413, f"the request body is larger than this server's limit of {self.limit} bytes "
                                "(--max_request_bytes)", code="request_too_large")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_big.response(scope.get("path", ""))(scope, receive, send)
        seen, answered = 0, False

        async def send_unless_answered(message):
            if not answered:  # once the 413 is out, what the app still sends goes nowhere
                await send(message)

        async def counted_receive():
            nonlocal seen, answered
            message = await receive()
            if message["type"] == "http.request" and not answered:
                seen += len(message.get("body", b""))
                if seen > self.limit:  # answer now; the app sees a client that left
                    await too_big.response(scope.get("path", ""))(scope, receive, send)
                    answered = True
                    return {"type": "http.disconnect"}
            return message

        try:
            await self.app(scope, counted_receive, send_unless_answered)
        except Exception:
            if not answered:
                raise
