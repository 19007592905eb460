from __future__ import annotations

import numpy as np
import pytest

from core.types import Candidate
from features.candidate_refs import RERANK_EXPLORATION
from policies.creator_cap_policy import CreatorCapPolicy, creator_of
from policies.exploration_policy import ExplorationPolicy
from policies.thompson_sampler import ThompsonSampler
from tests.unit.serving_fixtures import cand, ids, make_ctx
from tests.unit.test_policies_reranking import max_in_any_window


def pool_list(n: int = 80, **kwargs: object) -> list[Candidate]:
    return [cand(f"i{k}", float(n - k), creator=f"c{k % 7}", **kwargs) for k in range(n)]  # type: ignore[arg-type]


def explored(out: list[Candidate]) -> list[Candidate]:
    return [c for c in out if c.features.get_bool(RERANK_EXPLORATION, False)]


def test_exploration_share_is_respected_on_average() -> None:
    limit, requests = 20, 400
    counts = []
    for r in range(requests):
        out = ExplorationPolicy(share=0.1).apply(make_ctx(limit=limit, request_id=f"r{r}"), pool_list())
        counts.append(len(explored(out[:limit])))
    share = sum(counts) / (limit * requests)
    assert share == pytest.approx(0.1, abs=0.02)
    assert min(counts) == 0 and max(counts) >= 3


def test_propensities_are_in_range_and_follow_the_slot_model() -> None:
    limit, share = 20, 0.25
    out = ExplorationPolicy(share=share).apply(make_ctx(limit=limit, request_id="seeded"), pool_list())
    served = out[:limit]
    assert explored(served), "this request id draws at least one exploration slot"
    for c in served:
        assert 0.0 < c.propensity <= 1.0
        if c.features.get_bool(RERANK_EXPLORATION, False):
            assert c.propensity <= share
        else:
            assert c.propensity == pytest.approx(1.0 - share)


def test_exploration_items_come_from_below_the_fold_and_exploitation_keeps_order() -> None:
    limit = 10
    given = pool_list()
    out = ExplorationPolicy(share=0.3, pool_size=20).apply(make_ctx(limit=limit, request_id="x"), given)
    assert sorted(ids(out)) == sorted(ids(given))
    served = out[:limit]
    below = {c.item_id for c in given[limit : limit + 20]}
    assert {c.item_id for c in explored(served)} <= below
    exploit = [c.item_id for c in served if not c.features.get_bool(RERANK_EXPLORATION, False)]
    assert exploit == ids(given)[: len(exploit)]


def test_the_same_request_explores_the_same_way() -> None:
    first = ExplorationPolicy(share=0.3).apply(make_ctx(request_id="same"), pool_list())
    again = ExplorationPolicy(share=0.3).apply(make_ctx(request_id="same"), pool_list())
    assert ids(first) == ids(again)
    assert [c.propensity for c in first] == [c.propensity for c in again]


def test_zero_share_or_no_pool_changes_nothing() -> None:
    given = pool_list(30)
    out = ExplorationPolicy(share=0.0).apply(make_ctx(limit=10), given)
    assert ids(out) == ids(given) and all(c.propensity == 1.0 for c in out)
    short = pool_list(5)
    out = ExplorationPolicy(share=0.5).apply(make_ctx(limit=10), short)
    assert ids(out) == ids(short) and all(c.propensity == 1.0 for c in out)


def test_exploration_keeps_the_creator_cap() -> None:
    capped = CreatorCapPolicy(1, 4).apply(make_ctx(limit=20), pool_list(120))
    for r in range(50):
        ctx = make_ctx(limit=20, request_id=f"cap{r}")
        out = ExplorationPolicy(share=0.3, creator_cap=(1, 4)).apply(ctx, [c.copy() for c in capped])
        assert max_in_any_window([creator_of(c) for c in out[:20]], 4) <= 1


def test_new_and_uncertain_items_are_preferred() -> None:
    proven_dud = {"item_engagement:view_count_7d": 5000, "item_engagement:click_count_7d": 50}
    brand_new = {"item_engagement:view_count_7d": 0, "item_engagement:click_count_7d": 0}
    pool = [cand("dud", 1.0, extra=proven_dud), cand("new", 0.5, extra=brand_new)]
    sampler = ThompsonSampler()
    wins = count_wins(sampler, pool, 300)
    assert wins["new"] > wins["dud"]


def count_wins(sampler: ThompsonSampler, pool: list[Candidate], draws: int) -> dict[str, int]:
    rng = np.random.default_rng(7)
    wins = {c.item_id: 0 for c in pool}
    for _ in range(draws):
        index, _ = sampler.choose(rng, pool)
        wins[pool[index].item_id] += 1
    return wins


def test_monte_carlo_selection_probability_matches_a_symmetric_pool() -> None:
    pool = [cand(f"twin{k}", 1.0) for k in range(4)]
    sampler = ThompsonSampler(mc_samples=2000)
    rng = np.random.default_rng(3)
    estimates = [sampler.choose(rng, pool)[1] for _ in range(20)]
    assert np.mean(estimates) == pytest.approx(0.25, abs=0.03)
    assert all(0.0 < p <= 1.0 for p in estimates)


@pytest.mark.parametrize("share", [-0.1, 1.0])
def test_exploration_share_must_leave_room_for_exploitation(share: float) -> None:
    with pytest.raises(ValueError):
        ExplorationPolicy(share=share)


def test_shared_pool_draws_estimate_each_subset_of_a_symmetric_pool() -> None:
    pool = [cand(f"twin{k}", 1.0) for k in range(6)]
    sampler = ThompsonSampler(mc_samples=2000)
    rng = np.random.default_rng(5)
    draws = sampler.draws(rng, pool)
    for members in ([0, 1, 2, 3, 4, 5], [1, 3, 5], [2, 4]):
        estimates = [draws.choose(rng, members)[1] for _ in range(10)]
        assert np.mean(estimates) == pytest.approx(1 / len(members), abs=0.03)
    index, _ = draws.choose(rng, [4])
    assert index == 0, "a single eligible member always wins"
    with pytest.raises(ValueError):
        draws.choose(rng, [])


def test_shared_pool_draws_prefer_the_uncertain_member_among_the_eligible() -> None:
    proven_dud = {"item_engagement:view_count_7d": 5000, "item_engagement:click_count_7d": 50}
    brand_new = {"item_engagement:view_count_7d": 0, "item_engagement:click_count_7d": 0}
    pool = [
        cand("dud", 1.0, extra=proven_dud),
        cand("other", 1.0, extra=proven_dud),
        cand("new", 0.5, extra=brand_new),
    ]
    rng = np.random.default_rng(11)
    draws = ThompsonSampler().draws(rng, pool)
    picks = [draws.choose(rng, [0, 2])[0] for _ in range(300)]
    assert picks.count(1) > picks.count(0), "position 1 of the members is the new item"
    _, estimate = draws.choose(rng, [0, 1])
    assert 1 / 256 <= estimate <= 1.0
