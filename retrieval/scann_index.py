"""ScaNN approximate maximum-inner-product search over a large item catalog.

The build trains a k-means tree and an anisotropic asymmetric-hashing quantiser, then tunes
``leaves_to_search`` on sample queries until recall@100 against exact search reaches the
config's target, and records the tuned value and the measured recall in the metadata.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import scann
from numpy.typing import NDArray

from retrieval import index_files
from retrieval.ann_config import MIN_ANN_ITEMS, AnnConfig
from retrieval.exact_index import ExactIndex, as_embeddings
from retrieval.item_index import (
    MISSING_POSITION,
    ExcludeIds,
    IndexKind,
    IndexMetadata,
    ItemIndex,
    Positions,
    SearchResult,
    empty_result,
    top_k_by_score,
)
from retrieval.recall import recall_against, sample_queries_from_items

logger = logging.getLogger(__name__)

RECALL_K: Final = 100
"""The k of the recall recorded in the metadata."""

_TUNE_STEP: Final = 1.25
"""Ratio between successive ``leaves_to_search`` values tried while tuning."""

_MIN_ALLOWED_FRACTION: Final = 1e-3
"""Floor of the allowed fraction used to size the over-fetch for a mask."""

_ALLOWED_FETCH_MARGIN: Final = 2.0
"""Over-fetch multiplier on top of the inverse mask density."""


class ScannIndex(ItemIndex):
    """Approximate maximum-inner-product search with ScaNN (tree + AH + exact reordering).

    Scores returned are exact inner products (the reordering step rescores candidates with the
    float vectors), so results merge by score with an exact index's, as ``DeltaIndex`` does.
    ``exclude`` and ``allowed`` are applied after the search over an enlarged candidate set, so a
    very selective mask can leave slots unfilled; search a selective subset with ``ExactIndex``.
    """

    def __init__(self, searcher: Any, ids: Sequence[str], metadata: IndexMetadata) -> None:
        """Wrap a built or loaded searcher; use :meth:`build` or :meth:`load` instead.

        Args:
            searcher: A ``scann_ops_pybind.ScannSearcher`` over the items in position order.
            ids: Item ids by position.
            metadata: Its metadata; ``config`` must be set.
        """
        assert metadata.kind == IndexKind.SCANN, f"metadata of a {metadata.kind} index"
        assert metadata.config is not None, "a ScaNN index needs its AnnConfig"
        assert metadata.size == len(ids), f"metadata says {metadata.size} items, {len(ids)} ids given"
        self._searcher = searcher
        self._ids: tuple[str, ...] = tuple(ids)
        self._metadata = metadata
        self._config: AnnConfig = metadata.config

    @property
    def ids(self) -> Sequence[str]:
        """Item ids by position."""
        return self._ids

    @property
    def dim(self) -> int:
        """Embedding width."""
        return self._metadata.dim

    @property
    def config(self) -> AnnConfig:
        """The build config, with the tuned ``leaves_to_search``."""
        return self._config

    @property
    def metadata(self) -> IndexMetadata:
        """Kind, size, dim, config, build-time recall@100 and build time."""
        return self._metadata

    @classmethod
    def build(
        cls,
        embeddings: NDArray[np.floating],
        ids: Sequence[str],
        config: AnnConfig | None = None,
        *,
        sample_queries: NDArray[np.floating] | None = None,
        training_threads: int = 0,
    ) -> ScannIndex:
        """Train a ScaNN index, tune ``leaves_to_search`` and measure its recall@100.

        Args:
            embeddings: ``(num_items, dim)`` item vectors; row ``p`` is ``ids[p]``.
            ids: Unique item ids.
            config: Parameters; derived from the catalog size when omitted.
            sample_queries: User-like queries for tuning and recall; when omitted, item vectors
                plus noise (``sample_queries_from_items``).
            training_threads: Threads for training; 0 lets ScaNN use every core.

        Returns:
            The index, its metadata holding the tuned config and the measured recall@100.

        Raises:
            ValueError: Invalid embeddings, fewer than ``MIN_ANN_ITEMS`` items, or a config built
                for another width.
        """
        matrix = as_embeddings(embeddings, ids)
        num_items, dim = matrix.shape
        config = config or AnnConfig.from_catalog_size(num_items, dim)
        if config.dim != dim:
            raise ValueError(f"config is for dim {config.dim}, embeddings have dim {dim}")
        if num_items < MIN_ANN_ITEMS:
            raise ValueError(f"ScaNN needs at least {MIN_ANN_ITEMS} items, got {num_items}; use ExactIndex")
        if config.num_leaves > num_items:
            raise ValueError(f"num_leaves ({config.num_leaves}) exceeds the catalog size ({num_items})")

        searcher = (
            scann.scann_ops_pybind.builder(matrix, config.num_neighbors, "dot_product")
            .tree(
                num_leaves=config.num_leaves,
                num_leaves_to_search=config.leaves_to_search,
                training_sample_size=min(config.training_sample_size, num_items),
            )
            .score_ah(
                config.dims_per_block,
                anisotropic_quantization_threshold=config.anisotropic_quantization_threshold,
            )
            .reorder(config.pre_reorder_neighbors(config.num_neighbors))
            .set_n_training_threads(training_threads)
            .build()
        )
        if sample_queries is None:
            queries = sample_queries_from_items(matrix, config.recall_queries, seed=config.seed)
        else:
            queries = np.ascontiguousarray(sample_queries, dtype=np.float32)
        exact = ExactIndex(matrix, ids)
        truth, _ = exact.search(queries, RECALL_K)
        built_at = datetime.now(UTC)

        def with_leaves(leaves: int, recall: float) -> ScannIndex:
            metadata = IndexMetadata(
                kind=IndexKind.SCANN,
                size=num_items,
                dim=dim,
                config=config.model_copy(update={"leaves_to_search": leaves}),
                recall_at_100=recall,
                built_at=built_at,
            )
            return cls(searcher, ids, metadata)

        def recall_at(leaves: int) -> float:
            found, _ = with_leaves(leaves, 0.0).search(queries, RECALL_K)
            return recall_against(found, truth)

        if config.tune_leaves_to_search:
            leaves, recall = tune_leaves_to_search(
                recall_at, config.leaves_to_search, config.num_leaves, config.target_recall_at_100
            )
        else:
            leaves, recall = config.leaves_to_search, recall_at(config.leaves_to_search)
        if recall < config.target_recall_at_100:
            logger.warning(
                "ScaNN index over %d items reaches recall@100 %.3f < target %.3f at %d/%d leaves",
                num_items,
                recall,
                config.target_recall_at_100,
                leaves,
                config.num_leaves,
            )
        return with_leaves(leaves, recall)

    def search(
        self,
        queries: NDArray[np.floating],
        k: int,
        *,
        exclude: ExcludeIds | None = None,
        allowed: NDArray[np.bool_] | None = None,
        leaves_to_search: int | None = None,
    ) -> SearchResult:
        """The ``k`` items with (approximately) the highest inner product with each query.

        Args:
            queries: ``(num_queries, dim)``, or ``(dim,)`` for one query.
            k: Results per query.
            exclude: Per query, item ids never returned for it; the search over-fetches by the
                longest list so the rest still fill ``k`` slots.
            allowed: ``(size,)`` mask; the search over-fetches by twice the inverse of its density.
            leaves_to_search: Override of the config's value for this call (benchmarks, tuning).

        Returns:
            ``(positions, scores)`` of shape ``(num_queries, k)``, best first, unfilled slots
            ``MISSING_POSITION`` / ``-inf``.
        """
        batch = self._check_queries(queries, k)
        mask = self._check_allowed(allowed)
        excluded = self._exclude_positions(exclude, batch.shape[0])
        if k == 0 or self.size == 0:
            return empty_result(batch.shape[0], k)
        leaves = self._config.leaves_to_search if leaves_to_search is None else leaves_to_search
        if not 1 <= leaves <= self._config.num_leaves:
            raise ValueError(f"leaves_to_search must be in [1, {self._config.num_leaves}], got {leaves}")

        fetch = k + (max((skip.size for skip in excluded), default=0) if excluded is not None else 0)
        if mask is not None:
            density = max(float(mask.mean()), _MIN_ALLOWED_FRACTION)
            # fetch / density candidates hold only fetch allowed ones on average, so about half
            # the queries would come back short; the margin makes a shortfall rare.
            fetch = math.ceil(_ALLOWED_FETCH_MARGIN * fetch / density)
        fetch = min(fetch, self.size)
        # Extra candidates reserved for filtering need no extra reordering headroom of their own.
        pre_reorder = self._config.pre_reorder_neighbors(k) + (fetch - k)
        positions, scores = self._raw_search(batch, fetch, pre_reorder, leaves)

        if excluded is None and mask is None:
            return _pad(positions, scores, k)
        if mask is not None:
            # The sentinel -1 reads the last entry of the mask, so unfilled slots are forced out.
            scores[~mask[positions] | (positions == MISSING_POSITION)] = -np.inf
        if excluded is not None:
            for row, skip in enumerate(excluded):
                if skip.size:
                    scores[row, np.isin(positions[row], skip)] = -np.inf
        return top_k_by_score(scores, k, positions)

    def _raw_search(
        self, batch: NDArray[np.float32], fetch: int, pre_reorder: int, leaves: int
    ) -> SearchResult:
        if batch.shape[0] == 1:
            # One query skips the batch machinery: the serving path asks for one user at a time.
            found, dist = self._searcher.search(batch[0], fetch, pre_reorder, leaves)
            found, dist = found[np.newaxis, :], dist[np.newaxis, :]
        else:
            found, dist = self._searcher.search_batched_parallel(batch, fetch, pre_reorder, leaves)
        positions = np.asarray(found, dtype=np.int64)
        scores = np.array(dist, dtype=np.float32)
        # ScaNN pads rows it cannot fill with position 0 and a NaN score.
        unfilled = np.isnan(scores)
        positions[unfilled] = MISSING_POSITION
        scores[unfilled] = -np.inf
        return positions, scores

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the index to a local directory (see ``index_files`` for the layout).

        Args:
            directory: Target directory; created if missing, files in it overwritten.
        """
        path = Path(directory)
        scann_dir = path / index_files.SCANN_DIR
        scann_dir.mkdir(parents=True, exist_ok=True)
        # Relative asset paths keep the directory loadable after the registry moves or copies it.
        self._searcher.serialize(str(scann_dir), relative_path=True)
        index_files.write_ids(path, self._ids)
        index_files.write_metadata(path, self._metadata)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> ScannIndex:
        """Read an index written by :meth:`save`.

        Args:
            directory: Index directory.

        Returns:
            The index, with the tuned config and recall from its build.

        Raises:
            IndexFormatError: The directory holds no ScaNN index, or its files disagree.
        """
        path = Path(directory)
        metadata = index_files.read_metadata(path, IndexKind.SCANN)
        searcher = scann.scann_ops_pybind.load_searcher(str(path / index_files.SCANN_DIR))
        ids = index_files.read_ids(path)
        if len(ids) != metadata.size or searcher.size() != metadata.size:
            raise index_files.IndexFormatError(
                f"{directory}: metadata says {metadata.size} items, "
                f"searcher holds {searcher.size()} and the id file {len(ids)}"
            )
        return cls(searcher, ids, metadata)


