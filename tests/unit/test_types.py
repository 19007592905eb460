from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime

import pytest

from core.types import (
    EMPTY_FEATURES,
    Candidate,
    FeatureMap,
    FeatureRefError,
    FeatureTypeError,
    FilterResult,
    RequestContext,
    monotonic_deadline,
)


def make_ctx(**overrides: object) -> RequestContext:
    values: dict[str, object] = {
        "request_id": "r1",
        "user_id": "u1",
        "surface": "home",
        "limit": 10,
        "now": datetime(2024, 1, 1, tzinfo=UTC),
        "deadline": monotonic_deadline(1000.0),
    }
    values.update(overrides)
    return RequestContext(**values)  # type: ignore[arg-type]


# --- FeatureMap -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref",
    ["ctr_7d", "item:", ":ctr", "Item:ctr", "item:CTR", "item:ctr-7d", "1item:ctr", "item:_ctr", "a:b:c", ""],
)
def test_feature_map_rejects_malformed_refs(ref: str) -> None:
    with pytest.raises(FeatureRefError):
        FeatureMap({ref: 1.0})


def test_feature_ref_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="view:feature"):
        FeatureMap({"nocolon": 1.0})


def test_feature_map_accepts_valid_refs_and_reads_typed_values() -> None:
    fm = FeatureMap(
        {
            "item:ctr_7d": 0.25,
            "item:views_1d": 12,
            "item:is_new": True,
            "item:category": "music",
            "item:embedding": [0.5, 1, 2.0],
            "item:tags": ["a", "b"],
        }
    )
    assert fm.get_float("item:ctr_7d", 0.0) == 0.25
    assert fm.get_int("item:views_1d", 0) == 12
    assert fm.get_float("item:views_1d", 0.0) == 12.0  # ints widen to floats
    assert fm.get_bool("item:is_new", False) is True
    assert fm.get_str("item:category", "") == "music"
    assert fm.get_vector("item:embedding", ()) == (0.5, 1.0, 2.0)
    assert fm.get_strings("item:tags", ()) == ("a", "b")
    assert len(fm) == 6
    assert "item:ctr_7d" in fm


def test_feature_map_returns_default_for_absent_features() -> None:
    fm = FeatureMap({"item:ctr_7d": None})  # None means absent
    assert "item:ctr_7d" not in fm
    assert fm.get_float("item:ctr_7d", 0.5) == 0.5
    assert fm.get_int("item:views_1d", 7) == 7
    assert fm.get_strings("item:tags", ("x",)) == ("x",)


def test_feature_map_rejects_a_malformed_ref_on_read() -> None:
    # A typo must not read as a missing feature.
    with pytest.raises(FeatureRefError):
        EMPTY_FEATURES.get_float("item.ctr_7d", 0.0)


@pytest.mark.parametrize(
    ("getter", "ref"),
    [
        ("get_float", "item:category"),
        ("get_float", "item:is_new"),  # a flag is not a number
        ("get_int", "item:ctr_7d"),
        ("get_bool", "item:views_1d"),
        ("get_str", "item:views_1d"),
        ("get_vector", "item:tags"),
        ("get_strings", "item:embedding"),
        ("get_vector", "item:category"),
    ],
)
def test_feature_map_getters_refuse_other_types(getter: str, ref: str) -> None:
    fm = FeatureMap(
        {
            "item:ctr_7d": 0.25,
            "item:views_1d": 12,
            "item:is_new": True,
            "item:category": "music",
            "item:embedding": [0.5, 2.0],
            "item:tags": ["a", "b"],
        }
    )
    with pytest.raises(FeatureTypeError, match=ref):
        getattr(fm, getter)(ref, None)


@pytest.mark.parametrize("value", [{"a": 1}, [1.0, "a"], [True, False], object()])
def test_feature_map_rejects_unsupported_values(value: object) -> None:
    with pytest.raises(FeatureTypeError):
        FeatureMap({"item:x": value})  # type: ignore[dict-item, arg-type]


def test_feature_map_is_immutable_and_with_values_copies() -> None:
    base = FeatureMap({"item:ctr_7d": 0.1, "item:views_1d": 3})
    updated = base.with_values({"item:ctr_7d": 0.2, "user:age_days": 40})
    assert base.get_float("item:ctr_7d", 0.0) == 0.1
    assert updated.get_float("item:ctr_7d", 0.0) == 0.2
    assert updated.get_int("item:views_1d", 0) == 3
    assert updated.get_int("user:age_days", 0) == 40
    with pytest.raises(TypeError):
        base["item:ctr_7d"] = 1.0  # type: ignore[index]
    with pytest.raises(FeatureRefError):
        base.with_values({"bad": 1})


