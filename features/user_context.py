"""Readers of the requesting user's features, as the serving stages need them.

``RequestContext.user_features`` holds the user's ``user_activity`` serving record (read once per
request) and profile fields (``user_profile:*``). These functions turn those parallel lists into
typed values, so no stage re-implements the zipping or the cold-start fallbacks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from core.schema import NEGATIVE_FEEDBACK, EventType
from core.types import FeatureMap, RequestContext
from features.candidate_refs import (
    INTERESTS_PARAM,
    USER_AGE_GROUP,
    USER_INTERESTS,
    USER_LANGUAGE,
    USER_REGION,
)

RECENT_ITEM_IDS: Final = "user_activity:recent_item_ids"
RECENT_EVENT_TYPES: Final = "user_activity:recent_event_types"
RECENT_EVENT_TS: Final = "user_activity:recent_event_ts"
SESSION_ITEM_IDS: Final = "user_activity:session_item_ids"
TOP_CATEGORIES: Final = "user_activity:top_categories"
TOP_CATEGORY_AFFINITIES: Final = "user_activity:top_category_affinities"

POSITIVE_EVENTS: Final[frozenset[str]] = frozenset(
    t.value
    for t in (
        EventType.VIEW,
        EventType.CLICK,
        EventType.WATCH,
        EventType.LIKE,
        EventType.SHARE,
        EventType.PURCHASE,
    )
)
"""Event types that say the user engaged with the item (seeds of history-based sources)."""

NEGATIVE_EVENTS: Final[frozenset[str]] = frozenset(t.value for t in NEGATIVE_FEEDBACK | {EventType.SKIP})
"""Event types that say the user did not want the item; never used as seeds."""


@dataclass(frozen=True, slots=True)
class RecentEvent:
    """One entry of the user's recent history.

    Attributes:
        item_id: The item.
        event_type: An ``EventType`` value.
        ts_s: When, epoch seconds.
    """

    item_id: str
    event_type: str
    ts_s: float


def recent_events(features: FeatureMap) -> list[RecentEvent]:
    """The user's recent events, newest first.

    Args:
        features: A user's features (``RequestContext.user_features`` or a followee's record).

    Returns:
        One entry per recent event; empty for a user without history.
    """
    item_ids = features.get_strings(RECENT_ITEM_IDS, ())
    types = features.get_strings(RECENT_EVENT_TYPES, ())
    stamps = features.get_vector(RECENT_EVENT_TS, ())
    # The three lists are written together; zip's shortest length guards a half-written record.
    return [RecentEvent(i, t, s) for i, t, s in zip(item_ids, types, stamps, strict=False)]


def category_affinities(features: FeatureMap) -> list[tuple[str, float]]:
    """The user's categories with positive affinity, strongest first."""
    categories = features.get_strings(TOP_CATEGORIES, ())
    values = features.get_vector(TOP_CATEGORY_AFFINITIES, ())
    return list(zip(categories, values, strict=False))


def profile_interests(ctx: RequestContext) -> tuple[str, ...]:
    """Onboarding interests: ``ctx.params["interests"]`` when given, else the profile's.

    Args:
        ctx: The request.

    Returns:
        Interests in the order given, without blanks or repeats.
    """
    raw = ctx.params.get(INTERESTS_PARAM)
    given = raw.split(",") if isinstance(raw, str) else ctx.user_features.get_strings(USER_INTERESTS, ())
    return tuple(dict.fromkeys(name.strip() for name in given if name.strip()))


def interest_categories(ctx: RequestContext) -> list[tuple[str, float]]:
    """The categories to personalise with: history affinities, else onboarding interests.

    A user with behaviour history gets their decayed category affinities; a new user gets the
    onboarding interests, all weighted 1.0. A user who opted out of personalisation gets none.

    Args:
        ctx: The request.

    Returns:
        ``(category, weight)``, strongest first.
    """
    if not ctx.personalization:
        return []
    history = category_affinities(ctx.user_features)
    if history:
        return history
    return [(name, 1.0) for name in profile_interests(ctx)]


def request_region(ctx: RequestContext) -> str | None:
    """The request's region, else the profile's."""
    return ctx.region or ctx.user_features.get_str(USER_REGION, "") or None


def request_language(ctx: RequestContext) -> str | None:
    """The request's language, else the profile's."""
    return ctx.language or ctx.user_features.get_str(USER_LANGUAGE, "") or None


def positive_history(ctx: RequestContext) -> list[str]:
    """The user's recent positively engaged items, newest first, each once (the models' history).

    Args:
        ctx: The request.

    Returns:
        Item ids; empty for a user without history or who opted out.
    """
    if not ctx.personalization:
        return []
    seen: dict[str, None] = {}
    for event in recent_events(ctx.user_features):
        if event.event_type in POSITIVE_EVENTS:
            seen.setdefault(event.item_id)
    return list(seen)


def model_profile(ctx: RequestContext) -> dict[str, str | None]:
    """The profile fields the models read (``age_group``, ``region``, ``language``); None when unknown."""
    if not ctx.personalization:
        return {"age_group": None, "region": None, "language": None}
    return {
        "age_group": ctx.user_features.get_str(USER_AGE_GROUP, "") or None,
        "region": request_region(ctx),
        "language": request_language(ctx),
    }
