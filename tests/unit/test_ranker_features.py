"""Point-in-time item counts of impression examples and the ranker's constant dense columns."""

from __future__ import annotations

import numpy as np
import torch

from training.config import RankerConfig
from training.ranker import CF_SCORE_COLUMN, DENSE_FEATURES, MultiTaskRanker, RankerSizes
from training.train_ranker import counts_before


def test_counts_before_counts_only_earlier_events_of_the_same_row() -> None:
    rng = np.random.default_rng(3)
    event_rows = rng.integers(0, 6, 400)
    event_ts = rng.integers(0, 50, 400)
    rows = rng.integers(0, 7, 120)
    ts_us = rng.integers(0, 55, 120)
    expected = [int(((event_rows == r) & (event_ts < t)).sum()) for r, t in zip(rows, ts_us, strict=True)]
    assert counts_before(event_rows, event_ts, rows, ts_us).tolist() == expected


def test_a_column_constant_in_training_does_not_move_the_scores() -> None:
    torch.manual_seed(0)
    sizes = RankerSizes(embedding_dim=4, surface=3, device=3)
    model = MultiTaskRanker(RankerConfig(objective="pointwise", hidden_dims=(8,)), sizes)
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(64, len(DENSE_FEATURES))).astype(np.float32)
    # Examples built without the EASE features: the column is zero throughout training.
    dense[:, CF_SCORE_COLUMN] = 0.0
    model.set_dense_statistics(dense)
    model.eval()
    batch = {
        "user_embedding": torch.randn(5, 4),
        "item_embedding": torch.randn(5, 4),
        "dense": torch.as_tensor(dense[:5]),
        "surface": torch.ones(5, dtype=torch.int64),
        "device": torch.zeros(5, dtype=torch.int64),
        "hour": torch.ones(5, dtype=torch.int64),
    }
    with torch.no_grad():
        before = model(batch)
        batch["dense"][:, CF_SCORE_COLUMN] = torch.linspace(0.1, 2.0, 5)
        after = model(batch)
    for name, value in before.items():
        torch.testing.assert_close(after[name], value)
    # A column that did vary in training still counts.
    with torch.no_grad():
        batch["dense"][:, 0] += 3.0
        moved = model(batch)
    assert not torch.allclose(moved["click"], after["click"])
