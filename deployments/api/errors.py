"""Error bodies and handlers: every refusal says what was wrong and names the field."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from features.catalog_changes import UnknownEntity
from features.intake import IntakeUnavailable
from features.redis_store import StoreUnavailable


class FieldError(BaseModel):
    """One refused field."""

    field: str
    message: str


class ErrorBody(BaseModel):
    """The body of every 4xx and 5xx answer."""

    error: str
    message: str
    fields: list[FieldError] = []


_STATUS_ERRORS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    429: "rate_limited",
    503: "unavailable",
}


def error_response(status: int, error: str, message: str, **headers: str) -> JSONResponse:
    """A JSON error answer."""
    body = ErrorBody(error=error, message=message)
    return JSONResponse(status_code=status, content=body.model_dump(), headers=headers or None)


def _field_name(loc: Sequence[Any]) -> str:
    # FastAPI prefixes body fields with "body" and query parameters with "query"; clients know
    # their own field names, so the prefix is dropped unless it is all there is.
    parts = [str(p) for p in loc]
    if len(parts) > 1 and parts[0] in {"body", "query", "path", "header"}:
        parts = parts[1:]
    return ".".join(parts)


def validation_response(errors: Sequence[Any]) -> JSONResponse:
    """422 (or 400 for JSON that does not parse) naming every refused field."""
    if any(err.get("type") == "json_invalid" for err in errors):
        err = next(e for e in errors if e.get("type") == "json_invalid")
        ctx = err.get("ctx") or {}
        detail = ctx.get("error", err.get("msg", "invalid JSON"))
        return error_response(400, "malformed_json", f"request body is not valid JSON: {detail}")
    fields = [FieldError(field=_field_name(e.get("loc", ())), message=str(e.get("msg", ""))) for e in errors]
    message = "; ".join(f"{f.field}: {f.message}" for f in fields[:10])
    if len(fields) > 10:
        message += f"; and {len(fields) - 10} more"
    body = ErrorBody(error="invalid_request", message=message, fields=fields)
    return JSONResponse(status_code=422, content=body.model_dump())


def install_error_handlers(app: FastAPI) -> None:
    """Map the platform's exceptions to HTTP answers."""

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_ERRORS.get(exc.status_code, "error")
        return error_response(exc.status_code, code, str(exc.detail), **(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_response(exc.errors())

    @app.exception_handler(ValidationError)
    async def _invalid_model(_: Request, exc: ValidationError) -> JSONResponse:
        return validation_response(exc.errors())

    @app.exception_handler(IntakeUnavailable)
    async def _intake(_: Request, exc: IntakeUnavailable) -> JSONResponse:
        return error_response(503, exc.reason, str(exc), **{"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(StoreUnavailable)
    async def _store(_: Request, exc: StoreUnavailable) -> JSONResponse:
        return error_response(
            503, "store_unreachable", "the online store did not answer", **{"Retry-After": "2"}
        )

    @app.exception_handler(UnknownEntity)
    async def _unknown(_: Request, exc: UnknownEntity) -> JSONResponse:
        return error_response(404, "not_found", str(exc))
