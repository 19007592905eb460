"""Trending items: global, in the user's region and in the user's categories, in a configured mix."""

from __future__ import annotations

import math
import time
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from core.types import Candidate, RequestContext
from features.online_store import OnlineFeatureStore
from features.trending import TrendingScope
from features.user_context import interest_categories, request_region


class TrendingMix(BaseModel):
    """How a trending source splits its candidates between scopes.

    Shares are relative weights; a scope that does not apply (no region known, no categories for
    a user who opted out) hands its share to the others.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    global_share: Annotated[float, Field(ge=0)] = 0.4
    """Weight of the global list."""

    region_share: Annotated[float, Field(ge=0)] = 0.3
    """Weight of the list of the request's region (or the profile's)."""

    category_share: Annotated[float, Field(ge=0)] = 0.3
    """Weight of the lists of the user's top categories (onboarding interests for a new user)."""

    max_categories: Annotated[int, Field(ge=0, le=20)] = 3
    """How many of the user's categories get a list; the share is split by category affinity."""


_MAX_CACHED_LISTS = 4096
"""Lists kept at most (scopes are regions and categories, a few hundred in practice)."""


class TrendingSource:
    """Trending items from the forward-decayed trending sets of the online store.

    Each scope's list is normalised by its top score, so a quiet region is not drowned by the
    global list, then weighted by the scope's share (and, for categories, by the user's affinity).
    An item in several lists keeps its best score and the reason of the narrowest list.

    Lists are shared by every user of a scope, so each is kept for ``cache_s`` and read again
    after: at tens of requests a second most requests then need no round trip, and a list a
    second old is as trending as a fresh one (the sets decay over hours).

    Args:
        online: The online feature store.
        mix: The split between global, regional and category lists.
        name: Stage id.
        budget_ms: Time the source may take.
        max_candidates: How many candidates at most.
        cache_s: How long a list read from Redis is reused; 0 reads every time.
    """

    def __init__(
        self,
        online: OnlineFeatureStore,
        *,
        mix: TrendingMix | None = None,
        name: str = "trending",
        budget_ms: float = 15.0,
        max_candidates: int = 100,
        cache_s: float = 1.0,
    ) -> None:
        self.name = name
        self.budget_ms = budget_ms
        self.max_candidates = max_candidates
        self.mix = mix or TrendingMix()
        self.cache_s = cache_s
        self._online = online
        self._cache: dict[tuple[TrendingScope, int], tuple[float, list[tuple[str, float]]]] = {}

    async def _lists(
        self, wanted: list[tuple[TrendingScope, int]], now: datetime
    ) -> list[list[tuple[str, float]]]:
        """The rows of each ``(scope, how many)``: from the cache, the others in one round trip."""
        clock = time.monotonic()
        lists: list[list[tuple[str, float]] | None] = []
        for key in wanted:
            cached = self._cache.get(key)
            lists.append(cached[1] if cached is not None and cached[0] > clock else None)
        missing = [n for n, rows in enumerate(lists) if rows is None]
        if missing:
            read = await self._online.atop_trending_many([wanted[n] for n in missing], now)
            if self.cache_s > 0 and len(self._cache) + len(missing) > _MAX_CACHED_LISTS:
                self._cache.clear()
            for n, rows in zip(missing, read, strict=True):
                lists[n] = rows
                if self.cache_s > 0:
                    self._cache[wanted[n]] = (clock + self.cache_s, rows)
        return [rows or [] for rows in lists]

    def plan(self, ctx: RequestContext) -> list[tuple[TrendingScope, int, float, str]]:
        """The lists to read for ``ctx``: ``(scope, how many, weight, reason)`` each."""
        mix = self.mix
        region = request_region(ctx)
        categories = interest_categories(ctx)[: mix.max_categories]
        parts: list[tuple[TrendingScope, float, str]] = [
            (TrendingScope.everywhere(), mix.global_share, "Trending now")
        ]
        if region is not None and mix.region_share > 0:
            parts.append((TrendingScope.region(region), mix.region_share, "Trending in your region"))
        if categories and mix.category_share > 0:
            total = sum(weight for _, weight in categories) or 1.0
            parts += [
                (TrendingScope.category(cat), mix.category_share * weight / total, f"Trending in {cat}")
                for cat, weight in categories
            ]
        share_total = sum(share for _, share, _ in parts)
        if share_total <= 0:
            return []
        top_share = max(share for _, share, _ in parts)
        return [
            (scope, max(1, math.ceil(self.max_candidates * share / share_total)), share / top_share, reason)
            for scope, share, reason in parts
            if share > 0
        ]

    async def fetch(self, ctx: RequestContext) -> list[Candidate]:
        """Read every planned list (those not cached in one round trip) and merge them.

        Args:
            ctx: The request.

        Returns:
            Up to ``max_candidates`` candidates, best first; empty when nothing is trending.
        """
        plan = self.plan(ctx)
        lists = await self._lists([(s, n) for s, n, _, _ in plan], ctx.now)
        best: dict[str, Candidate] = {}
        # The plan runs from the broadest scope to the narrowest, so a later list's reason is the
        # more specific one ("Trending in your region" says more than "Trending now").
        for (_, _, weight, reason), rows in zip(plan, lists, strict=True):
            top = rows[0][1] if rows else 0.0
            if top <= 0:
                continue
            for item_id, score in rows:
                value = weight * score / top
                found = best.get(item_id)
                if found is None:
                    best[item_id] = Candidate(item_id=item_id, retrieval_score=value, reason=reason)
                else:
                    found.retrieval_score = max(found.retrieval_score, value)
                    found.reason = reason
        ranked = sorted(best.values(), key=lambda c: c.retrieval_score, reverse=True)
        return ranked[: self.max_candidates]
