"""A cheap linear pre-score: cuts the candidates to the ranker's input and orders them when it fails."""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from core.types import Candidate, FeatureMap, FeatureValue, RequestContext
from features.candidate_refs import (
    ITEM_CATEGORY,
    ITEM_CREATED_AT_S,
    ITEM_LANGUAGE,
    ITEM_REGION,
    SPONSORED_CAMPAIGN_ID,
)
from features.user_context import interest_categories, request_language, request_region

CTR_REF = "item_engagement:ctr_7d"
QUALITY_REF = "creator_quality:quality_score"
_MEMO_ENTRIES = 50_000
"""Feature maps whose item terms are remembered; the memo starts afresh beyond that."""

_ItemTerms = tuple[float, float, str, float, float, FeatureValue | None, FeatureValue | None, bool]
"""ctr term, popularity term, category, creation time, creator-quality term, region and language
values as stored, sponsored."""

_POPULARITY_REFS = (
    "item_engagement:view_count_7d",
    "item_engagement:click_count_7d",
    "item_engagement:like_count_7d",
    "item_engagement:purchase_count_7d",
    "item_engagement:watch_count_7d",
)


class PreScoreWeights(BaseModel):
    """Weights and scales of the pre-score; every term is scaled to about ``[0, 1]`` first."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    retrieval: float = 1.0
    """Weight of the retrieval score (clipped to ``[0, 1]``)."""

    ctr: float = 1.0
    """Weight of ``item_engagement:ctr_7d / ctr_cap`` (clipped to 1)."""

    ctr_cap: Annotated[float, Field(gt=0, le=1)] = 0.2
    """CTR that earns the full ctr term."""

    popularity: float = 0.5
    """Weight of ``log1p(7-day engagement) / log1p(popularity_cap)`` (clipped to 1)."""

    popularity_cap: Annotated[float, Field(gt=0)] = 10_000.0
    """7-day engagement count that earns the full popularity term."""

    category_affinity: float = 1.0
    """Weight of the user's affinity for the item's category, relative to their strongest one."""

    freshness: float = 0.3
    """Weight of ``2 ** (-age / freshness_half_life_h)``."""

    freshness_half_life_h: Annotated[float, Field(gt=0)] = 72.0
    """Item age, in hours, at which the freshness term halves."""

    creator_quality: float = 0.5
    """Weight of ``creator_quality:quality_score`` (clipped to ``[-1, 1]``)."""

    region_match: float = 0.2
    """Bonus when the item's region is the request's."""

    language_match: float = 0.2
    """Bonus when the item's language is the request's."""

    sponsored_pin: Annotated[float, Field(ge=0)] = 1000.0
    """Added to sponsored candidates so the cut to the ranker input keeps them; they are placed
    by the sponsored-slot policy, never by this score."""


class LightweightPreScorer:
    """Scores candidates with a linear blend of cheap signals; keeps length and order.

    The blend: retrieval score, smoothed CTR, 7-day popularity, the user's affinity for the
    item's category (onboarding interests count fully for a new user), freshness, creator
    quality, and region and language matches. Missing features count as their neutral value
    (0, or the prior for CTR), so a partially hydrated candidate still gets a finite score.

    Args:
        weights: Term weights and scales.
        name: Stage id.
        budget_ms: Time the scorer may take.
    """

    def __init__(
        self,
        weights: PreScoreWeights | None = None,
        *,
        name: str = "lightweight_pre_score",
        budget_ms: float = 10.0,
    ) -> None:
        self.name = name
        self.budget_ms = budget_ms
        self.weights = weights or PreScoreWeights()
        self._log_popularity_cap = math.log1p(self.weights.popularity_cap)
        self._memo: dict[int, tuple[FeatureMap, _ItemTerms]] = {}

    def score_one(
        self,
        cand: Candidate,
        affinity: dict[str, float],
        region: str | None,
        language: str | None,
        now_s: float,
    ) -> float:
        """The pre-score of one candidate (see the class docstring for the terms)."""
        w = self.weights
        f = cand.features
        ctr_term, popularity_term, category, created, quality_term, item_region, item_language, sponsored = (
            self._item_terms(f)
        )
        # The terms are added in the documented order whether they were remembered or not, so
        # the sum is the same to the last bit.
        score = w.retrieval * min(max(cand.retrieval_score, 0.0), 1.0)
        score += ctr_term
        score += popularity_term
        score += w.category_affinity * affinity.get(category, 0.0)
        if not math.isnan(created):
            age_h = max(0.0, now_s - created) / 3600.0
            score += w.freshness * math.exp2(-age_h / w.freshness_half_life_h)
        score += quality_term
        if region is not None:
            if type(item_region) is not str:
                item_region = f.get_str(ITEM_REGION, "")
            if item_region == region:
                score += w.region_match
        if language is not None:
            if type(item_language) is not str:
                item_language = f.get_str(ITEM_LANGUAGE, "")
            if item_language == language:
                score += w.language_match
        if sponsored:
            score += w.sponsored_pin
        return score

    def _item_terms(self, f: FeatureMap) -> _ItemTerms:
        """What of the pre-score depends on the candidate's features alone, remembered per map.

        Hydration hands an unchanged item the very same feature map on every request, so most
        candidates' terms are looked up instead of computed.
        """
        memo = self._memo.get(id(f))
        # The map is held by the memo, so its id cannot be another map's while it is there.
        if memo is not None and memo[0] is f:
            return memo[1]
        w = self.weights
        # Values are read raw; the typed getters (which raise on a wrong type) are only called
        # when a value is not of the usual type.
        get = f.get
        ctr = get(CTR_REF)
        if type(ctr) is not float:
            ctr = f.get_float(CTR_REF, 0.0)
        engagement = 0
        for ref in _POPULARITY_REFS:
            count = get(ref)
            if type(count) is not int:
                count = f.get_int(ref, 0)
            if count > 0:
                engagement += count
        category = get(ITEM_CATEGORY)
        if type(category) is not str:
            category = f.get_str(ITEM_CATEGORY, "")
        created = get(ITEM_CREATED_AT_S)
        if type(created) is not float:
            created = f.get_float(ITEM_CREATED_AT_S, math.nan)
        quality = get(QUALITY_REF)
        if type(quality) is not float:
            quality = f.get_float(QUALITY_REF, 0.0)
        terms: _ItemTerms = (
            w.ctr * min(max(ctr, 0.0) / w.ctr_cap, 1.0),
            w.popularity * min(math.log1p(engagement) / self._log_popularity_cap, 1.0),
            category,
            created,
            w.creator_quality * min(max(quality, -1.0), 1.0),
            # Region and language are checked (and may raise) only when the request has one.
            get(ITEM_REGION, ""),
            get(ITEM_LANGUAGE, ""),
            SPONSORED_CAMPAIGN_ID in f,
        )
        if len(self._memo) >= _MEMO_ENTRIES:
            self._memo.clear()
        self._memo[id(f)] = (f, terms)
        return terms

    async def score(self, ctx: RequestContext, cands: list[Candidate]) -> list[Candidate]:
        """Set ``score`` on every candidate.

        Args:
            ctx: The request.
            cands: Candidates (the runner passes copies).

        Returns:
            ``cands`` with finite scores, same length and order.
        """
        categories = interest_categories(ctx)
        top = max((weight for _, weight in categories), default=0.0)
        affinity = {c: weight / top for c, weight in categories} if top > 0 else {}
        region, language = request_region(ctx), request_language(ctx)
        now_s = ctx.now.timestamp()
        for cand in cands:
            cand.score = self.score_one(cand, affinity, region, language, now_s)
        return cands
