from __future__ import annotations

import functools
import random
from collections import Counter

import pytest

from core.stages import Policy
from core.types import Candidate
from features.candidate_refs import ITEM_EMBEDDING, ITEM_TITLE, RERANK_FRESHNESS_BOOST, SPONSORED_CAMPAIGN_ID
from policies.category_spread_policy import CategorySpreadPolicy
from policies.creator_cap_policy import CreatorCapPolicy, creator_of
from policies.dedupe_policy import DedupePolicy
from policies.freshness_boost_policy import FreshnessBoostPolicy
from policies.mmr_diversity_policy import MmrDiversityPolicy, _Similarity, intra_list_similarity
from policies.window_cap import fits_at, window_capped
from tests.unit.serving_fixtures import cand, ids, make_ctx


def max_in_any_window(keys: list[str | None], window: int) -> int:
    worst = 0
    for start in range(max(1, len(keys) - window + 1)):
        counts = Counter(k for k in keys[start : start + window] if k is not None)
        worst = max(worst, max(counts.values(), default=0))
    return worst


# --- dedupe -----------------------------------------------------------------------------------


def test_dedupe_keeps_the_first_of_each_item_and_of_each_reupload() -> None:
    given = [
        cand("a", 5, creator="c1", extra={ITEM_TITLE: "Cooking  Pasta"}),
        cand("b", 4, creator="c2"),
        cand("a", 3, creator="c1"),
        cand("a2", 2, creator="c1", extra={ITEM_TITLE: "cooking pasta"}),
        cand("a3", 1, creator="c9", extra={ITEM_TITLE: "cooking pasta"}),
    ]
    out = DedupePolicy().apply(make_ctx(), given)
    assert ids(out) == ["a", "b", "a3"]
    assert ids(DedupePolicy(by_title=False).apply(make_ctx(), given)) == ["a", "b", "a2", "a3"]


# --- window caps ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_creator_cap_holds_in_every_window(seed: int) -> None:
    rng = random.Random(seed)
    max_per_window, window = rng.randint(1, 3), rng.randint(2, 7)
    creators = [f"c{rng.randint(0, 5)}" for _ in range(80)]
    given = [cand(f"i{k}", 100.0 - k, creator=c) for k, c in enumerate(creators)]
    out = CreatorCapPolicy(max_per_window, window).apply(make_ctx(), given)
    assert max_in_any_window([creator_of(c) for c in out], window) <= max_per_window
    assert len(set(ids(out))) == len(out)
    assert set(ids(out)) <= set(ids(given))


def test_creator_cap_changes_the_order_only_where_it_must() -> None:
    given = [
        cand("a1", 9, creator="a"),
        cand("a2", 8, creator="a"),
        cand("a3", 7, creator="a"),
        cand("b1", 6, creator="b"),
    ]
    out = CreatorCapPolicy(max_per_window=2, window=3).apply(make_ctx(), given)
    assert ids(out) == ["a1", "a2", "b1", "a3"]
    untouched = [cand(f"i{k}", 10 - k, creator=f"c{k}") for k in range(6)]
    assert ids(CreatorCapPolicy(1, 5).apply(make_ctx(), untouched)) == ids(untouched)


def test_creator_cap_drops_what_cannot_be_placed() -> None:
    given = [cand(f"a{k}", 10 - k, creator="a") for k in range(5)]
    out = CreatorCapPolicy(max_per_window=2, window=5).apply(make_ctx(), given)
    assert ids(out) == ["a0", "a1"]


def test_candidates_without_creator_count_as_distinct() -> None:
    given = [cand(f"i{k}", 10 - k) for k in range(5)]
    assert ids(CreatorCapPolicy(1, 5).apply(make_ctx(), given)) == ids(given)


def test_category_spread_is_soft() -> None:
    given = [cand(f"x{k}", 10 - k, category="x") for k in range(4)] + [cand("y0", 1, category="y")]
    out = CategorySpreadPolicy(max_per_window=2, window=3).apply(make_ctx(), given)
    assert sorted(ids(out)) == sorted(ids(given))
    assert ids(out)[:4] == ["x0", "x1", "y0", "x2"]


def test_fits_at_checks_every_window_around_the_insertion() -> None:
    keys: list[str | None] = ["a", "b", "a", "c", "d"]
    assert not fits_at(keys, 1, "a", 1, 3)
    assert not fits_at(keys, 4, "a", 1, 3)
    assert fits_at(keys, 5, "a", 1, 3)
    assert fits_at(keys, 1, "a", 2, 3)
    assert fits_at(keys, 1, None, 1, 3)


def test_window_capped_rejects_nonsense_parameters() -> None:
    with pytest.raises(ValueError):
        window_capped([], creator_of, 0, 3)


# --- freshness --------------------------------------------------------------------------------


def test_freshness_boost_decays_and_resorts() -> None:
    policy = FreshnessBoostPolicy(boost=1.0, half_life_h=12, max_age_h=48)
    given = [
        cand("old", 1.0, age_h=100),
        cand("day", 0.9, age_h=24),
        cand("new", 0.5, age_h=0),
        cand("unknown", 0.8),
    ]
    out = policy.apply(make_ctx(), given)
    assert ids(out) == ["new", "day", "old", "unknown"]
    boosts = {c.item_id: c.features.get_float(RERANK_FRESHNESS_BOOST, 0.0) for c in out}
    assert boosts["new"] == pytest.approx(1.0)
    assert boosts["day"] == pytest.approx(0.25)
    assert boosts["old"] == 0.0 and boosts["unknown"] == 0.0


