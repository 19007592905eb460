"""Per-client rate limiting of the event routes: ``429`` with ``Retry-After`` past the limit.

The limited routes are ``POST /api/events``, ``POST /api/events/batch`` and
``POST /api/recommendations/feedback``, all drawing on one bucket per client. Each event costs one
token, so a batch of 1,000 costs 1,000 (``RAYREC_RATE_LIMIT_EVENTS_PER_S`` sustained,
``RAYREC_RATE_LIMIT_EVENTS_BURST`` at once; a rate of 0 turns the limit off). The buckets are in
Redis (:mod:`features.rate_limiter`), so the limit holds for all ingress replicas together.

A client is its ``X-API-Key`` when client keys are configured and the header holds one of them,
otherwise its address: the connection's, or with ``RAYREC_RATE_LIMIT_TRUSTED_PROXIES`` set, the one
that many entries from the right of ``X-Forwarded-For``. Keys are hashed before they name a bucket.

The check is an app-wide dependency, so it runs after the body is parsed as JSON (FastAPI caches
the parse, so counting a batch's events costs no second parse) and before the body is validated:
an over-limit client is refused before the expensive part of the route, invalid batches included.
A body that is not JSON is refused (400) before the check and costs nothing.
Refused events count in ``rayrec_events_rejected`` with reason ``rate_limited``; calls let through
unchecked because Redis did not answer count in ``rayrec_rate_limit_unchecked``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import weakref
from collections import Counter as Tally
from collections.abc import Callable
from typing import Any, Final

from fastapi import Depends, FastAPI, HTTPException, Request
from prometheus_client import CollectorRegistry, Counter

from core.schema import EventType
from core.settings import Settings
from deployments.api.services import ApiServices
from features.metrics import StreamMetrics
from features.rate_limiter import EventRateLimiter

LIMITED_ROUTES: Final = frozenset(
    {("POST", "/api/events"), ("POST", "/api/events/batch"), ("POST", "/api/recommendations/feedback")}
)
"""Method and path template of every route that draws on a client's event bucket."""

BATCH_ROUTE: Final = "/api/events/batch"

_EVENT_TYPE_FIELDS: Final = ("eventType", "event_type", "feedback")
_MAX_ADDRESS_LEN: Final = 64
_KNOWN_TYPES: Final = frozenset(t.value for t in EventType)

_unchecked_counters: weakref.WeakKeyDictionary[CollectorRegistry, Counter] = weakref.WeakKeyDictionary()


def _unchecked_counter(registry: CollectorRegistry) -> Counter:
    # One counter per registry: several apps of one process (tests, or re-created apps) share
    # the process registry, which refuses a second metric of the same name.
    counter = _unchecked_counters.get(registry)
    if counter is None:
        counter = Counter(
            "rayrec_rate_limit_unchecked",
            "Event calls let through without a rate-limit check because Redis did not answer.",
            registry=registry,
        )
        _unchecked_counters[registry] = counter
    return counter


def client_address(request: Request, trusted_proxies: int) -> str:
    """The address a call comes from, as far as it can be trusted.

    Args:
        request: The call.
        trusted_proxies: Proxies in front of this process that append to ``X-Forwarded-For``;
            0 ignores the header.

    Returns:
        A normalised IP address, or the connection's host as given (``unknown`` without one).
    """
    peer = request.client.host if request.client is not None else "unknown"
    if trusted_proxies < 1:
        return peer
    hops = [hop.strip() for hop in ",".join(request.headers.getlist("x-forwarded-for")).split(",")]
    hops = [hop for hop in hops if hop]
    if len(hops) < trusted_proxies:
        # Fewer entries than proxies: the header did not pass through all of them, so none of it
        # can be trusted.
        return peer
    candidate = hops[-trusted_proxies]
    if len(candidate) > _MAX_ADDRESS_LEN:
        return peer
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:
        return peer


def client_id(request: Request, settings: Settings) -> str:
    """Who a call is charged to: ``key:<digest>`` for a configured client key, else ``addr:<address>``.

    An ``X-API-Key`` that is not a configured key does not name a bucket (the route refuses the
    call anyway); otherwise a client could make up a fresh key per call to escape its limit.
    """
    given = request.headers.get("x-api-key")
    if given is not None and settings.client_api_keys:
        encoded = given.encode()
        if any(hmac.compare_digest(encoded, key.encode()) for key in settings.client_api_keys):
            return "key:" + hashlib.sha256(encoded).hexdigest()[:32]
    return "addr:" + client_address(request, settings.rate_limit_trusted_proxies)


def _is_json(request: Request) -> bool:
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return content_type == "application/json" or content_type.endswith("+json")


async def _parsed_body(request: Request) -> Any:
    # FastAPI has already parsed a JSON body through request.json(), which caches it; any other
    # body is refused by the route's validation, so it is not parsed here.
    if not _is_json(request):
        return None
    try:
        return await request.json()
    except (ValueError, RecursionError):
        return None


