"""The FastAPI application: the same object runs in tests and behind the Serve ingress."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from deployments.api import (
    catalog,
    controls,
    events,
    experiments,
    health,
    metrics,
    rate_limit,
    recommendations,
    refusals,
)
from deployments.api.body_stream import StreamedBodyLimit
from deployments.api.errors import error_response, install_error_handlers
from deployments.api.services import ApiServices
from features.metrics import StreamMetrics, default_metrics

MAX_BODY_BYTES = 4 * 1024 * 1024
"""Largest body any route accepts: 1,000 events with full contexts, or a bulk catalog page."""


class BodyLimit:
    """Refuses a request whose ``Content-Length`` is not a number (400) or exceeds ``max_bytes`` (413).

    A plain ASGI middleware: ``@app.middleware("http")`` runs every request through an extra task
    and stream pair, which costs more than the route itself for a single event.

    Args:
        app: The application it wraps.
        max_bytes: The largest body accepted.
    """

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer the refusal, or pass the request on untouched."""
        if scope["type"] == "http":
            length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
            refusal = None
            if length is not None:
                if not length.isdigit():
                    refusal = error_response(400, "bad_request", "Content-Length is not a number")
                elif int(length) > self.max_bytes:
                    refusal = error_response(
                        413, "payload_too_large", f"body of {int(length):,} bytes exceeds {self.max_bytes:,}"
                    )
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(services: ApiServices, *, stream_metrics: StreamMetrics | None = None) -> FastAPI:
    """Build the HTTP API over the given services.

    Args:
        services: The process's services; the app does not own them (the caller closes them).
        stream_metrics: Where the event routes count and what ``GET /metrics`` reports; the
            process-wide metrics when omitted.

    Returns:
        The application, with OpenAPI at ``/docs`` and ``/openapi.json``.
    """
    app = FastAPI(
        title="rayrec",
        version="0.1.0",
        description="Recommendations, event tracking, feedback, catalog and admin routes.",
    )
    app.state.services = services
    app.state.metrics = stream_metrics or default_metrics()
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    app.add_middleware(StreamedBodyLimit, max_bytes=MAX_BODY_BYTES)
    rate_limit.install(app)
    refusals.document(app)

    # A request is matched against the routes in this order, one regex each, so the two hot
    # paths come first (no path of theirs overlaps a later one): at 50 requests/s route matching
    # was about 2 % of an ingress replica's event loop with the recommendations route seventh.
    app.include_router(recommendations.router)
    app.include_router(events.router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(catalog.router)
    app.include_router(controls.admin)
    app.include_router(controls.user_controls)
    app.include_router(recommendations.admin)
    app.include_router(experiments.admin)
    return app
