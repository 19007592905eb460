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


def _shared_tags_by_hand(
    tags: np.ndarray, history: np.ndarray, present: np.ndarray, candidates: np.ndarray
) -> np.ndarray:
    out = np.zeros(history.shape, dtype=bool)
    for b, candidate in enumerate(candidates):
        wanted = {int(t) for t in tags[candidate] if t != 0}
        for h, row in enumerate(history[b]):
            out[b, h] = bool(present[b, h]) and bool(wanted & {int(t) for t in tags[max(row, 0)] if t != 0})
    return out


def test_shared_tags_by_bit_set_equal_the_pairwise_comparison() -> None:
    from types import SimpleNamespace

    from training.ranker import MAX_TAG_WORDS, RankerFeatureBuilder, tag_bitsets

    rng = np.random.default_rng(11)
    for vocabulary in (5, 64, 65, 300, 64 * MAX_TAG_WORDS + 1):
        tags = rng.integers(0, vocabulary, size=(40, 6))
        tags[rng.random(tags.shape) < 0.4] = 0  # padding
        tags[0, 0] = vocabulary - 1  # the largest index decides how many words a set takes
        history = rng.integers(-1, 40, size=(70, 9))
        present = (history >= 0) & (rng.random(history.shape) < 0.9)
        candidates = rng.integers(0, 40, size=70)
        bits = tag_bitsets(tags)
        assert (bits is None) == (vocabulary > 64 * MAX_TAG_WORDS)
        expected = _shared_tags_by_hand(tags, history, present, candidates)
        for table in (bits, None):
            builder = SimpleNamespace(_tag_bits=table, items=SimpleNamespace(tags=tags))
            got = RankerFeatureBuilder._shares_a_tag(builder, history, present, candidates)  # type: ignore[arg-type]
            assert got.tolist() == expected.tolist(), (vocabulary, table is None)


def test_a_tag_bit_set_holds_exactly_the_items_tags() -> None:
    from training.ranker import tag_bitsets

    bits = tag_bitsets(np.array([[1, 63, 0], [64, 0, 0], [0, 0, 0]]))
    assert bits is not None and bits.shape == (3, 2)
    assert bits[0].tolist() == [(1 << 1) | (1 << 63), 0]
    assert bits[1].tolist() == [0, 1]
    assert bits[2].tolist() == [0, 0]
