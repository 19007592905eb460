"""Item-item similarity: from embeddings and from co-occurrence, the block function, persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from retrieval import (
    ITEM_SIMILARITY_SCHEMA,
    CooccurrenceNeighbors,
    EmbeddingNeighbors,
    ExactIndex,
    ItemSimilarityTable,
    compute_block,
)
from retrieval.interaction_matrix import InteractionMatrix


def unit_vectors(count: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    unit: np.ndarray = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return unit


def ids(count: int) -> list[str]:
    return [f"i{n}" for n in range(count)]


# users x items, 1 = interacted: items 0/1 share users, 2/3 share users, 4 stands alone.
TOY = np.array(
    [
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 0, 1],
    ],
    dtype=np.float64,
)


def toy_interactions() -> tuple[np.ndarray, np.ndarray]:
    users, items = np.nonzero(TOY)
    return users, items


def dense_cosine(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=0)
    cosine: np.ndarray = (matrix.T @ matrix) / np.outer(norms, norms)
    return cosine


def test_embedding_neighbors_exclude_self_and_match_brute_force() -> None:
    vectors = unit_vectors(200, 8)
    table = ItemSimilarityTable.from_embeddings(vectors, ids(200), k=5)

    scores = vectors @ vectors.T
    np.fill_diagonal(scores, -np.inf)
    expected = np.argsort(-scores, axis=1)[:, :5]
    for row in (0, 17, 199):
        got = table.neighbors(f"i{row}")
        assert f"i{row}" not in [item for item, _ in got]
        assert [item for item, _ in got] == [f"i{p}" for p in expected[row]]
        np.testing.assert_allclose([s for _, s in got], scores[row, expected[row]], rtol=1e-5)


def test_embedding_neighbors_through_an_index_agree_with_exact() -> None:
    vectors = unit_vectors(100, 6, seed=2)
    exact_source = EmbeddingNeighbors(vectors, ids(100))
    index_source = EmbeddingNeighbors(vectors, ids(100), index=ExactIndex(vectors, ids(100)))

    rows = np.arange(0, 100, 9)
    np.testing.assert_array_equal(exact_source.top_k(rows, 4)[0], index_source.top_k(rows, 4)[0])
    with pytest.raises(ValueError, match="same item ids"):
        EmbeddingNeighbors(vectors, ids(100), index=ExactIndex(vectors[:50], ids(50)))


def test_cooccurrence_matches_dense_cosine_and_is_symmetric() -> None:
    users, items = toy_interactions()
    matrix = InteractionMatrix.from_interactions(users, items, num_items=5)

    np.testing.assert_allclose(matrix.cosine(np.arange(5)), dense_cosine(TOY), rtol=1e-6)
    table = ItemSimilarityTable.from_interactions(users, items, ids(5), k=4)

    score = {(item, other): s for item in ids(5) for other, s in table.neighbors(item)}
    for (item, other), value in score.items():
        assert item != other
        assert score[(other, item)] == pytest.approx(value)
    assert [other for other, _ in table.neighbors("i0")] == ["i1", "i2"]
    assert table.neighbors("i4") == []  # shares no user with anyone
    assert table.neighbors("unknown") == []


def test_cooccurrence_blocks_agree_with_a_single_block() -> None:
    rng = np.random.default_rng(5)
    users = rng.integers(0, 300, 4000)
    items = rng.integers(0, 120, 4000)
    matrix = InteractionMatrix.from_interactions(users, items, num_items=120)
    one_block = CooccurrenceNeighbors(matrix, ids(120))
    # 200 cells per block is one row at a time.
    row_blocks = CooccurrenceNeighbors(matrix, ids(120), block_cells=200)

    rows = np.arange(120)
    full = one_block.top_k(rows, 10)
    chunked = row_blocks.top_k(rows, 10)

    np.testing.assert_allclose(full[1], chunked[1], rtol=1e-6)
    dense = np.zeros((300, 120))
    dense[users, items] = 1.0
    expected = dense_cosine(dense)
    np.fill_diagonal(expected, -np.inf)
    np.testing.assert_allclose(full[1][:, 0], expected.max(axis=1), rtol=1e-5)


def test_repeated_interactions_count_once_unless_weighted() -> None:
    users = np.array([0, 0, 0, 1])
    items = np.array([0, 0, 1, 1])

    binary = InteractionMatrix.from_interactions(users, items, num_items=2)
    weighted = InteractionMatrix.from_interactions(users, items, num_items=2, values=np.ones(4))

    assert binary.cooccurrence(np.array([0]))[0].tolist() == [1.0, 1.0]
    assert weighted.cooccurrence(np.array([0]))[0].tolist() == [4.0, 2.0]
    with pytest.raises(ValueError, match="out of range"):
        InteractionMatrix.from_interactions(users, np.array([0, 0, 1, 2]), num_items=2)


def test_compute_block_returns_schema_rows_in_order() -> None:
    vectors = unit_vectors(30, 4, seed=7)
    source = EmbeddingNeighbors(vectors, ids(30))

    block = compute_block(np.array([5, 2, 29]), source, k=3)

    assert block.schema.equals(ITEM_SIMILARITY_SCHEMA)
    assert block.column("item_id").to_pylist() == ["i5", "i2", "i29"]
    assert all(len(n) == 3 for n in block.column("neighbor_ids").to_pylist())


def test_compute_block_keeps_short_lists_short() -> None:
    users, items = toy_interactions()
    source = CooccurrenceNeighbors(InteractionMatrix.from_interactions(users, items, num_items=5), ids(5))

    block = compute_block(np.arange(5), source, k=4)

    lengths = [len(n) for n in block.column("neighbor_ids").to_pylist()]
    assert lengths == [len(s) for s in block.column("scores").to_pylist()]
    assert lengths[4] == 0


def test_parquet_round_trip(tmp_path: Path) -> None:
    vectors = unit_vectors(50, 5, seed=3)
    source = EmbeddingNeighbors(vectors, ids(50))
    table = ItemSimilarityTable.from_blocks(
        [compute_block(np.arange(0, 25), source, k=6), compute_block(np.arange(25, 50), source, k=6)]
    )

    table.save(tmp_path / "similar.parquet")
    loaded = ItemSimilarityTable.load(tmp_path / "similar.parquet")

    assert len(loaded) == 50
    assert loaded.neighbors("i30", 3) == table.neighbors("i30", 3)
    assert loaded.table.equals(table.table)
    with pytest.raises(ValueError, match="schema"):
        ItemSimilarityTable(pa.table({"item_id": ["a"]}))