def test_feature_map_equality_and_hash() -> None:
    a = FeatureMap({"item:tags": ["x"], "item:ctr_7d": 0.1})
    b = FeatureMap({"item:ctr_7d": 0.1, "item:tags": ("x",)})
    assert a == b
    assert hash(a) == hash(b)
    assert a == {"item:ctr_7d": 0.1, "item:tags": ("x",)}


# --- RequestContext ---------------------------------------------------------------------------


def test_remaining_ms_decreases_and_stops_at_zero() -> None:
    ctx = make_ctx(deadline=100.0)
    assert ctx.remaining_ms(clock=lambda: 99.95) == pytest.approx(50.0)
    assert ctx.remaining_ms(clock=lambda: 99.99) == pytest.approx(10.0)
    assert ctx.remaining_ms(clock=lambda: 101.0) == 0.0


def test_remaining_ms_follows_the_monotonic_clock() -> None:
    ctx = make_ctx(deadline=monotonic_deadline(1000.0))
    first = ctx.remaining_ms()
    time.sleep(0.01)
    second = ctx.remaining_ms()
    assert 0.0 < second < first <= 1000.0


def test_request_context_is_frozen_and_params_read_only() -> None:
    params = {"diversity_weight": 0.3}
    ctx = make_ctx(params=params)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.limit = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        ctx.params["diversity_weight"] = 1.0  # type: ignore[index]
    params["diversity_weight"] = 0.9  # the caller's dict does not reach the context
    assert ctx.params["diversity_weight"] == 0.3


def test_request_context_defaults() -> None:
    ctx = make_ctx()
    assert ctx.user_features == EMPTY_FEATURES
    assert ctx.exclude_seen is True
    assert ctx.personalization is True
    assert dict(ctx.params) == {}
    assert ctx.item_id is None and ctx.experiment_id is None and ctx.arm is None


def test_request_context_rejects_naive_now_and_bad_limit() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        make_ctx(now=datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="limit"):
        make_ctx(limit=0)


# --- Candidate and FilterResult ---------------------------------------------------------------


def test_candidate_merge_unions_sources_and_keeps_max_retrieval_score() -> None:
    first = Candidate(
        item_id="i1",
        sources=["ann"],
        retrieval_score=0.4,
        features=FeatureMap({"item:ctr_7d": 0.1}),
    )
    second = Candidate(
        item_id="i1",
        sources=["popular", "ann"],
        retrieval_score=0.9,
        features=FeatureMap({"item:ctr_7d": 0.5, "item:views_1d": 3}),
        reason="Popular now",
    )
    first.merge(second)
    assert first.sources == ["ann", "popular"]
    assert first.retrieval_score == 0.9
    assert first.features.get_float("item:ctr_7d", 0.0) == 0.1  # the first retrieval's value wins
    assert first.features.get_int("item:views_1d", 0) == 3
    assert first.reason == "Popular now"

    lower = Candidate(item_id="i1", sources=["follows"], retrieval_score=0.1, reason="Followed")
    first.merge(lower)
    assert first.retrieval_score == 0.9
    assert first.sources == ["ann", "popular", "follows"]
    assert first.reason == "Popular now"


def test_candidate_merge_refuses_another_item() -> None:
    with pytest.raises(ValueError, match="i2"):
        Candidate(item_id="i1").merge(Candidate(item_id="i2"))


def test_candidate_defaults_and_copy_independence() -> None:
    cand = Candidate(item_id="i1", sources=["ann"])
    assert (cand.score, cand.retrieval_score, cand.propensity, cand.reason) == (0.0, 0.0, 1.0, None)
    clone = cand.copy()
    clone.sources.append("popular")
    clone.score = 3.0
    assert cand.sources == ["ann"]
    assert cand.score == 0.0
    assert clone == Candidate(item_id="i1", sources=["ann", "popular"], score=3.0)


def test_candidate_copy_carries_every_field() -> None:
    cand = Candidate(
        item_id="i1",
        sources=["ann"],
        retrieval_score=0.3,
        score=0.4,
        features=FeatureMap({"item:category": "c"}),
        reason="r",
        propensity=0.5,
    )
    clone = cand.copy()
    # A field added to Candidate must be added to copy() too.
    assert {f.name: getattr(clone, f.name) for f in dataclasses.fields(Candidate)} == {
        f.name: getattr(cand, f.name) for f in dataclasses.fields(Candidate)
    }
    settable = [f for f in dataclasses.fields(Candidate) if f.name != "item_id"]
    assert all(getattr(cand, f.name) != f.default for f in settable)


def test_filter_result_partition_keeps_order() -> None:
    cands = [Candidate(item_id=f"i{n}") for n in range(5)]
    result = FilterResult.partition(cands, lambda c: c.item_id not in {"i1", "i3"})
    assert [c.item_id for c in result.kept] == ["i0", "i2", "i4"]
    assert [c.item_id for c in result.removed] == ["i1", "i3"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.kept = []  # type: ignore[misc]