def test_organic_policies_leave_sponsored_candidates_at_the_end() -> None:
    ad = cand("ad", 99.0, creator="a", category="x", extra={SPONSORED_CAMPAIGN_ID: "camp"})
    given = [ad, *[cand(f"i{k}", 10 - k, creator="a", category="x", age_h=1) for k in range(4)]]
    policies: list[Policy] = [
        FreshnessBoostPolicy(),
        MmrDiversityPolicy(pool_size=3),
        CreatorCapPolicy(1, 3),
        CategorySpreadPolicy(1, 3),
    ]
    for policy in policies:
        out = policy.apply(make_ctx(limit=3), [c.copy() for c in given])
        assert out[-1].item_id == "ad", policy.name


# --- MMR --------------------------------------------------------------------------------------


def clustered(n: int) -> list[Candidate]:
    # Relevance interleaves poorly: the top of the ranking is all one category.
    cats = ["a"] * (n // 2) + ["b"] * (n // 4) + ["c"] * (n - n // 2 - n // 4)
    return [cand(f"i{k}", float(n - k), category=c, tags=(f"t{c}",)) for k, c in enumerate(cats)]


def test_mmr_increases_intra_list_diversity() -> None:
    given = clustered(24)
    ctx = make_ctx(limit=8)
    out = MmrDiversityPolicy(diversity_lambda=0.5, pool_size=24).apply(ctx, [c.copy() for c in given])
    assert sorted(ids(out)) == sorted(ids(given))
    assert intra_list_similarity(out[:8]) < intra_list_similarity(given[:8])
    assert out[0].item_id == "i0"


def test_mmr_uses_embeddings_when_candidates_carry_them() -> None:
    # Same category everywhere; only the embeddings tell the items apart.
    vectors = {"p0": (1.0, 0.0), "p1": (0.99, 0.01), "p2": (0.0, 1.0), "p3": (0.98, 0.02)}
    given = [
        cand(k, 4.0 - n * 0.1, category="same", extra={ITEM_EMBEDDING: v})
        for n, (k, v) in enumerate(vectors.items())
    ]
    out = MmrDiversityPolicy(diversity_lambda=0.5, pool_size=4).apply(make_ctx(limit=2), given)
    assert ids(out)[:2] == ["p0", "p2"]


def test_mmr_with_lambda_one_keeps_the_ranking() -> None:
    given = clustered(12)
    assert ids(MmrDiversityPolicy(diversity_lambda=1.0).apply(make_ctx(), given)) == ids(given)


@pytest.mark.parametrize("kwargs", [{"diversity_lambda": 1.5}, {"pool_size": 0}])
def test_mmr_rejects_invalid_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        MmrDiversityPolicy(**kwargs)  # type: ignore[arg-type]


def test_mmr_similarity_matrix_agrees_with_the_pairwise_similarity() -> None:
    # Embeddings of two sizes and none at all: every pair takes the measure the pairwise rule says.
    rng = random.Random(3)
    given = []
    for k in range(30):
        extra = {}
        if k % 3 == 0:
            extra = {ITEM_EMBEDDING: tuple(rng.uniform(-1, 1) for _ in range(4))}
        elif k % 3 == 1 and k % 2 == 0:
            extra = {ITEM_EMBEDDING: tuple(rng.uniform(-1, 1) for _ in range(3))}
        tags = tuple(f"t{rng.randrange(4)}" for _ in range(rng.randrange(3)))
        given.append(cand(f"i{k}", float(k), category=rng.choice(["a", "b", ""]), tags=tags, extra=extra))
    sim = _Similarity(given)
    matrix = sim.matrix()
    for i in range(len(given)):
        for j in range(len(given)):
            if i != j:
                assert matrix[i, j] == pytest.approx(sim(i, j), abs=1e-12), (i, j)


def _capped_by_definition(
    cands: list[Candidate], keys: dict[str, str | None], max_per_window: int, window: int
) -> tuple[list[str], list[str]]:
    """window_capped's rule taken literally: at each position the best remaining candidate that fits."""
    remaining = [c.item_id for c in cands]
    placed: list[str] = []
    while remaining:
        last = placed[max(0, len(placed) - (window - 1)) :] if window > 1 else []
        recent = [keys[i] or f"\0{i}" for i in last]
        fitting = [i for i in remaining if recent.count(keys[i] or f"\0{i}") < max_per_window]
        if not fitting:
            break
        placed.append(fitting[0])
        remaining.remove(fitting[0])
    return placed, remaining


def _key_in(keys: dict[str, str | None], cand: Candidate) -> str | None:
    return keys[cand.item_id]


def test_window_capped_places_the_best_candidate_that_fits_at_every_position() -> None:
    rng = random.Random(11)
    for _ in range(500):
        n, n_keys = rng.randrange(0, 30), rng.randrange(1, 6)
        given = [cand(f"i{k}", float(-k)) for k in range(n)]
        keys = {c.item_id: None if rng.random() < 0.1 else f"k{rng.randrange(n_keys)}" for c in given}
        max_per_window, window = rng.randrange(1, 4), rng.randrange(1, 7)
        placed, left = window_capped(given, functools.partial(_key_in, keys), max_per_window, window)
        assert (ids(placed), ids(left)) == _capped_by_definition(given, keys, max_per_window, window)
