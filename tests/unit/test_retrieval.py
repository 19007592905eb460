"""Item indexes: exact search, ScaNN recall against it, persistence, the delta of new items, filters."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from retrieval import (
    MISSING_POSITION,
    AnnConfig,
    DeltaIndex,
    DeltaIndexFullError,
    ExactIndex,
    IndexFormatError,
    IndexKind,
    ScannIndex,
    build_item_index,
    load_item_index,
    measure_recall,
    sample_queries_from_items,
)
from retrieval.scann_index import tune_leaves_to_search


def clustered_vectors(num_items: int, dim: int, num_clusters: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around random cluster centres, like trained item embeddings."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((num_clusters, dim)).astype(np.float32)
    assignment = rng.integers(0, num_clusters, num_items)
    vectors = centers[assignment] + 0.8 * rng.standard_normal((num_items, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32)


def item_ids(count: int, prefix: str = "item") -> list[str]:
    return [f"{prefix}{i}" for i in range(count)]


@pytest.fixture(scope="module")
def catalog() -> tuple[np.ndarray, list[str]]:
    return clustered_vectors(30_000, 32, num_clusters=100), item_ids(30_000)


@pytest.fixture(scope="module")
def scann_index(catalog: tuple[np.ndarray, list[str]]) -> ScannIndex:
    vectors, ids = catalog
    index = build_item_index(vectors, ids)
    assert isinstance(index, ScannIndex)
    return index


# --- exact search ---------------------------------------------------------------------------------


def test_exact_search_orders_by_inner_product() -> None:
    vectors = np.array([[1, 0], [0, 1], [1, 1], [-1, 0], [0.5, 0.2]], dtype=np.float32)
    index = ExactIndex(vectors, ["a", "b", "c", "d", "e"])

    positions, scores = index.search(np.array([[2.0, 1.0], [-1.0, -0.5]]), k=3)

    assert index.item_ids(positions) == [["c", "a", "e"], ["d", "b", "e"]]
    np.testing.assert_allclose(scores, [[3.0, 2.0, 1.2], [1.0, -0.5, -0.6]], rtol=1e-6)
    assert positions.dtype == np.int64 and scores.dtype == np.float32


def test_exact_search_matches_full_sort_on_random_data() -> None:
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((500, 8)).astype(np.float32)
    queries = rng.standard_normal((7, 8)).astype(np.float32)
    # A tiny block budget forces several query blocks through the blocked path.
    index = ExactIndex(vectors, item_ids(500), block_cells=1000)

    positions, scores = index.search(queries, k=10)

    expected = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    np.testing.assert_array_equal(positions, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ vectors.T, expected, axis=1), rtol=1e-5)


def test_exact_search_pads_when_k_exceeds_catalog() -> None:
    index = ExactIndex(np.eye(2, dtype=np.float32), ["a", "b"])

    positions, scores = index.search(np.array([1.0, 0.0]), k=4)

    assert positions.tolist() == [[0, 1, MISSING_POSITION, MISSING_POSITION]]
    assert np.isneginf(scores[0, 2:]).all()
    assert index.item_ids(positions) == [["a", "b"]]


def test_exact_exclude_is_per_query() -> None:
    index = ExactIndex(np.eye(3, dtype=np.float32) * [3, 2, 1], ["a", "b", "c"])
    queries = np.ones((2, 3), dtype=np.float32)

    positions, _ = index.search(queries, k=2, exclude=[{"a"}, {"b", "unknown"}])

    assert index.item_ids(positions) == [["b", "c"], ["a", "c"]]


@pytest.mark.parametrize("allowed_count", [1, 4])
def test_exact_allowed_mask_selective_and_permissive(allowed_count: int) -> None:
    # One allowed item takes the copy-the-subset path, four of five take the blank-columns path.
    vectors = np.eye(5, dtype=np.float32) * np.arange(5, 0, -1)
    index = ExactIndex(vectors, item_ids(5))
    allowed = np.zeros(5, dtype=bool)
    allowed[5 - allowed_count :] = True

    positions, _ = index.search(np.ones(5, dtype=np.float32), k=5, allowed=allowed, exclude=[{"item4"}])

    kept = [p for p in positions[0].tolist() if p != MISSING_POSITION]
    assert kept == list(range(5 - allowed_count, 4))


def test_exact_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unique"):
        ExactIndex(np.zeros((2, 2), dtype=np.float32), ["a", "a"])
    with pytest.raises(ValueError, match="NaN"):
        ExactIndex(np.array([[np.nan, 0.0]], dtype=np.float32), ["a"])
    index = ExactIndex(np.eye(2, dtype=np.float32), ["a", "b"])
    with pytest.raises(ValueError, match="queries must be"):
        index.search(np.ones((1, 3)), k=1)
    with pytest.raises(ValueError, match="allowed"):
        index.search(np.ones(2), k=1, allowed=np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="exclude"):
        index.search(np.ones((2, 2)), k=1, exclude=[{"a"}])


# --- config ---------------------------------------------------------------------------------------


def test_config_derived_from_catalog_size() -> None:
    config = AnnConfig.from_catalog_size(1_000_000, 64)

    assert config.num_leaves == 1000
    assert 1 <= config.leaves_to_search <= config.num_leaves
    assert config.dims_per_block == 2 and config.anisotropic_quantization_threshold == 0.2
    assert 4 <= config.reorder_factor <= 10
    # Small catalogs are capped at 50 items per leaf, not sqrt(n).
    assert AnnConfig.from_catalog_size(1000, 8).num_leaves == 20


def test_config_is_strict() -> None:
    with pytest.raises(ValidationError):
        AnnConfig.from_catalog_size(10_000, 16, leaf_count=3)
    with pytest.raises(ValidationError, match="exceeds num_leaves"):
        AnnConfig.from_catalog_size(10_000, 16, num_leaves=10, leaves_to_search=11)


def test_small_catalog_gets_exact_index() -> None:
    vectors = clustered_vectors(1000, 8, num_clusters=5)

    index = build_item_index(vectors, item_ids(1000))

    assert isinstance(index, ExactIndex)
    assert index.metadata.recall_at_100 == 1.0


def test_catalog_too_small_for_scann_is_exact_even_when_forced() -> None:
    vectors = clustered_vectors(10, 8, num_clusters=2)
    forced = AnnConfig.from_catalog_size(10, 8, exact_below_items=0)

    assert isinstance(build_item_index(vectors, item_ids(10), forced), ExactIndex)
    with pytest.raises(ValueError, match="at least 16 items"):
        ScannIndex.build(vectors, item_ids(10), forced)


def test_scann_forced_on_a_small_catalog() -> None:
    vectors = clustered_vectors(1000, 8, num_clusters=5)
    forced = AnnConfig.from_catalog_size(1000, 8, exact_below_items=0)

    index = build_item_index(vectors, item_ids(1000), forced)

    assert isinstance(index, ScannIndex)
    assert index.metadata.recall_at_100 >= 0.95


# --- ScaNN ----------------------------------------------------------------------------------------


def test_scann_recall_at_100_against_exact(
    catalog: tuple[np.ndarray, list[str]], scann_index: ScannIndex
) -> None:
    vectors, ids = catalog
    exact = ExactIndex(vectors, ids)
    # Fresh queries, not the ones the build tuned on.
    queries = sample_queries_from_items(vectors, 500, seed=99)

    recall = measure_recall(scann_index, exact, queries, k=100)

    assert recall >= 0.95, f"recall@100 {recall:.3f}"
    assert scann_index.metadata.recall_at_100 >= 0.95
    assert scann_index.metadata.kind == IndexKind.SCANN
    assert scann_index.config.leaves_to_search <= scann_index.config.num_leaves


def test_scann_scores_are_exact_inner_products(
    catalog: tuple[np.ndarray, list[str]], scann_index: ScannIndex
) -> None:
    vectors, _ = catalog
    query = vectors[:3] + 0.1

    positions, scores = scann_index.search(query, k=20)

    assert (positions != MISSING_POSITION).all()
    expected = np.einsum("qd,qkd->qk", query, vectors[positions])
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all(), "results must be best first"


def test_scann_single_query_matches_batch(
    scann_index: ScannIndex, catalog: tuple[np.ndarray, list[str]]
) -> None:
    vectors, _ = catalog

    single, _ = scann_index.search(vectors[7], k=10)
    batch, _ = scann_index.search(vectors[6:9], k=10)

    np.testing.assert_array_equal(single[0], batch[1])


def test_scann_exclude_and_allowed(scann_index: ScannIndex, catalog: tuple[np.ndarray, list[str]]) -> None:
    vectors, ids = catalog
    query = vectors[:1]
    top, _ = scann_index.search(query, k=10)
    seen = set(scann_index.item_ids(top)[0][:5])

    excluded, _ = scann_index.search(query, k=10, exclude=[seen])
    allowed = np.zeros(len(ids), dtype=bool)
    allowed[::2] = True
    masked, _ = scann_index.search(query, k=10, allowed=allowed)

    assert not seen.intersection(scann_index.item_ids(excluded)[0])
    assert (excluded != MISSING_POSITION).all()
    # The next five move up; approximate search may swap one at the boundary.
    assert len(set(scann_index.item_ids(excluded)[0][:5]) & set(scann_index.item_ids(top)[0][5:])) >= 4
    assert (masked != MISSING_POSITION).all()
    assert (masked % 2 == 0).all()


def test_scann_save_load_round_trip(
    tmp_path: Path, scann_index: ScannIndex, catalog: tuple[np.ndarray, list[str]]
) -> None:
    vectors, _ = catalog
    queries = vectors[100:120] + 0.05
    before = scann_index.search(queries, k=50)

    scann_index.save(tmp_path / "built")
    # Moving the directory must keep it loadable: the registry copies bundles around.
    (tmp_path / "built").rename(tmp_path / "moved")
    loaded = load_item_index(tmp_path / "moved")
    after = loaded.search(queries, k=50)

    assert isinstance(loaded, ScannIndex)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_allclose(before[1], after[1])
    assert loaded.ids == scann_index.ids
    assert loaded.metadata == scann_index.metadata
    written = json.loads((tmp_path / "moved" / "metadata.json").read_text())
    assert {"kind", "size", "dim", "config", "recall_at_100", "built_at"} <= written.keys()


def test_exact_save_load_round_trip(tmp_path: Path) -> None:
    vectors = clustered_vectors(300, 6, num_clusters=4)
    index = ExactIndex(vectors, item_ids(300))

    index.save(tmp_path)
    loaded = load_item_index(tmp_path)

    assert isinstance(loaded, ExactIndex)
    np.testing.assert_array_equal(index.search(vectors[:5], k=7)[0], loaded.search(vectors[:5], k=7)[0])
    assert loaded.metadata == index.metadata
    with pytest.raises(IndexFormatError, match="exact"):
        ScannIndex.load(tmp_path)


def test_load_refuses_incomplete_directory(tmp_path: Path) -> None:
    with pytest.raises(IndexFormatError, match=r"metadata\.json"):
        load_item_index(tmp_path)


# --- delta index ----------------------------------------------------------------------------------


def test_delta_makes_new_item_retrievable_at_once(scann_index: ScannIndex) -> None:
    delta = DeltaIndex(scann_index)
    rng = np.random.default_rng(3)
    new_vector = rng.standard_normal((1, 32)).astype(np.float32)
    new_vector /= np.linalg.norm(new_vector)

    started = time.perf_counter()
    delta.add_items(["brand-new"], new_vector)
    positions, scores = delta.search(new_vector, k=10)
    elapsed_s = time.perf_counter() - started

    assert delta.item_ids(positions)[0][0] == "brand-new"
    assert scores[0, 0] == pytest.approx(1.0, rel=1e-5)
    assert delta.size == scann_index.size + 1
    assert delta.position_of("brand-new") == scann_index.size
    assert elapsed_s < 1.0
    # The rest of the list still comes from the main index.
    assert all(item_id != "brand-new" for item_id in delta.item_ids(positions)[0][1:])


def test_delta_merges_by_score_and_replaces_updated_vectors() -> None:
    base = ExactIndex(np.eye(3, dtype=np.float32) * [3, 2, 1], ["a", "b", "c"])
    delta = DeltaIndex(base)
    query = np.ones(3, dtype=np.float32)

    delta.add_items(["d"], np.array([[2.5, 0, 0]], dtype=np.float32))
    assert delta.item_ids(delta.search(query, k=4)[0]) == [["a", "d", "b", "c"]]

    # "a" re-embedded: its base vector must not come back, its new one ranks last.
    delta.add_items(["a"], np.array([[0.5, 0, 0]], dtype=np.float32))
    positions, scores = delta.search(query, k=5)
    assert delta.item_ids(positions) == [["d", "b", "c", "a"]]
    np.testing.assert_allclose(scores[0, :4], [2.5, 2, 1, 0.5])

    # Updating a delta row replaces it too.
    delta.add_items(["d"], np.array([[0, 0, 0.1]], dtype=np.float32))
    assert delta.item_ids(delta.search(query, k=5)[0]) == [["b", "c", "a", "d"]]


def test_the_ann_retriever_names_base_and_delta_items_alike() -> None:
    from retrieval.sources.two_tower_ann_source import IndexEmbeddingRetriever

    base = ExactIndex(np.eye(3, dtype=np.float32) * [3, 2, 1], ["a", "b", "c"])
    delta = DeltaIndex(base)
    delta.add_items(["d"], np.array([[2.5, 0, 0]], dtype=np.float32))
    found = IndexEmbeddingRetriever(delta).retrieve(np.ones(3, dtype=np.float32), 6)
    assert found == [("a", 3.0), ("d", 2.5), ("b", 2.0), ("c", 1.0)]
    assert delta.ids.take([3, 0]) == ["d", "a"]  # type: ignore[attr-defined]


def test_delta_exclude_allowed_and_growth() -> None:
    base = ExactIndex(np.eye(2, dtype=np.float32), ["a", "b"])
    delta = DeltaIndex(base, max_items=3000)
    vectors = np.full((2000, 2), 0.01, dtype=np.float32)
    vectors[:, 0] += np.linspace(0, 1, 2000, dtype=np.float32)
    delta.add_items(item_ids(2000, "n"), vectors)  # grows past the initial capacity

    top = delta.item_ids(delta.search(np.array([1.0, 0.0]), k=3, exclude=[{"n1999", "a"}])[0])
    allowed = np.zeros(delta.size, dtype=bool)
    allowed[[1, 5]] = True
    masked = delta.item_ids(delta.search(np.array([1.0, 0.0]), k=3, allowed=allowed)[0])

    assert top == [["n1998", "n1997", "n1996"]]
    assert masked == [["n3", "b"]]
    with pytest.raises(DeltaIndexFullError):
        delta.add_items(item_ids(1001, "m"), np.zeros((1001, 2), dtype=np.float32))


@pytest.mark.parametrize(("start", "expected"), [(40, 20), (5, 20), (20, 20)])
def test_tuning_finds_smallest_leaves_reaching_target(start: int, expected: int) -> None:
    tried: list[int] = []

    def recall_at(leaves: int) -> float:
        tried.append(leaves)
        return min(1.0, leaves / 20 * 0.95)

    leaves, recall = tune_leaves_to_search(recall_at, start, num_leaves=100, target=0.95)

    assert recall >= 0.95
    # Geometric steps land within one step (x1.25) of the smallest passing value.
    assert expected <= leaves <= math.ceil(expected * 1.25)
    assert len(tried) <= 10


def test_tuning_stops_at_all_leaves_when_target_is_out_of_reach() -> None:
    leaves, recall = tune_leaves_to_search(lambda leaves: 0.5, 3, num_leaves=10, target=0.95)

    assert (leaves, recall) == (10, 0.5)
