"""Baselines on hand-checked cases, and their expected ordering on MovieLens 100K."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pytest

from training.evaluation import (
    EASE,
    ComparisonReport,
    Interactions,
    ItemKNN,
    MostPop,
    TooManyItemsError,
    evaluate_scores,
    item_gram,
    published_split,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _interactions(rows: list[list[int]], n_items: int) -> Interactions:
    """Interactions whose user ``u`` has the items ``rows[u]``."""
    users = np.array([u for u, items in enumerate(rows) for _ in items], dtype=np.int64)
    items = np.array([i for row in rows for i in row], dtype=np.int64)
    return Interactions(
        user_index=users,
        item_index=items,
        ts_us=np.zeros(len(users), dtype=np.int64),
        user_ids=np.array([f"u{u}" for u in range(len(rows))]),
        item_ids=np.array([f"i{i}" for i in range(n_items)]),
    )


# Items' user sets: 0 -> {0, 1}, 1 -> {0, 1, 3}, 2 -> {1, 2, 3}.
TINY = [[0, 1], [0, 1, 2], [2], [1, 2]]


def test_item_gram_counts_co_occurrences() -> None:
    gram = item_gram(_interactions(TINY, 3), batch_users=3)
    assert gram.tolist() == [[2, 2, 1], [2, 3, 2], [1, 2, 3]]


def test_most_pop_scores_training_counts_for_everyone() -> None:
    model = MostPop().fit(_interactions(TINY, 4))
    scores = model.score(np.array([0, 2]))
    assert scores.tolist() == [[2, 3, 3, 0], [2, 3, 3, 0]]


def test_item_knn_cosine_and_scores() -> None:
    model = ItemKNN(k_neighbours=2).fit(_interactions(TINY, 3))
    c01, c02, c12 = 2 / math.sqrt(6), 1 / math.sqrt(6), 2 / 3
    expected = [[0, c01, c02], [c01, 0, c12], [c02, c12, 0]]
    assert model.similarity == pytest.approx(np.array(expected), abs=1e-6)
    # User 0 has items 0 and 1: each candidate sums its similarity to both.
    assert model.score(np.array([0]))[0] == pytest.approx([c01, c01, c02 + c12], abs=1e-6)


def test_item_knn_keeps_top_neighbours_and_shrinks() -> None:
    pruned = ItemKNN(k_neighbours=1).fit(_interactions(TINY, 3)).similarity
    # Each row keeps its single most similar item: 0 -> 1, 1 -> 0, 2 -> 1.
    assert (pruned > 0).tolist() == [[False, True, False], [True, False, False], [False, True, False]]
    shrunk = ItemKNN(k_neighbours=2, shrink=1.0).fit(_interactions(TINY, 3)).similarity
    assert shrunk[0, 1] == pytest.approx(2 / (math.sqrt(2) * math.sqrt(3) + 1), abs=1e-6)


def test_ease_two_items_by_hand() -> None:
    # X = [[1, 1], [1, 0]], λ = 1: XᵀX + λI = [[3, 1], [1, 2]], P = [[2, -1], [-1, 3]] / 5,
    # B[0, 1] = -P[0, 1] / P[1, 1] = 1/3 and B[1, 0] = -P[1, 0] / P[0, 0] = 1/2.
    # Check by ridge regression: item 1 on item 0 is (x0·x1) / (x0·x0 + λ) = 1 / 3.
    model = EASE(l2=1.0).fit(_interactions([[0, 1], [0]], 2))
    assert model.weights == pytest.approx(np.array([[0, 1 / 3], [1 / 2, 0]]), abs=1e-6)
    assert model.score(np.array([1]))[0] == pytest.approx([0, 1 / 3], abs=1e-6)


def test_ease_equals_per_item_ridge_regression_without_self_weight() -> None:
    rng = np.random.default_rng(0)
    dense = rng.random((40, 7)) < 0.4
    model = EASE(l2=3.0).fit(_interactions([np.flatnonzero(row).tolist() for row in dense], 7))
    x = dense.astype(np.float64)
    for j in range(7):
        others = [i for i in range(7) if i != j]
        a = x[:, others]
        coef = np.linalg.solve(a.T @ a + 3.0 * np.eye(6), a.T @ x[:, j])
        assert model.weights[others, j] == pytest.approx(coef, abs=1e-5)
        assert model.weights[j, j] == 0.0


def test_dense_models_refuse_large_catalogues_and_unfitted_use() -> None:
    train = _interactions(TINY, 3)
    with pytest.raises(TooManyItemsError, match="max_items=2"):
        EASE(max_items=2).fit(train)
    with pytest.raises(TooManyItemsError, match="max_items=2"):
        ItemKNN(max_items=2).fit(train)
    with pytest.raises(RuntimeError, match="not fitted"):
        EASE().score(np.array([0]))


# -- MovieLens 100K ---------------------------------------------------------------------------------


def _ml100k_dir() -> Path:
    root = os.environ.get("RAYREC_DATASETS")
    base = Path(root) if root else REPO_ROOT.parent / "shared" / "datasets"
    return base / "ml-100k"


def _ml100k_events(path: Path) -> pa.Table:
    """``u.data`` (user, item, rating, unix seconds) as rows shaped like the lake's events."""
    columns = ["user", "item", "rating", "ts"]
    raw = pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=columns),
        parse_options=pacsv.ParseOptions(delimiter="\t"),
        convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(columns, pa.int64())),
    )
    n_rows = raw.num_rows
    return pa.table(
        {
            "event_id": pa.array([str(n) for n in range(n_rows)]),
            "user_id": raw.column("user").cast(pa.string()),
            "item_id": raw.column("item").cast(pa.string()),
            "event_type": pa.array(["view"] * n_rows),
            # Seconds -> microseconds, the unit of the lake's timestamps.
            "ts": pc.multiply(raw.column("ts"), 1_000_000).cast(pa.timestamp("us", tz="UTC")),
            "rating": raw.column("rating").cast(pa.float32()),
        }
    )


def test_ml100k_ease_beats_item_knn_beats_most_pop() -> None:
    data = _ml100k_dir() / "u.data"
    if not data.is_file():
        pytest.skip(f"MovieLens 100K not found at {data.parent} (set RAYREC_DATASETS)")
    split = published_split(Interactions.from_events(_ml100k_events(data)), seed=42)
    report = ComparisonReport(split.metadata)
    for model in (MostPop(), ItemKNN(), EASE()):
        report.add(model.name, evaluate_scores(model.fit(split.train).score, split))
    print()
    print(report.render())

    ndcg = {name: metrics["NDCG@10"] for name, metrics in report.rows.items()}
    assert ndcg["ease"] > ndcg["item_knn"] > ndcg["most_pop"] > 0
    assert report.rows["ease"]["users"] == split.metadata["sizes"]["test_users"]
