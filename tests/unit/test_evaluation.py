"""Splits, ranking metrics, AUC and the comparison report, checked on cases small enough to do by hand."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest

from training.evaluation import (
    ComparisonReport,
    Interactions,
    PositiveRule,
    Split,
    auc,
    evaluate_scores,
    evaluate_topk,
    published_split,
    temporal_split,
    top_k,
)

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def _interactions(pairs: list[tuple[int, int]], n_users: int, n_items: int) -> Interactions:
    coded = np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)
    return Interactions(
        user_index=coded[:, 0],
        item_index=coded[:, 1],
        ts_us=np.arange(len(coded), dtype=np.int64),
        user_ids=np.array([f"u{u}" for u in range(n_users)]),
        item_ids=np.array([f"i{i}" for i in range(n_items)]),
    )


def _split(
    train: list[tuple[int, int]],
    test: list[tuple[int, int]],
    *,
    valid: list[tuple[int, int]] | None = None,
    n_users: int,
    n_items: int,
) -> Split:
    return Split(
        train=_interactions(train, n_users, n_items),
        valid=_interactions(valid or [], n_users, n_items),
        test=_interactions(test, n_users, n_items),
        metadata={"protocol": "hand"},
    )


def _fixed_scores(row: list[float]):
    def score(users: np.ndarray) -> np.ndarray:
        return np.tile(np.asarray(row, dtype=np.float32), (len(users), 1))

    return score


def _random_interactions(n_users: int, n_items: int, density: float, seed: int) -> Interactions:
    rng = np.random.default_rng(seed)
    users, items = np.nonzero(rng.random((n_users, n_items)) < density)
    return Interactions(
        user_index=users.astype(np.int64),
        item_index=items.astype(np.int64),
        ts_us=rng.integers(0, 10**12, size=len(users)),
        user_ids=np.array([f"u{u:03d}" for u in range(n_users)]),
        item_ids=np.array([f"i{i:03d}" for i in range(n_items)]),
    )


def _events(rows: list[tuple[str, str, str, int, float | None]]) -> pa.Table:
    return pa.table(
        {
            "event_id": pa.array([f"e{n}" for n in range(len(rows))]),
            "user_id": pa.array([r[0] for r in rows]),
            "item_id": pa.array([r[1] for r in rows]),
            "event_type": pa.array([r[2] for r in rows]),
            "ts": pa.array([T0 + timedelta(minutes=r[3]) for r in rows], type=pa.timestamp("us", tz="UTC")),
            "rating": pa.array([r[4] for r in rows], type=pa.float32()),
        }
    )


# -- ranking metrics -------------------------------------------------------------------------------


def test_metrics_match_a_hand_computed_ranking() -> None:
    # Every user sees items ranked 0 > 1 > ... > 5 before their train item is removed.
    # user 0: train {0}, test {2, 4} -> ranking 1 2 3 4 5, hits at ranks 2 and 4.
    # user 1: train {1}, test {5}    -> ranking 0 2 3 4 5, hit at rank 5.
    split = _split(train=[(0, 0), (1, 1)], test=[(0, 2), (0, 4), (1, 5)], n_users=2, n_items=6)
    result = evaluate_scores(_fixed_scores([10, 9, 8, 7, 6, 5]), split, ks=(3, 5))

    d2, d4, d5 = 1 / math.log2(3), 1 / math.log2(5), 1 / math.log2(6)
    expected = {
        "Recall@3": (1 / 2 + 0) / 2,
        "P@3": (1 / 3 + 0) / 2,
        "Hit@3": (1 + 0) / 2,
        "MRR@3": (1 / 2 + 0) / 2,
        "NDCG@3": (d2 / (1 + d2) + 0) / 2,
        "Coverage@3": 4 / 6,  # {1, 2, 3} and {0, 2, 3}
        "Recall@5": (1 + 1) / 2,
        "P@5": (2 / 5 + 1 / 5) / 2,
        "Hit@5": 1.0,
        "MRR@5": (1 / 2 + 1 / 5) / 2,
        "NDCG@5": ((d2 + d4) / (1 + d2) + d5 / 1) / 2,
        "Coverage@5": 1.0,
        "users": 2.0,
    }
    assert result == pytest.approx(expected, abs=1e-12)


def test_ideal_dcg_counts_at_most_k_relevant_items() -> None:
    # Three held-out items, the first two ranked on top: perfect at K=2 although recall is 2/3.
    split = _split(train=[(0, 5)], test=[(0, 0), (0, 1), (0, 3)], n_users=1, n_items=6)
    result = evaluate_scores(_fixed_scores([6, 5, 4, 3, 2, 1]), split, ks=(2,))
    assert result["NDCG@2"] == pytest.approx(1.0)
    assert result["Recall@2"] == pytest.approx(2 / 3)
    assert result["P@2"] == pytest.approx(1.0)


def test_training_items_are_never_ranked() -> None:
    split = published_split(_random_interactions(60, 40, 0.25, seed=1), seed=3)
    train_rows = split.train.dense_rows(np.arange(60), np.bool_)
    known_rows = split.known_before("test").dense_rows(np.arange(60), np.bool_)

    def loves_train(users: np.ndarray) -> np.ndarray:
        # The scorer prefers exactly the items it must not recommend.
        noise = np.random.default_rng(0).random((len(users), 40))
        return np.asarray(train_rows[users] * 100.0 + noise, dtype=np.float32)

    users, items = top_k(loves_train, split, k=10)
    assert len(users) == len(split.test.active_users())
    assert not np.take_along_axis(known_rows[users], items, axis=1).any()
    users_v, items_v = top_k(loves_train, split, k=10, part="valid")
    assert not np.take_along_axis(train_rows[users_v], items_v, axis=1).any()


def test_validation_items_are_excluded_when_scoring_test_only() -> None:
    split = _split(train=[(0, 0)], valid=[(0, 1)], test=[(0, 2)], n_users=1, n_items=4)
    scores = _fixed_scores([4, 3, 2, 1])
    assert evaluate_scores(scores, split, ks=(1,), part="test")["Hit@1"] == 1.0
    assert evaluate_scores(scores, split, ks=(1,), part="valid")["Hit@1"] == 1.0
    # Scored for validation, the test item is an ordinary unseen item and the valid item ranks first.
    assert top_k(scores, split, k=3, part="valid")[1].tolist() == [[1, 2, 3]]
    assert top_k(scores, split, k=3, part="test")[1].tolist() == [[2, 3, -1]]


def test_users_without_held_out_items_are_not_evaluated() -> None:
    split = _split(train=[(0, 0), (1, 0), (2, 1)], test=[(1, 1)], n_users=3, n_items=3)
    result = evaluate_scores(_fixed_scores([3, 2, 1]), split, ks=(1,))
    assert result["users"] == 1.0
    assert result["Hit@1"] == 1.0


def test_evaluate_topk_agrees_with_evaluate_scores() -> None:
    split = published_split(_random_interactions(80, 50, 0.2, seed=2), seed=7)
    rng = np.random.default_rng(5)
    table = rng.random((80, 50)).astype(np.float32)

    def score(users: np.ndarray) -> np.ndarray:
        return np.asarray(table[users])

    dense = evaluate_scores(score, split, ks=(5, 10), batch_users=7)
    users, items = top_k(score, split, k=10, batch_users=13)
    assert evaluate_topk(items, split, ks=(5, 10), user_indices=users) == pytest.approx(dense)
    full = np.full((80, 10), -1, dtype=np.int64)
    full[users] = items
    assert evaluate_topk(full, split, ks=(5, 10), batch_users=3) == pytest.approx(dense)


def test_evaluate_topk_moves_past_seen_items_and_empty_slots() -> None:
    split = _split(train=[(0, 0), (0, 1)], test=[(0, 3)], n_users=1, n_items=5)
    lists = np.array([[0, -1, 1, 3, 2]])
    # Seen items 0 and 1 and the empty slot go: the list becomes 3 2, a hit at rank 1.
    assert evaluate_topk(lists, split, ks=(1,))["Hit@1"] == 1.0
    # Kept, seen items count as misses; only the empty slot goes: 0 1 3 2, a hit at rank 3.
    kept = evaluate_topk(lists, split, ks=(1, 4), exclude_seen=False)
    assert kept["Hit@1"] == 0.0
    assert kept["MRR@4"] == pytest.approx(1 / 3)


def test_evaluate_topk_rejects_bad_lists() -> None:
    split = _split(train=[(0, 0), (1, 0)], test=[(0, 1), (1, 2)], n_users=2, n_items=4)
    with pytest.raises(ValueError, match="repeats"):
        evaluate_topk(np.array([[1, 1], [2, 3]]), split, ks=(2,))
    with pytest.raises(ValueError, match="no list"):
        evaluate_topk(np.array([[1, 2]]), split, ks=(2,), user_indices=np.array([0]))
    with pytest.raises(ValueError, match="cannot be cut"):
        evaluate_topk(np.array([[1], [2]]), split, ks=(2,))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        evaluate_topk(np.array([[1, 4], [2, 3]]), split, ks=(2,))


def test_evaluate_scores_rejects_bad_scores() -> None:
    split = _split(train=[(0, 0)], test=[(0, 1)], n_users=1, n_items=3)
    with pytest.raises(ValueError, match="shape"):
        evaluate_scores(_fixed_scores([1.0, 2.0]), split, ks=(1,))
    with pytest.raises(ValueError, match="NaN"):
        evaluate_scores(_fixed_scores([1.0, math.nan, 2.0]), split, ks=(1,))
    with pytest.raises(ValueError, match="cut-offs"):
        evaluate_scores(_fixed_scores([1.0, 2.0, 3.0]), split, ks=(0,))


def test_scores_returned_by_reference_are_not_modified() -> None:
    split = _split(train=[(0, 0)], test=[(0, 1)], n_users=1, n_items=3)
    cached = np.array([[3.0, 2.0, 1.0]], dtype=np.float32)
    evaluate_scores(lambda users: cached, split, ks=(1,))
    assert cached.tolist() == [[3.0, 2.0, 1.0]]


# -- AUC -------------------------------------------------------------------------------------------


def test_auc_hand_example_with_a_tie() -> None:
    # Pairs (pos, neg): (.9,.1) (.9,.4) (.4,.1) win, (.4,.4) ties -> 3.5 / 4.
    assert auc([1, 0, 1, 0], [0.9, 0.1, 0.4, 0.4]) == pytest.approx(0.875)


def test_auc_equals_brute_force_pair_count() -> None:
    rng = np.random.default_rng(11)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.normal(size=300) + labels * 0.5, 1)  # rounding creates many ties
    pos, neg = scores[labels], scores[~labels]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert auc(labels, scores) == pytest.approx(wins / (len(pos) * len(neg)), abs=1e-12)


def test_auc_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="positive and one negative"):
        auc([1, 1], [0.2, 0.3])


# -- interactions from events ----------------------------------------------------------------------


def test_from_events_keeps_positives_once_at_their_first_time() -> None:
    table = _events(
        [
            ("b", "x", "view", 5, 4.0),
            ("b", "x", "view", 1, 5.0),  # same pair earlier: this row is kept
            ("a", "y", "view", 2, 2.0),  # rated below 3: not positive whatever its type
            ("a", "z", "click", 3, None),  # implicit positive
            ("a", "w", "hide", 4, None),  # implicit, not a positive type
            ("c", "y", "like", 6, 3.0),
            ("d", "x", "like", 7, None),  # as MovieLens imports: an unrated like beside a rated view
            ("d", "x", "view", 7, 4.0),
        ]
    )
    interactions = Interactions.from_events(table)
    assert interactions.user_ids.tolist() == ["a", "b", "c", "d"]
    assert interactions.item_ids.tolist() == ["x", "y", "z"]
    rows = list(
        zip(
            interactions.user_ids[interactions.user_index],
            interactions.item_ids[interactions.item_index],
            interactions.ts_us,
            strict=True,
        )
    )
    minute = 60 * 10**6
    t0 = int(T0.timestamp()) * 10**6
    assert rows == [
        ("a", "z", t0 + 3 * minute),
        ("b", "x", t0 + minute),
        ("c", "y", t0 + 6 * minute),
        ("d", "x", t0 + 7 * minute),
    ]
    assert interactions.rating is not None
    assert np.isnan(interactions.rating[0])
    assert interactions.rating[1:].tolist() == [5.0, 3.0, 4.0]


def test_from_events_rules_and_required_columns() -> None:
    table = _events([("a", "x", "view", 0, 4.0), ("a", "y", "view", 1, 3.5)])
    strict = Interactions.from_events(table, positive=PositiveRule(min_rating=4.0))
    assert strict.item_ids.tolist() == ["x"]
    with pytest.raises(ValueError, match="lacks columns"):
        Interactions.from_events(table.drop_columns(["ts"]))
    with pytest.raises(ValueError, match="'rating' or an 'event_type'"):
        Interactions.from_events(table.drop_columns(["rating", "event_type"]))


# -- splits ----------------------------------------------------------------------------------------


def _pairs(interactions: Interactions) -> set[tuple[int, int]]:
    return set(zip(interactions.user_index.tolist(), interactions.item_index.tolist(), strict=True))


def test_published_split_is_deterministic_disjoint_and_complete() -> None:
    interactions = _random_interactions(120, 60, 0.15, seed=4)
    first = published_split(interactions, seed=42)
    again = published_split(interactions, seed=42)
    other = published_split(interactions, seed=43)
    for name in ("train", "valid", "test"):
        assert _pairs(first.part(name)) == _pairs(again.part(name))
    assert _pairs(first.test) != _pairs(other.test)

    train, valid, test = _pairs(first.train), _pairs(first.valid), _pairs(first.test)
    assert not (train & valid or train & test or valid & test)
    assert train | valid | test == _pairs(interactions)
    assert first.metadata["protocol"] == "published"
    assert first.metadata["seed"] == 42
    assert first.metadata["sizes"]["test"] == len(test)


def test_published_split_sizes_per_user() -> None:
    # User 0 has 20 items, user 1 has 3, user 2 has 2 (too few to hold any out).
    pairs = [(0, i) for i in range(20)] + [(1, i) for i in range(3)] + [(2, i) for i in range(2)]
    split = published_split(_interactions(pairs, 3, 20), seed=0)
    assert split.train.user_counts().tolist() == [16, 1, 2]
    assert split.valid.user_counts().tolist() == [2, 1, 0]
    assert split.test.user_counts().tolist() == [2, 1, 0]
    assert split.metadata["train_only_users"] == 1


def test_temporal_split_respects_time_and_train_vocabulary() -> None:
    interactions = _random_interactions(50, 30, 0.3, seed=6)
    split = temporal_split(interactions)
    cutoffs = split.metadata["cutoffs"]
    assert split.train.ts_us.max() < cutoffs["valid_start_us"] <= split.valid.ts_us.min()
    assert split.valid.ts_us.max() < cutoffs["test_start_us"] <= split.test.ts_us.min()
    for part in (split.valid, split.test):
        assert set(part.user_index.tolist()) <= set(split.train.user_index.tolist())
        assert set(part.item_index.tolist()) <= set(split.train.item_index.tolist())
    kept = len(split.train) + len(split.valid) + len(split.test)
    dropped = split.metadata["dropped_unseen_valid"] + split.metadata["dropped_unseen_test"]
    assert kept + dropped == len(interactions)
    assert len(split.train) == pytest.approx(0.8 * len(interactions), abs=2)


def test_temporal_split_drops_users_and_items_unseen_in_train() -> None:
    interactions = Interactions(
        user_index=np.array([0, 0, 0, 1, 1, 2]),
        item_index=np.array([0, 1, 2, 0, 1, 0]),
        ts_us=np.array([0, 1, 8, 2, 9, 7]),
        user_ids=np.array(["u0", "u1", "u2"]),
        item_ids=np.array(["i0", "i1", "i2"]),
    )
    # Cut-offs land on observed times 7 and 8: train (0,0) (0,1) (1,0); valid (2,0), whose user is
    # new; test (0,2), whose item is new, and (1,1), the only row left to evaluate.
    split = temporal_split(interactions, valid_quantile=0.6, test_quantile=0.8)
    assert split.metadata["cutoffs"]["valid_start_us"] == 7
    assert split.metadata["cutoffs"]["test_start_us"] == 8
    assert len(split.train) == 3
    assert len(split.valid) == 0
    assert list(zip(split.test.user_index.tolist(), split.test.item_index.tolist(), strict=True)) == [(1, 1)]
    assert split.metadata["dropped_unseen_valid"] == 1
    assert split.metadata["dropped_unseen_test"] == 1


def test_split_save_and_load_round_trip(tmp_path) -> None:
    table = _events([(f"u{n % 7}", f"i{n % 11}", "view", n, 1.0 + n % 5) for n in range(60)])
    split = published_split(Interactions.from_events(table), seed=9)
    split.save(str(tmp_path / "split"))
    loaded = Split.load(str(tmp_path / "split"))
    assert loaded.metadata == split.metadata
    assert loaded.train.user_ids.tolist() == split.train.user_ids.tolist()
    assert loaded.test.item_ids.tolist() == split.test.item_ids.tolist()
    assert loaded.train.positive == split.train.positive
    for name in ("train", "valid", "test"):
        before, after = split.part(name), loaded.part(name)
        assert np.array_equal(before.user_index, after.user_index)
        assert np.array_equal(before.item_index, after.item_index)
        assert np.array_equal(before.ts_us, after.ts_us)
        assert before.rating is not None and after.rating is not None
        assert np.array_equal(before.rating, after.rating, equal_nan=True)


# -- report ----------------------------------------------------------------------------------------


def test_report_renders_aligned_columns_and_round_trips_json(tmp_path) -> None:
    metadata = {
        "protocol": "published",
        "seed": 42,
        "cutoffs": None,
        "sizes": {"users": 3, "items": 5, "test": 4, "test_users": 2},
    }
    report = ComparisonReport(metadata)
    report.add("most_pop", {"Recall@10": 0.1, "NDCG@10": 0.05, "Coverage@20": 0.2})
    report.add("a_much_longer_model_name", {"Recall@10": 0.3, "NDCG@10": 0.25})
    with pytest.raises(ValueError, match="already"):
        report.add("most_pop", {})

    lines = report.render().splitlines()
    assert lines[0].startswith("split: published (seed 42)")
    assert lines[1].split() == ["model", *report.columns]
    assert len({len(line) for line in lines[1:3]}) == 1
    assert lines[3].split()[:3] == ["most_pop", "0.1000", "0.0500"]
    assert lines[4].split()[-1] == "-"
    assert lines[3].index("0.1000") + 6 == lines[1].index("Recall@10") + len("Recall@10")

    path = tmp_path / "out" / "report.json"
    report.to_json(str(path))
    data = json.loads(path.read_text())
    assert data["split"] == metadata
    assert data["rows"]["most_pop"]["NDCG@10"] == 0.05
    assert ComparisonReport.from_json(str(path)).rows == report.rows
