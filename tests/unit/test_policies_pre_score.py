from __future__ import annotations

import asyncio
import math

from core.stages import Scorer
from core.types import Candidate, FeatureInput
from features.candidate_refs import ITEM_LANGUAGE, ITEM_REGION, SPONSORED_CAMPAIGN_ID
from policies.lightweight_pre_scorer import LightweightPreScorer, PreScoreWeights
from tests.unit.serving_fixtures import cand, ids, make_ctx

HISTORY = {
    "user_activity:top_categories": ["cooking", "cars"],
    "user_activity:top_category_affinities": [4.0, 1.0],
}


def scored(cands: list[Candidate], **ctx_kwargs: object) -> list[Candidate]:
    return asyncio.run(LightweightPreScorer().score(make_ctx(**ctx_kwargs), cands))  # type: ignore[arg-type]


def test_pre_scorer_keeps_length_and_order_with_finite_scores() -> None:
    assert isinstance(LightweightPreScorer(), Scorer)
    given = [cand(f"i{k}", retrieval_score=k / 10, category="cars", age_h=k) for k in range(10)] + [
        Candidate(item_id="bare")
    ]
    out = scored([c.copy() for c in given], user_features=HISTORY)
    assert ids(out) == ids(given)
    assert all(math.isfinite(c.score) for c in out)


def test_each_signal_raises_the_score() -> None:
    base = cand("base", retrieval_score=0.5, category="other", age_h=1000)
    better = {
        "ctr": cand(
            "ctr", retrieval_score=0.5, category="other", age_h=1000, extra={"item_engagement:ctr_7d": 0.15}
        ),
        "popular": cand(
            "popular",
            retrieval_score=0.5,
            category="other",
            age_h=1000,
            extra={"item_engagement:view_count_7d": 900},
        ),
        "affinity": cand("affinity", retrieval_score=0.5, category="cooking", age_h=1000),
        "fresh": cand("fresh", retrieval_score=0.5, category="other", age_h=1),
        "quality": cand(
            "quality",
            retrieval_score=0.5,
            category="other",
            age_h=1000,
            extra={"creator_quality:quality_score": 0.6},
        ),
        "local": cand(
            "local",
            retrieval_score=0.5,
            category="other",
            age_h=1000,
            extra={ITEM_REGION: "eu", ITEM_LANGUAGE: "fr"},
        ),
    }
    out = scored([base, *better.values()], user_features=HISTORY, region="eu", language="fr")
    for c in out[1:]:
        assert c.score > out[0].score, c.item_id


def test_cold_start_interests_count_as_affinity() -> None:
    out = scored([cand("jazz", category="jazz"), cand("rock", category="rock")], params={"interests": "jazz"})
    assert out[0].score > out[1].score


def test_sponsored_candidates_are_pinned_above_the_cut() -> None:
    out = scored([cand("organic", retrieval_score=1.0), cand("ad", extra={SPONSORED_CAMPAIGN_ID: "c"})])
    assert out[1].score > out[0].score + 100


def test_weights_are_strict_config() -> None:
    assert PreScoreWeights.model_config.get("extra") == "forbid"


def test_a_scorer_that_saw_a_feature_map_before_scores_it_as_a_fresh_one_does() -> None:
    shared = LightweightPreScorer()
    given = [
        cand(f"i{k}", retrieval_score=k / 10, category=("cooking", "cars", "other")[k % 3], age_h=5 * k)
        for k in range(12)
    ]
    first = asyncio.run(shared.score(make_ctx(user_features=HISTORY), [c.copy() for c in given]))  # type: ignore[arg-type]
    # Same maps, another request: other affinities, another region; the request's terms must follow.
    other_affinities: dict[str, FeatureInput] = {
        "user_activity:top_categories": ["cooking", "cars"],
        "user_activity:top_category_affinities": [1.0, 4.0],
    }
    ctx = make_ctx(region="eu", user_features=other_affinities)
    again = asyncio.run(shared.score(ctx, [c.copy() for c in given]))
    fresh = asyncio.run(LightweightPreScorer().score(ctx, [c.copy() for c in given]))
    assert [c.score for c in again] == [c.score for c in fresh]
    assert [c.score for c in again] != [c.score for c in first]
    # A candidate whose map changed is scored from the new map.
    changed = [c.copy() for c in given]
    changed[0].features = changed[0].features.with_values({"item_engagement:ctr_7d": 0.2})
    rescored = asyncio.run(shared.score(ctx, changed))
    assert rescored[0].score > again[0].score
    assert [c.score for c in rescored[1:]] == [c.score for c in again[1:]]
