"""The FastAPI application: the same object runs in tests and behind the Serve ingress."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response

from deployments.api import catalog, controls, events, health
from deployments.api.errors import error_response, install_error_handlers
from deployments.api.services import ApiServices

MAX_BODY_BYTES = 4 * 1024 * 1024
"""Largest body any route accepts: 1,000 events with full contexts, or a bulk catalog page."""


def create_app(services: ApiServices) -> FastAPI:
    """Build the HTTP API over the given services.

    Args:
        services: The process's services; the app does not own them (the caller closes them).

    Returns:
        The application, with OpenAPI at ``/docs`` and ``/openapi.json``.
    """
    app = FastAPI(
        title="rayrec",
        version="0.1.0",
        description="Recommendations, event tracking, feedback, catalog and admin routes.",
    )
    app.state.services = services
    install_error_handlers(app)

    @app.middleware("http")
    async def _limit_body(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return error_response(400, "bad_request", "Content-Length is not a number")
            if int(length) > MAX_BODY_BYTES:
                return error_response(
                    413, "payload_too_large", f"body of {int(length):,} bytes exceeds {MAX_BODY_BYTES:,}"
                )
        return await call_next(request)

    app.include_router(health.router)
    app.include_router(events.router)
    app.include_router(catalog.router)
    app.include_router(controls.admin)
    app.include_router(controls.user_controls)
    return app
