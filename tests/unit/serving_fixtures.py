"""Builders shared by the serving-stage unit tests: requests and candidates with features."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from core.types import Candidate, FeatureInput, FeatureMap, ParamValue, RequestContext, monotonic_deadline
from features.candidate_refs import (
    ITEM_CATEGORY,
    ITEM_CREATED_AT_S,
    ITEM_CREATOR_ID,
    ITEM_TAGS,
    SERVING_BLOCKED_CREATOR,
    SERVING_BLOCKED_ITEM,
    SERVING_EXCLUDED,
    SERVING_REMOVED,
    SERVING_USER_BLOCKED_CREATOR,
)

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
NOW_S = NOW.timestamp()

CLEAN_FLAGS: dict[str, FeatureInput] = {
    SERVING_REMOVED: False,
    SERVING_BLOCKED_ITEM: False,
    SERVING_BLOCKED_CREATOR: False,
    SERVING_USER_BLOCKED_CREATOR: False,
    SERVING_EXCLUDED: False,
}


def make_ctx(
    *,
    limit: int = 10,
    request_id: str = "req-1",
    user_features: Mapping[str, FeatureInput] | None = None,
    params: Mapping[str, ParamValue] | None = None,
    region: str | None = None,
    language: str | None = None,
    item_id: str | None = None,
    surface: str = "home",
    exclude_seen: bool = True,
    personalization: bool = True,
) -> RequestContext:
    return RequestContext(
        request_id=request_id,
        user_id="u1",
        surface=surface,
        limit=limit,
        now=NOW,
        deadline=monotonic_deadline(10_000),
        region=region,
        language=language,
        item_id=item_id,
        user_features=FeatureMap(user_features or {}),
        exclude_seen=exclude_seen,
        personalization=personalization,
        params=params or {},
    )


def cand(
    item_id: str,
    score: float = 0.0,
    *,
    creator: str | None = None,
    category: str | None = None,
    tags: tuple[str, ...] = (),
    age_h: float | None = None,
    sources: tuple[str, ...] = (),
    retrieval_score: float = 0.0,
    extra: Mapping[str, FeatureInput] | None = None,
) -> Candidate:
    values: dict[str, FeatureInput] = {ITEM_CREATOR_ID: creator, ITEM_CATEGORY: category}
    if tags:
        values[ITEM_TAGS] = tags
    if age_h is not None:
        values[ITEM_CREATED_AT_S] = NOW_S - age_h * 3600.0
    values.update(extra or {})
    return Candidate(
        item_id=item_id,
        score=score,
        retrieval_score=retrieval_score,
        sources=list(sources),
        features=FeatureMap(values),
    )


def ranked(n: int, **kwargs: object) -> list[Candidate]:
    """``n`` candidates ``i0..i{n-1}`` with falling scores."""
    return [cand(f"i{k}", float(n - k), **kwargs) for k in range(n)]  # type: ignore[arg-type]


def ids(cands: list[Candidate]) -> list[str]:
    return [c.item_id for c in cands]
