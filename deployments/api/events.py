"""Event tracking and feedback routes (seed section 3)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends
from pydantic import Field

from core.schema import FeedbackRequest, Model, UserEvent
from deployments.api.auth import Client, services
from deployments.api.errors import ErrorBody
from deployments.api.services import ApiServices

MAX_BATCH_EVENTS = 1000

router = APIRouter(prefix="/api", tags=["events"], dependencies=[Client])

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


@router.post("/events", status_code=202, response_model=EventAccepted, responses=_REFUSALS)
async def track_event(event: UserEvent, svc: Services) -> EventAccepted:
    """Track one behaviour event (click, view, like, share, purchase, hide, skip, report, watch, …)."""
    result = await svc.intake.accept([event])
    return EventAccepted(event_id=result.event_ids[0])


@router.post("/events/batch", status_code=202, response_model=BatchAccepted, responses=_REFUSALS)
async def track_events(batch: EventBatch, svc: Services) -> BatchAccepted:
    """Track up to 1,000 events in one call, all or nothing."""
    result = await svc.intake.accept(batch.events)
    return BatchAccepted(accepted=len(result.event_ids), event_ids=result.event_ids)


@router.post("/recommendations/feedback", status_code=202, response_model=EventAccepted, responses=_REFUSALS)
async def feedback(body: FeedbackRequest, svc: Services) -> EventAccepted:
    """Explicit feedback on a recommended item; hide, not_interested and report hold on the next request."""
    result = await svc.intake.accept([body.to_event()])
    return EventAccepted(event_id=result.event_ids[0])