def tune_leaves_to_search(
    recall_at: Callable[[int], float],
    start: int,
    num_leaves: int,
    target: float,
) -> tuple[int, float]:
    """Find a small ``leaves_to_search`` whose recall reaches ``target``, by geometric steps.

    Steps down from ``start`` while the target still holds, or up until it does (or every leaf is
    searched). Recall grows with the leaves searched, so the first crossing is kept.

    Args:
        recall_at: ``leaves -> recall`` on the sample queries.
        start: First value tried.
        num_leaves: Upper bound.
        target: Recall to reach.

    Returns:
        ``(leaves_to_search, recall)``; recall may stay below target when even every leaf misses it.
    """
    leaves = min(max(1, start), num_leaves)
    recall = recall_at(leaves)
    if recall >= target:
        while leaves > 1:
            lower = max(1, math.floor(leaves / _TUNE_STEP))
            lower_recall = recall_at(lower)
            if lower_recall < target:
                break
            leaves, recall = lower, lower_recall
        return leaves, recall
    while recall < target and leaves < num_leaves:
        leaves = min(num_leaves, math.ceil(leaves * _TUNE_STEP))
        recall = recall_at(leaves)
    return leaves, recall


def _pad(positions: Positions, scores: NDArray[np.float32], k: int) -> SearchResult:
    """Widen a result to ``k`` columns when the catalog holds fewer than ``k`` items."""
    if positions.shape[1] >= k:
        return positions[:, :k], scores[:, :k]
    out_positions, out_scores = empty_result(positions.shape[0], k)
    out_positions[:, : positions.shape[1]] = positions
    out_scores[:, : scores.shape[1]] = scores
    return out_positions, out_scores
