"""Moderation (admin) and user-control routes: written synchronously, effective on the next request."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from core.schema import Item, ItemStatus, Model, UserProfile
from deployments.api.auth import Admin, Client, services
from deployments.api.errors import ErrorBody
from deployments.api.params import CreatorIdPath, ItemIdPath, UserIdPath
from deployments.api.services import ApiServices

Services = Annotated[ApiServices, Depends(services)]
_REFUSALS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorBody},
    403: {"model": ErrorBody},
    404: {"model": ErrorBody},
    503: {"model": ErrorBody},
}

admin = APIRouter(prefix="/api/admin", tags=["admin"], dependencies=[Admin], responses=_REFUSALS)
user_controls = APIRouter(
    prefix="/api/users", tags=["user controls"], dependencies=[Client], responses=_REFUSALS
)


class Privacy(Model):
    """A user's privacy choice."""

    personalization: bool


@admin.get("/streams")
async def stream_report(svc: Services) -> dict[str, Any]:
    """Totals and loop state of the stream processor and the lake writer, plus stream lengths."""
    keys = svc.store.keys
    # The asyncio client, in one round trip: this handler runs on the event loop.
    with svc.store.guard():
        pipe = svc.store.aclient.pipeline(transaction=False)
        pipe.xlen(keys.stream_events())
        pipe.xlen(keys.stream_impressions())
        events, impressions = await pipe.execute()
    lengths = {"events": int(events), "impressions": int(impressions)}
    consumers = await svc.stream_stats() if svc.stream_stats is not None else None
    return {"stream_length": lengths, "consumers": consumers}


@admin.post("/items/{item_id}/remove", response_model=Item)
def remove_item(item_id: ItemIdPath, svc: Services) -> Item:
    """Remove an item from every surface."""
    return svc.changes.set_item_status(item_id, ItemStatus.REMOVED)


@admin.post("/items/{item_id}/restore", response_model=Item)
def restore_item(item_id: ItemIdPath, svc: Services) -> Item:
    """Make a removed item servable again."""
    return svc.changes.set_item_status(item_id, ItemStatus.ACTIVE)


@admin.put("/blocked-items/{item_id}", status_code=204)
def block_item(item_id: ItemIdPath, svc: Services) -> None:
    """Block one item for everyone."""
    svc.changes.block_item(item_id, True)


@admin.delete("/blocked-items/{item_id}", status_code=204)
def unblock_item(item_id: ItemIdPath, svc: Services) -> None:
    """Lift a global item block."""
    svc.changes.block_item(item_id, False)


@admin.put("/blocked-creators/{creator_id}", status_code=204)
def block_creator(creator_id: CreatorIdPath, svc: Services) -> None:
    """Block every item of a creator for everyone."""
    svc.changes.block_creator(creator_id, True)


@admin.delete("/blocked-creators/{creator_id}", status_code=204)
def unblock_creator(creator_id: CreatorIdPath, svc: Services) -> None:
    """Lift a global creator block."""
    svc.changes.block_creator(creator_id, False)


@user_controls.put("/{user_id}/privacy", response_model=UserProfile)
def set_privacy(user_id: UserIdPath, privacy: Privacy, svc: Services) -> UserProfile:
    """Turn personalisation on or off; off serves only non-personalised lists from the next request."""
    return svc.changes.set_personalization(user_id, privacy.personalization)


@user_controls.put("/{user_id}/blocked-creators/{creator_id}", status_code=204)
def block_creator_for_user(user_id: UserIdPath, creator_id: CreatorIdPath, svc: Services) -> None:
    """Never show this user items of this creator."""
    svc.changes.block_creator_for_user(user_id, creator_id, True)


@user_controls.delete("/{user_id}/blocked-creators/{creator_id}", status_code=204)
def unblock_creator_for_user(user_id: UserIdPath, creator_id: CreatorIdPath, svc: Services) -> None:
    """Lift a user's own creator block."""
    svc.changes.block_creator_for_user(user_id, creator_id, False)


@user_controls.delete("/{user_id}", status_code=204)
def erase_user(user_id: UserIdPath, svc: Services) -> None:
    """Erase a user's online data and record a tombstone: offline jobs drop the user's events."""
    svc.changes.erase_user(user_id)
