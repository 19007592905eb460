"""Reasons: every served item says why it is there, in words a user understands."""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from core.types import Candidate, RequestContext
from features.candidate_refs import ITEM_CATEGORY, ITEM_CREATED_AT_S, RERANK_EXPLORATION
from features.user_context import category_affinities, profile_interests
from policies.sponsored_marks import is_sponsored
from policies.sponsored_slot_policy import label

DEFAULT_SOURCE_REASONS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "two_tower_ann": "Picked for you",
        "item_to_item": "People who liked what you liked also liked this",
        "recently_viewed_related": "Related to something you viewed",
        "content": "Based on your interests",
        "social": "Liked by people you follow",
        "trending": "Trending now",
        "popular": "Popular right now",
        "similar_items": "You may also like",
    }
)
"""Fallback reason per source name, for candidates whose source gave none."""

NEW_FOR_YOU: Final = "New for you"
FALLBACK_REASON: Final = "Recommended for you"


class ReasonPolicy:
    """Gives every item a reason; runs last, after the list is final.

    In order of preference:

    1. sponsored items: ``"Sponsored"`` (kept in front of any other reason);
    2. the reason a source or policy already set ("Because you watched …", "Trending in your
       region", "Liked by 3 people you follow");
    3. exploration items and items younger than ``new_item_age_h``: ``"New for you"``;
    4. an item of one of the user's categories: ``"Because you like <category>"`` (interests of
       a new user: ``"Based on your interest in <category>"``);
    5. the reason of the first source that produced it, from ``source_reasons``;
    6. ``"Recommended for you"``.

    Args:
        source_reasons: Reason per source name.
        new_item_age_h: Items younger than this count as new.
        name: Stage id.
    """

    def __init__(
        self,
        source_reasons: Mapping[str, str] = DEFAULT_SOURCE_REASONS,
        new_item_age_h: float = 72.0,
        *,
        name: str = "reason",
    ) -> None:
        self.name = name
        self.source_reasons = dict(source_reasons)
        self.new_item_age_h = new_item_age_h

    def apply(self, ctx: RequestContext, ranked: list[Candidate]) -> list[Candidate]:
        """Set ``reason`` on every candidate that lacks one; label sponsored ones."""
        liked = {c for c, _ in category_affinities(ctx.user_features)} if ctx.personalization else set()
        interests = set(profile_interests(ctx)) if ctx.personalization else set()
        now_s = ctx.now.timestamp()
        for cand in ranked:
            if is_sponsored(cand):
                cand.reason = label(cand.reason)
            elif not cand.reason:
                cand.reason = self._reason(cand, liked, interests, now_s)
        return ranked

    def _reason(self, cand: Candidate, liked: set[str], interests: set[str], now_s: float) -> str:
        created = cand.features.get_float(ITEM_CREATED_AT_S, math.nan)
        young = not math.isnan(created) and now_s - created < self.new_item_age_h * 3600.0
        if cand.features.get_bool(RERANK_EXPLORATION, False) or young:
            return NEW_FOR_YOU
        category = cand.features.get_str(ITEM_CATEGORY, "")
        if category in liked:
            return f"Because you like {category}"
        if category in interests:
            return f"Based on your interest in {category}"
        for source in cand.sources:
            reason = self.source_reasons.get(source)
            if reason:
                return reason
        return FALLBACK_REASON
