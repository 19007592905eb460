"""Freshness: a decaying score boost for young items, so new content gets seen."""

from __future__ import annotations

import math

from core.types import Candidate, RequestContext
from features.candidate_refs import ITEM_CREATED_AT_S, RERANK_FRESHNESS_BOOST
from policies.sponsored_marks import split_sponsored


class FreshnessBoostPolicy:
    """Adds ``boost * 2 ** (-age / half_life)`` to the score of items younger than ``max_age_h``.

    The organic candidates are then re-sorted by score (stable, so equal scores keep the ranker's
    order). The boost is in score units: size it to the ranker's score range. What each item got
    is recorded in ``rerank:freshness_boost``. Items without a creation time get nothing.

    Args:
        boost: Boost of a brand-new item.
        half_life_h: Age in hours at which the boost halves.
        max_age_h: Items older than this get no boost.
        name: Stage id.
    """

    def __init__(
        self,
        boost: float = 0.1,
        half_life_h: float = 12.0,
        max_age_h: float = 48.0,
        *,
        name: str = "freshness_boost",
    ) -> None:
        if boost < 0 or half_life_h <= 0 or max_age_h < 0:
            raise ValueError("boost and max_age_h must be >= 0 and half_life_h > 0")
        self.name = name
        self.boost = boost
        self.half_life_h = half_life_h
        self.max_age_h = max_age_h

    def boost_of(self, cand: Candidate, now_s: float) -> float:
        """What the candidate's score gets at ``now_s`` (epoch seconds)."""
        created = cand.features.get_float(ITEM_CREATED_AT_S, math.nan)
        if math.isnan(created):
            return 0.0
        age_h = max(0.0, now_s - created) / 3600.0
        if age_h > self.max_age_h:
            return 0.0
        return self.boost * math.exp2(-age_h / self.half_life_h)

    def apply(self, ctx: RequestContext, ranked: list[Candidate]) -> list[Candidate]:
        """Boost young organic items and re-sort them; sponsored candidates pass through at the end."""
        if self.boost == 0:
            return ranked
        organic, sponsored = split_sponsored(ranked)
        now_s = ctx.now.timestamp()
        for cand in organic:
            added = self.boost_of(cand, now_s)
            if added > 0:
                cand.score += added
                cand.features = cand.features.with_values({RERANK_FRESHNESS_BOOST: added})
        return sorted(organic, key=lambda c: c.score, reverse=True) + sponsored
