"""Sources that need no Redis: item-item, similar items, sponsored, popular and two-tower ANN."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import numpy as np
import pytest
from numpy.typing import NDArray

from core.stages import CandidateSource
from core.types import Candidate, FeatureInput, RequestContext
from features.candidate_refs import RETRIEVAL_SEED_ITEM_ID, SPONSORED_BID, SPONSORED_CAMPAIGN_ID
from features.trending import TrendingScope
from retrieval.sources.item_neighbors import InMemoryItemNeighbors, ItemNeighbors
from retrieval.sources.item_to_item_source import ItemToItemSource
from retrieval.sources.popular_fallback_source import PopularFallbackSource
from retrieval.sources.similar_items_source import SimilarItemsSource
from retrieval.sources.sponsored_source import SponsoredCampaign, SponsoredConfig, SponsoredSource
from retrieval.sources.trending_source import TrendingSource
from retrieval.sources.two_tower_ann_source import IndexEmbeddingRetriever, TwoTowerAnnSource
from tests.unit.serving_fixtures import NOW_S, ids, make_ctx

TABLE = InMemoryItemNeighbors(
    {
        "seen1": [("n1", 0.9), ("n2", 0.5), ("seen2", 0.8), ("seen1", 1.0)],
        "seen2": [("n2", 0.9), ("n3", 0.4)],
        "hidden": [("n9", 1.0)],
    }
)

HISTORY: dict[str, FeatureInput] = {
    "user_activity:recent_item_ids": ["seen2", "hidden", "seen1"],
    "user_activity:recent_event_types": ["like", "not_interested", "view"],
    "user_activity:recent_event_ts": [NOW_S - 60, NOW_S - 120, NOW_S - 180],
}


def fetch(source: CandidateSource, ctx: RequestContext) -> list[Candidate]:
    assert isinstance(source, CandidateSource)
    return asyncio.run(source.fetch(ctx))


def test_in_memory_neighbors_drop_self_and_repeats() -> None:
    assert isinstance(TABLE, ItemNeighbors)
    assert TABLE.neighbors("seen1", 10) == [("n1", 0.9), ("seen2", 0.8), ("n2", 0.5)]
    assert TABLE.neighbors("unknown", 5) == []


def test_trained_similarity_table_fits_the_interface() -> None:
    item_similarity = pytest.importorskip("retrieval.item_similarity")
    vectors = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], dtype=np.float32)
    table = item_similarity.ItemSimilarityTable.from_embeddings(vectors, ["a", "b", "c"], k=2)
    assert isinstance(table, ItemNeighbors)
    assert table.neighbors("a", 1)[0][0] == "b"


def test_item_to_item_sums_seeds_and_skips_history_and_negative_seeds() -> None:
    out = fetch(ItemToItemSource(TABLE), make_ctx(user_features=HISTORY))
    # seen2 (a like) weighs 2.5, seen1 (an older view) 0.5 * 0.9: n2 neighbours both.
    assert ids(out) == ["n2", "n3", "n1"]
    assert out[0].retrieval_score == 1.0
    assert all(0 < c.retrieval_score <= 1 for c in out)
    assert out[0].features.get_str(RETRIEVAL_SEED_ITEM_ID, "") == "seen2"
    assert all(c.reason for c in out)


def test_history_sources_are_silent_without_history_or_consent() -> None:
    source = ItemToItemSource(TABLE)
    assert fetch(source, make_ctx()) == []
    assert fetch(source, make_ctx(user_features=HISTORY, personalization=False)) == []


def test_similar_items_uses_the_page_item() -> None:
    source = SimilarItemsSource(TABLE, max_candidates=2)
    out = fetch(source, make_ctx(item_id="seen1", surface="similar"))
    assert ids(out) == ["n1", "seen2"]
    assert out[0].features.get_str(RETRIEVAL_SEED_ITEM_ID, "") == "seen1"
    assert fetch(source, make_ctx()) == []


def test_sponsored_targeting_and_marks() -> None:
    config = SponsoredConfig(
        campaigns=(
            SponsoredCampaign(
                campaign_id="cook", item_ids=("pan", "pot"), bid=2.0, categories=frozenset({"cooking"})
            ),
            SponsoredCampaign(campaign_id="eu", item_ids=("car",), bid=3.0, regions=frozenset({"eu"})),
            SponsoredCampaign(campaign_id="all", item_ids=("pan", "soda"), bid=1.0),
            SponsoredCampaign(campaign_id="paused", item_ids=("x",), bid=9.0, active=False),
            SponsoredCampaign(
                campaign_id="video", item_ids=("clip",), bid=5.0, surfaces=frozenset({"video"})
            ),
        )
    )
    source = SponsoredSource(config)
    cook_eu = make_ctx(region="eu", params={"interests": "cooking"})
    out = fetch(source, cook_eu)
    assert ids(out) == ["car", "pan", "pot", "soda"]
    assert out[1].features.get_str(SPONSORED_CAMPAIGN_ID, "") == "cook"
    assert out[1].features.get_float(SPONSORED_BID, 0.0) == 2.0
    assert all(c.reason == "Sponsored" for c in out)
    # Category targeting is personal: a user who opted out only gets untargeted campaigns.
    assert ids(
        fetch(source, make_ctx(region="us", params={"interests": "cooking"}, personalization=False))
    ) == [
        "pan",
        "soda",
    ]


def test_sponsored_config_is_strict() -> None:
    with pytest.raises(ValueError):
        SponsoredCampaign.model_validate({"campaign_id": "c", "item_ids": ["a"], "bid": 1.0, "budget": 5})
    with pytest.raises(ValueError):
        SponsoredCampaign(campaign_id="c", item_ids=(), bid=1.0)


def test_popular_fallback_scales_below_live_sources_and_can_be_replaced() -> None:
    source = PopularFallbackSource([("a", 10.0), ("b", 30.0), ("a", 20.0), ("z", 0.0)], max_candidates=5)
    out = fetch(source, make_ctx())
    assert ids(out) == ["b", "a"]
    assert out[0].retrieval_score == pytest.approx(0.1)
    source.replace([("c", 1.0)])
    assert ids(fetch(source, make_ctx())) == ["c"]


class TinyIndex:
    """An exact inner-product index over a small matrix (the shape of the retrieval indexes)."""

    def __init__(self, ids: Sequence[str], vectors: NDArray[np.float32]) -> None:
        self._ids = list(ids)
        self._vectors = vectors

    @property
    def ids(self) -> Sequence[str]:
        return self._ids

    def search(self, queries: NDArray[np.floating], k: int) -> tuple[NDArray[np.int64], NDArray[np.floating]]:
        scores = np.asarray(queries, dtype=np.float32) @ self._vectors.T
        order = np.argsort(-scores, axis=1)[:, :k]
        positions = np.full((scores.shape[0], k), -1, dtype=np.int64)
        top = np.full((scores.shape[0], k), -np.inf, dtype=np.float32)
        positions[:, : order.shape[1]] = order
        top[:, : order.shape[1]] = np.take_along_axis(scores, order, axis=1)
        return positions, top


def test_two_tower_source_searches_the_user_embedding() -> None:
    vectors = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]], dtype=np.float32)
    index = TinyIndex(["seen2", "near", "far", "opposite"], vectors)
    asked: list[str] = []

    async def embed(ctx: RequestContext) -> NDArray[np.float32] | None:
        asked.append(ctx.user_id)
        items = ctx.user_features.get_strings("user_activity:recent_item_ids", ())
        return np.array([1.0, 0.0], dtype=np.float32) if items else None

    source = TwoTowerAnnSource(embed, IndexEmbeddingRetriever(index), max_candidates=3)
    out = fetch(source, make_ctx(user_features=HISTORY))
    assert ids(out) == ["near", "far", "opposite"]
    assert out[0].retrieval_score == pytest.approx(1.0)
    assert all(c.retrieval_score >= 0 for c in out)
    assert fetch(source, make_ctx()) == []
    assert fetch(source, make_ctx(user_features=HISTORY, personalization=False)) == []
    assert asked == ["u1", "u1"]


def test_index_retriever_drops_unfilled_slots() -> None:
    index = TinyIndex(["a"], np.array([[1.0, 0.0]], dtype=np.float32))
    assert IndexEmbeddingRetriever(index).retrieve(np.array([1.0, 0.0], dtype=np.float32), 3) == [("a", 1.0)]


class CountingTrending:
    """Answers every trending read with the same lists and counts the round trips and the lists."""

    def __init__(self) -> None:
        self.reads = 0
        self.lists = 0

    async def atop_trending_many(
        self, wanted: list[tuple[TrendingScope, int]], now: object
    ) -> list[list[tuple[str, float]]]:
        self.reads += 1
        self.lists += len(wanted)
        return [[(f"{scope.kind}-{k}", float(limit - k)) for k in range(limit)] for scope, limit in wanted]


def test_trending_lists_are_reused_for_cache_s_then_read_again() -> None:
    online = CountingTrending()
    source = TrendingSource(online, cache_s=0.2)  # type: ignore[arg-type]
    first = fetch(source, make_ctx(region="de"))
    reads = online.reads
    # Every list the request plans, in one round trip.
    assert reads == 1 and online.lists == len(source.plan(make_ctx(region="de"))) > 1 and first
    assert ids(fetch(source, make_ctx(region="de"))) == ids(first)
    assert online.reads == reads
    time.sleep(0.25)
    fetch(source, make_ctx(region="de"))
    assert online.reads == 2 * reads
    uncached = TrendingSource(online, cache_s=0)  # type: ignore[arg-type]
    fetch(uncached, make_ctx(region="de"))
    fetch(uncached, make_ctx(region="de"))
    assert online.reads == 4 * reads