def _event_types(path: str, body: Any) -> list[str]:
    """One event type per event of the body (``unknown`` where it cannot be read)."""
    if path == BATCH_ROUTE:
        events = body.get("events") if isinstance(body, dict) else None
        if not isinstance(events, list) or not events:
            return ["unknown"]
        return [_type_of(event) for event in events]
    return [_type_of(body)]


def _type_of(event: Any) -> str:
    # Label values must stay a small fixed set: a type a client made up counts as "unknown".
    if isinstance(event, dict):
        for name in _EVENT_TYPE_FIELDS:
            value = event.get(name)
            if isinstance(value, str) and value in _KNOWN_TYPES:
                return value
    return "unknown"


def _count_refused(metrics: StreamMetrics, types: list[str]) -> None:
    for event_type, n in Tally(types).items():
        metrics.events_rejected.labels(event_type, "rate_limited").inc(n)


def _refusal(limiter: EventRateLimiter, cost: int, remaining: float, retry_after_s: float) -> HTTPException:
    retry_after = max(1, math.ceil(retry_after_s))
    message = (
        f"rate limit exceeded: at most {limiter.rate_per_s:g} events/s per client with a burst of "
        f"{limiter.burst:,} (RAYREC_RATE_LIMIT_EVENTS_PER_S, RAYREC_RATE_LIMIT_EVENTS_BURST); this call "
        f"has {cost:,} event(s) and {math.floor(remaining):,} are available now; retry after {retry_after} s"
    )
    return HTTPException(429, message, {"Retry-After": str(retry_after)})


async def enforce_event_rate(request: Request) -> None:
    """App-wide dependency: refuse an event call whose client is over its limit.

    Every other route, and every route while the limit is off, passes untouched.

    Raises:
        HTTPException: 429 with ``Retry-After`` when the client's bucket lacks the call's events.
    """
    limiter: EventRateLimiter | None = request.app.state.event_rate_limiter
    if limiter is None:
        return
    path = getattr(request.scope.get("route"), "path", None)
    if (request.method, path) not in LIMITED_ROUTES:
        return
    assert isinstance(path, str)  # for the type checker: a limited route has a path
    types = _event_types(path, await _parsed_body(request))
    # A batch over the burst is refused by validation anyway; charging it the whole bucket keeps
    # it from being refused as "over the limit" forever, which Retry-After could not cure.
    cost = min(len(types), limiter.burst)
    services: ApiServices = request.app.state.services
    decision = await limiter.acquire(client_id(request, services.settings), cost)
    metrics: StreamMetrics = request.app.state.metrics
    if not decision.checked:
        _unchecked_counter(metrics.registry).inc()
    if decision.allowed:
        return
    _count_refused(metrics, types)
    raise _refusal(limiter, cost, decision.remaining, decision.retry_after_s)


_RATE_LIMITED_RESPONSE: Final = {
    "description": "Over the client's event rate limit: retry after `Retry-After` seconds.",
    "headers": {
        "Retry-After": {
            "description": "Seconds until the call's events fit in the client's bucket.",
            "schema": {"type": "integer", "minimum": 1},
        }
    },
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
}


def _document_429(build: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    def openapi() -> dict[str, Any]:
        schema = build()
        # FastAPI hands back its cached schema until the routes change; setting the answer is
        # idempotent, so a rebuilt schema gets it again.
        for method, path in LIMITED_ROUTES:
            operation = schema.get("paths", {}).get(path, {}).get(method.lower())
            if operation is not None:
                operation.setdefault("responses", {})["429"] = _RATE_LIMITED_RESPONSE
        return schema

    return openapi


def install(app: FastAPI) -> None:
    """Rate-limit the event routes of ``app`` (see the module docstring).

    Call before the routers are included: FastAPI copies the app's dependencies into each route
    as it is included. ``app.state.services`` and ``app.state.metrics`` must be set.

    Args:
        app: The application being built.
    """
    services: ApiServices = app.state.services
    settings = services.settings
    limiter = None
    if settings.rate_limit_events_per_s > 0:
        limiter = EventRateLimiter(
            services.store, settings.rate_limit_events_per_s, settings.rate_limit_events_burst
        )
    app.state.event_rate_limiter = limiter
    if limiter is not None:
        # Registered now, so a scrape shows 0 before the first outage rather than no series.
        metrics: StreamMetrics = app.state.metrics
        _unchecked_counter(metrics.registry)
        # Only with a limit: every route of the app then solves one more dependency.
        app.router.dependencies.append(Depends(enforce_event_rate))
    # FastAPI's documented way to extend the generated schema is to replace app.openapi.
    app.openapi = _document_429(app.openapi)  # type: ignore[method-assign]
