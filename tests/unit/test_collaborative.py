"""EASE over catalog rows, candidate generation, the listwise loss and the paired bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.candidates import merge_candidates
from training.collaborative import CollaborativeModel, candidate_features, fit_ease, ranks_of, top_items
from training.evaluation import EASE
from training.evaluation.bootstrap import paired_bootstrap
from training.evaluation.splits import Interactions
from training.listwise import _choose, recent_histories
from training.ranker import softmax_list_loss


def _interactions(rng: np.random.Generator, n_users: int = 60, n_items: int = 40) -> Interactions:
    users, items = rng.integers(0, n_users, 600), rng.integers(0, n_items, 600)
    pairs = {(int(u), int(i)) for u, i in zip(users, items, strict=True)}
    users, items = (np.asarray(v, dtype=np.int64) for v in zip(*sorted(pairs), strict=True))
    return Interactions(
        user_index=users,
        item_index=items,
        ts_us=np.arange(len(users), dtype=np.int64),
        user_ids=np.asarray([f"u{u}" for u in range(n_users)], dtype=np.str_),
        item_ids=np.asarray([f"i{i:02d}" for i in range(n_items)], dtype=np.str_),
    )


def test_fit_ease_matches_the_baseline_and_scores_like_it() -> None:
    train = _interactions(np.random.default_rng(0))
    baseline = EASE(l2=50.0).fit(train)
    model = CollaborativeModel.fit(train.user_index, train.item_index, train.n_items, 50.0)
    np.testing.assert_allclose(model.weights, baseline.weights, atol=1e-5)
    users = np.arange(5, dtype=np.int64)
    histories = [train.item_index[train.user_index == u] for u in users]
    scores = model.scores(histories)
    expected = baseline.score(users)
    for u, history in enumerate(histories):
        assert np.isneginf(scores[u, history]).all()
        rest = np.setdiff1d(np.arange(train.n_items), history)
        np.testing.assert_allclose(scores[u, rest], expected[u, rest], atol=1e-4)


def test_fit_ease_refuses_a_bad_penalty_and_counts_duplicates_once() -> None:
    with pytest.raises(ValueError, match="l2"):
        fit_ease(np.zeros(1, np.int64), np.zeros(1, np.int64), 3, 0.0)
    once = fit_ease(np.array([0, 0, 1]), np.array([0, 1, 1]), 3, 1.0)
    twice = fit_ease(np.array([0, 0, 0, 1]), np.array([0, 1, 1, 1]), 3, 1.0)
    np.testing.assert_allclose(once, twice)


def test_ranks_and_candidate_features_agree() -> None:
    scores = np.array([[0.5, -np.inf, 2.0, 1.0]], dtype=np.float32)
    assert ranks_of(scores).tolist() == [[3.0, 4.0, 1.0, 2.0]]
    value, rank = candidate_features(scores[0], np.array([2, 0, 1]))
    assert value.tolist() == [2.0, 0.5, 0.0]
    assert rank.tolist() == [1.0, 3.0, 4.0]
    assert top_items(scores, 5).tolist() == [[2, 3, 0, -1, -1]]


def test_merge_keeps_two_tower_items_and_fills_with_ease_in_its_order() -> None:
    cf = np.array([[5.0, 4.0, 3.0, 2.0, 1.0, -np.inf]], dtype=np.float32)
    tt = np.array([[4, 0, 5]], dtype=np.int64)  # 5 is in the history (-inf): never a candidate
    lists = merge_candidates(tt, cf, 3)
    assert lists.rows.tolist() == [[0, 1, 4]]
    assert lists.from_two_tower.tolist() == [[True, False, True]]
    assert lists.from_collaborative.tolist() == [[True, True, False]]
    assert lists.sources(0, 0) == ("two_tower_ann", "collaborative")
    alone = merge_candidates(tt, None, 2)
    assert alone.rows.tolist() == [[4, 0]]
    assert not alone.from_collaborative.any()


def test_recent_histories_are_newest_first_and_capped() -> None:
    users = np.array([1, 1, 1, 2])
    rows = np.array([10, 11, 12, 13])
    ts = np.array([3, 1, 2, 0])
    assert [h.tolist() for h in recent_histories(users, rows, ts, np.array([1, 2, 3]), 2)] == [
        [10, 12],
        [13],
        [],
    ]


def test_training_lists_are_the_head_whatever_the_labels() -> None:
    click = np.zeros(300, dtype=bool)
    click[[5, 250]] = True
    chosen = _choose(click, 16, np.random.default_rng(0))
    assert chosen.tolist() == list(range(16))
    assert _choose(np.zeros(300, dtype=bool), 16, np.random.default_rng(1)).tolist() == chosen.tolist()
    assert _choose(click[:10], 16, np.random.default_rng(0)).tolist() == list(range(10))


def test_softmax_list_loss_prefers_positives_on_top_and_ignores_padding() -> None:
    labels = torch.tensor([[1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    good = softmax_list_loss(torch.tensor([[3.0, 0.0, 99.0]]), labels, mask)
    bad = softmax_list_loss(torch.tensor([[0.0, 3.0, -99.0]]), labels, mask)
    assert good.item() < bad.item()
    expected = -torch.log_softmax(torch.tensor([3.0, 0.0]), dim=0)[0]
    assert good.item() == pytest.approx(expected.item(), rel=1e-5)
    empty = softmax_list_loss(torch.zeros(1, 3), torch.zeros(1, 3), mask)
    assert empty.item() == 0.0


def test_paired_bootstrap_brackets_a_real_difference() -> None:
    rng = np.random.default_rng(1)
    b = rng.random(500)
    a = b + 0.05 + rng.normal(0, 0.01, 500)
    diff = paired_bootstrap(a, b, samples=500)
    assert diff.low < diff.mean < diff.high
    assert diff.low > 0.04 and diff.high < 0.06
    same = paired_bootstrap(b, b, samples=100)
    assert same.mean == same.low == same.high == 0.0
    with pytest.raises(ValueError):
        paired_bootstrap(a, b[:3])


def test_an_untrained_listwise_ranker_orders_exactly_as_ease() -> None:
    from training.config import RankerConfig
    from training.ranker import CF_SCORE_COLUMN, DENSE_FEATURES, MultiTaskRanker, RankerSizes

    model = MultiTaskRanker(RankerConfig(objective="listwise"), RankerSizes(8, 3, 3)).eval()
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(50, len(DENSE_FEATURES))).astype(np.float32)
    model.set_dense_statistics(dense)
    batch = {
        "user_embedding": torch.as_tensor(rng.normal(size=(50, 8)), dtype=torch.float32),
        "item_embedding": torch.as_tensor(rng.normal(size=(50, 8)), dtype=torch.float32),
        "dense": torch.as_tensor(dense),
        "surface": torch.ones(50, dtype=torch.int64),
        "device": torch.zeros(50, dtype=torch.int64),
        "hour": torch.zeros(50, dtype=torch.int64),
    }
    with torch.no_grad():
        click = model(batch)["click"].numpy()
    expected = np.argsort(-dense[:, CF_SCORE_COLUMN], kind="stable")
    assert np.argsort(-click, kind="stable").tolist() == expected.tolist()
    pointwise = MultiTaskRanker(RankerConfig(objective="pointwise"), RankerSizes(8, 3, 3)).eval()
    pointwise.set_dense_statistics(dense)
    with torch.no_grad():
        other = pointwise(batch)["click"].numpy()
    assert np.argsort(-other, kind="stable").tolist() != expected.tolist()
