"""Event tracking and feedback routes (seed section 3).

Every route counts what it stores (``rayrec_events_accepted`` by type) and what it refuses
(``rayrec_events_rejected`` by type and reason): a refused event is counted under its
``eventType`` when that much of it could be read, else ``unknown``; a refused batch counts each
of its events, since none of them was stored.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import Field

from core.schema import EventType, FeedbackRequest, Model, UserEvent
from deployments.api.auth import Client, services
from deployments.api.errors import ErrorBody
from deployments.api.metrics import app_metrics, metrics_of
from deployments.api.services import ApiServices
from features.intake import IntakeResult, IntakeUnavailable
from features.metrics import StreamMetrics
from features.quality import default_quality_window

MAX_BATCH_EVENTS = 1000

_EVENT_TYPES: Final = frozenset(t.value for t in EventType)
_TYPE_FIELDS: Final = ("eventType", "event_type", "feedback")
"""Where a body names its event type: events (either spelling) and feedback."""


def _type_of(body: Any) -> str:
    if isinstance(body, dict):
        for name in _TYPE_FIELDS:
            value = body.get(name)
            if isinstance(value, str) and value in _EVENT_TYPES:
                return value
    return "unknown"


def refused_types(body: Any) -> list[str]:
    """The event types of a refused body, as far as it could be read: one entry per event.

    Args:
        body: The parsed JSON body (the raw text when it did not parse).

    Returns:
        One type (or ``"unknown"``) per event of a batch, or one for any other body.
    """
    if isinstance(body, dict) and isinstance(body.get("events"), list) and body["events"]:
        return [_type_of(event) for event in body["events"]]
    return [_type_of(body)]


def _count(counter: Any, types: Sequence[str], *labels: str) -> None:
    for event_type, n in Counter(types).items():
        counter.labels(event_type, *labels).inc(n)


class CountedRoute(APIRoute):
    """A route that counts the events of a body it refuses as invalid before the handlers answer."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """The default handler, wrapped to count validation refusals (400 and 422)."""
        handler = super().get_route_handler()

        async def counted(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                malformed = any(e.get("type") == "json_invalid" for e in exc.errors())
                reason = "malformed_json" if malformed else "invalid"
                _count(metrics_of(request).events_rejected, refused_types(exc.body), reason)
                raise

        return counted


router = APIRouter(prefix="/api", tags=["events"], dependencies=[Client], route_class=CountedRoute)

_REFUSALS: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorBody, "description": "The body is not valid JSON."},
    413: {"model": ErrorBody, "description": "The body is larger than the route allows."},
    422: {"model": ErrorBody, "description": "A field was refused; `fields` names each one."},
    503: {
        "model": ErrorBody,
        "description": "Not stored (stream full or store down): retry after `Retry-After`.",
    },
}


class EventAccepted(Model):
    """The answer to an accepted event: it is durably stored and will be processed."""

    event_id: str
    status: Literal["accepted"] = "accepted"


class EventBatch(Model):
    """Up to 1,000 events; either all are stored or none is."""

    events: Annotated[list[UserEvent], Field(min_length=1, max_length=MAX_BATCH_EVENTS)]


class BatchAccepted(Model):
    """The answer to an accepted batch: the ids in the order sent."""

    accepted: int
    event_ids: list[str]


Services = Annotated[ApiServices, Depends(services)]
Metrics = Annotated[StreamMetrics, Depends(app_metrics)]


async def _accept(svc: ApiServices, metrics: StreamMetrics, events: Sequence[UserEvent]) -> IntakeResult:
    types = [e.event_type.value for e in events]
    try:
        result = await svc.intake.accept(events)
    except IntakeUnavailable as exc:
        _count(metrics.events_rejected, types, exc.reason)
        raise
    _count(metrics.events_accepted, types)
    default_quality_window().record_events(types)
    return result


@router.post("/events", status_code=202, response_model=EventAccepted, responses=_REFUSALS)
async def track_event(event: UserEvent, svc: Services, metrics: Metrics) -> EventAccepted:
    """Track one behaviour event (click, view, like, share, purchase, hide, skip, report, watch, …)."""
    result = await _accept(svc, metrics, [event])
    return EventAccepted(event_id=result.event_ids[0])


@router.post("/events/batch", status_code=202, response_model=BatchAccepted, responses=_REFUSALS)
async def track_events(batch: EventBatch, svc: Services, metrics: Metrics) -> BatchAccepted:
    """Track up to 1,000 events in one call, all or nothing."""
    result = await _accept(svc, metrics, batch.events)
    return BatchAccepted(accepted=len(result.event_ids), event_ids=result.event_ids)


@router.post("/recommendations/feedback", status_code=202, response_model=EventAccepted, responses=_REFUSALS)
async def feedback(body: FeedbackRequest, svc: Services, metrics: Metrics) -> EventAccepted:
    """Explicit feedback on a recommended item; hide, not_interested and report hold on the next request."""
    result = await _accept(svc, metrics, [body.to_event()])
    return EventAccepted(event_id=result.event_ids[0])
