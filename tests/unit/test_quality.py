"""The quality window and the read path's serving metrics, computed from what was served."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry

from deployments.recommender.metrics import ServingMetrics
from features.quality import QualityWindow, intra_list_diversity


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Item:
    item_id: str


@dataclass(frozen=True)
class Answer:
    surface: str
    fallback: str | None
    items: list[Item]


@dataclass(frozen=True)
class Versions:
    retrieval_version: str | None
    ranker_version: str | None


@dataclass(frozen=True)
class Entry:
    category: str


@dataclass
class Cache:
    hits: int = 0
    misses: int = 0


def test_intra_list_diversity_counts_pairs_in_different_categories() -> None:
    assert intra_list_diversity(["a", "a", "a"]) == 0.0
    assert intra_list_diversity(["a", "b", "c"]) == 1.0
    # a a b: pairs (a,a) same, (a,b) twice different -> 2 of 3
    assert intra_list_diversity(["a", "a", "b", None]) == pytest.approx(2 / 3)
    assert intra_list_diversity(["a", None]) is None


def test_window_ratios_and_expiry() -> None:
    clock = Clock()
    window = QualityWindow(window_s=60, bucket_s=10, clock=clock)
    window.set_catalogue_size(10)
    window.record_list(["i1", "i2", "i3", "i4"], ["a", "a", "b", "b"])
    window.record_events(["click", "view", "hide", "report", "like"])
    clock.now += 30
    window.record_list(["i1", "i5"], ["a", "c"])
    window.record_events(["click", "not_interested"])
    q = window.snapshot()
    assert (q.impressions, q.lists, q.clicks, q.negatives) == (6, 2, 2, 3)
    assert q.ctr == pytest.approx(2 / 6)
    assert q.negative_rate == pytest.approx(3 / 6)
    assert q.coverage == pytest.approx(5 / 10)
    assert q.diversity == pytest.approx((4 / 6 + 1.0) / 2)

    clock.now += 45  # the first bucket leaves the window
    q = window.snapshot()
    assert (q.impressions, q.clicks, q.negatives) == (2, 1, 1)
    assert q.coverage == pytest.approx(2 / 10)
    clock.now += 120
    empty = window.snapshot()
    assert (empty.impressions, empty.ctr, empty.coverage, empty.diversity) == (0, 0.0, 0.0, 0.0)


def test_window_refuses_a_bucket_longer_than_the_window() -> None:
    with pytest.raises(ValueError, match="bucket_s"):
        QualityWindow(window_s=5, bucket_s=10)


def test_served_records_impressions_quality_versions_and_caches() -> None:
    registry = CollectorRegistry()
    metrics = ServingMetrics(registry)
    catalogue = {"i1": Entry("a"), "i2": Entry("b"), "i3": Entry("b"), "i4": Entry("c")}
    cache = Cache(hits=3, misses=2)
    answer = Answer("home", None, [Item("i1"), Item("i2"), Item("i3")])
    metrics.served(answer, Versions("v1", "v1"), catalogue, cache)
    metrics.quality.record_events(["click"])
    cache.hits, cache.misses = 10, 2
    metrics.served(Answer("home", "cached_list", [Item("i4")]), Versions(None, None), catalogue, cache)
    metrics.served(Answer("home", "popular", []), Versions("v2", None), catalogue, cache)

    def get(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert get("rayrec_impressions_total", surface="home") == 4
    assert get("rayrec_cache_lookups_total", cache="catalog", outcome="hit") == 10
    assert get("rayrec_cache_lookups_total", cache="catalog", outcome="miss") == 2
    assert get("rayrec_cache_lookups_total", cache="last_list", outcome="hit") == 1
    assert get("rayrec_cache_lookups_total", cache="last_list", outcome="miss") == 1
    assert get("rayrec_model_version_info", deployment="retrieval", model_version="v1") == 0
    assert get("rayrec_model_version_info", deployment="retrieval", model_version="v2") == 1
    assert get("rayrec_model_version_info", deployment="ranker", model_version="v1") == 1
    assert get("rayrec_quality_ctr") == pytest.approx(1 / 4)
    assert get("rayrec_quality_coverage") == pytest.approx(1.0)
    # i1 i2 i3 = a b b: 2 of 3 pairs differ; the one-item and empty lists are not measured
    assert get("rayrec_quality_intra_list_diversity") == pytest.approx(2 / 3)
    assert get("rayrec_quality_window_impressions") == 4


def test_candidates_per_source_are_observed_unless_the_source_was_skipped() -> None:
    registry = CollectorRegistry()
    observer = ServingMetrics(registry).observer("home")
    observer.on_source("trending", 3.0, 40, None)
    observer.on_source("social", 30.0, 0, "timeout")
    assert registry.get_sample_value("rayrec_candidate_source_candidates_count", {"source": "trending"}) == 1
    assert registry.get_sample_value("rayrec_candidate_source_candidates_sum", {"source": "trending"}) == 40
    assert registry.get_sample_value("rayrec_candidate_source_candidates_count", {"source": "social"}) is None
    assert (
        registry.get_sample_value(
            "rayrec_candidate_source_skipped_total", {"source": "social", "reason": "timeout"}
        )
        == 1
    )
