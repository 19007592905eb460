"""Catalog routes: items (admin writes), users and their follow edges."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException
from pydantic import Field

from core.schema import Item, Model, SocialEdge, UserProfile
from deployments.api.auth import Admin, Client, services
from deployments.api.errors import ErrorBody
from deployments.api.params import ItemIdPath, UserIdPath
from deployments.api.services import ApiServices

MAX_BULK_ITEMS = 10_000

router = APIRouter(prefix="/api", tags=["catalog"])
Services = Annotated[ApiServices, Depends(services)]
_REFUSALS: dict[int | str, dict[str, object]] = {
    404: {"model": ErrorBody},
    422: {"model": ErrorBody},
    503: {"model": ErrorBody},
}


class ItemBatch(Model):
    """A bulk catalog upload."""

    items: Annotated[list[Item], Field(min_length=1, max_length=MAX_BULK_ITEMS)]


class Written(Model):
    """How many records were written."""

    written: int


@router.post("/items", status_code=201, response_model=Item, dependencies=[Admin], responses=_REFUSALS)
def create_item(item: Item, svc: Services) -> Item:
    """Create (or replace) an item; it is servable on the next request."""
    return svc.changes.put_item(item)


@router.put("/items/{item_id}", response_model=Item, dependencies=[Admin], responses=_REFUSALS)
def update_item(item_id: ItemIdPath, item: Item, svc: Services) -> Item:
    """Replace an item's record."""
    if item.item_id != item_id:
        raise HTTPException(422, f"itemId in the body ({item.item_id!r}) differs from the path ({item_id!r})")
    return svc.changes.put_item(item)


@router.get("/items/{item_id}", response_model=Item, dependencies=[Client], responses=_REFUSALS)
def get_item(item_id: ItemIdPath, svc: Services) -> Item:
    """One item of the catalog."""
    return svc.changes.get_item(item_id)


@router.post("/catalog/items", response_model=Written, dependencies=[Admin], responses=_REFUSALS)
def upload_items(batch: ItemBatch, svc: Services) -> Written:
    """Bulk catalog upload: up to 10,000 items a call."""
    return Written(written=svc.changes.put_items(batch.items))


@router.put("/users/{user_id}", response_model=UserProfile, dependencies=[Client], responses=_REFUSALS)
def put_user(user_id: UserIdPath, user: UserProfile, svc: Services) -> UserProfile:
    """Create or replace a user profile: age group, region, language, onboarding interests, privacy."""
    if user.user_id != user_id:
        raise HTTPException(422, f"userId in the body ({user.user_id!r}) differs from the path ({user_id!r})")
    return svc.changes.put_user(user)


@router.get("/users/{user_id}", response_model=UserProfile, dependencies=[Client], responses=_REFUSALS)
def get_user(user_id: UserIdPath, svc: Services) -> UserProfile:
    """One user profile."""
    return svc.changes.get_user(user_id)


@router.put(
    "/users/{user_id}/following/{followee_id}", status_code=204, dependencies=[Client], responses=_REFUSALS
)
def follow(user_id: UserIdPath, followee_id: UserIdPath, svc: Services) -> None:
    """``user_id`` follows ``followee_id``."""
    svc.changes.follow(SocialEdge(follower_id=user_id, followee_id=followee_id, active=True))


@router.delete(
    "/users/{user_id}/following/{followee_id}", status_code=204, dependencies=[Client], responses=_REFUSALS
)
def unfollow(user_id: UserIdPath, followee_id: UserIdPath, svc: Services) -> None:
    """``user_id`` stops following ``followee_id``."""
    svc.changes.follow(SocialEdge(follower_id=user_id, followee_id=followee_id, active=False))
