"""Brute-force maximum-inner-product search: the ground truth, and the index of small catalogs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import numpy as np
from numpy.typing import NDArray

from retrieval import index_files
from retrieval.item_index import (
    Embeddings,
    ExcludeIds,
    IndexKind,
    IndexMetadata,
    ItemIndex,
    Positions,
    SearchResult,
    empty_result,
    top_k_by_score,
)

DEFAULT_BLOCK_CELLS: Final = 1 << 24
"""Score-matrix cells computed at once (64 MiB of float32): bounds memory for large query batches."""


def as_embeddings(embeddings: NDArray[np.floating], ids: Sequence[str]) -> Embeddings:
    """Validate item embeddings against their ids and return them as C-contiguous float32.

    Args:
        embeddings: ``(num_items, dim)`` vectors.
        ids: Item ids, one per row, unique.

    Returns:
        The embeddings; the same array when it is already float32 and C-contiguous.

    Raises:
        ValueError: Wrong shape, non-finite values, or ids that do not match the rows or repeat.
    """
    matrix = np.ascontiguousarray(embeddings, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[1] < 1:
        raise ValueError(f"embeddings must be (num_items, dim), got {np.shape(embeddings)}")
    if matrix.shape[0] != len(ids):
        raise ValueError(f"{matrix.shape[0]} embeddings for {len(ids)} ids")
    if len(set(ids)) != len(ids):
        raise ValueError("item ids must be unique")
    if not np.isfinite(matrix).all():
        raise ValueError("embeddings hold NaN or infinite values")
    return matrix


class ExactIndex(ItemIndex):
    """Exact maximum-inner-product search by matrix product and partial sort.

    Queries are scored in blocks of ``block_cells`` score cells, so a large batch against a large
    catalog never materialises the whole ``(num_queries, size)`` matrix.

    Example:
        >>> index = ExactIndex(np.eye(3, dtype=np.float32), ["a", "b", "c"])
        >>> positions, scores = index.search(np.array([[0.0, 2.0, 1.0]]), k=2)
        >>> index.item_ids(positions)
        [['b', 'c']]
    """

    def __init__(
        self,
        embeddings: NDArray[np.floating],
        ids: Sequence[str],
        *,
        built_at: datetime | None = None,
        block_cells: int = DEFAULT_BLOCK_CELLS,
    ) -> None:
        """Index ``embeddings``; row ``p`` is the item ``ids[p]``.

        Args:
            embeddings: ``(num_items, dim)`` vectors; kept by reference when already float32.
            ids: Unique item ids, one per row.
            built_at: Build time recorded in the metadata; now when omitted.
            block_cells: Score cells computed per block.
        """
        self._embeddings = as_embeddings(embeddings, ids)
        self._ids: tuple[str, ...] = tuple(ids)
        self._built_at = built_at or datetime.now(UTC)
        assert block_cells >= 1, f"block_cells must be positive, got {block_cells}"
        self._block_cells = block_cells

    @property
    def ids(self) -> Sequence[str]:
        """Item ids by position."""
        return self._ids

    @property
    def dim(self) -> int:
        """Embedding width."""
        return int(self._embeddings.shape[1])

    @property
    def embeddings(self) -> Embeddings:
        """The indexed vectors, ``(size, dim)`` float32; read-only by convention."""
        return self._embeddings

    @property
    def metadata(self) -> IndexMetadata:
        """What :meth:`save` writes beside the vectors."""
        return IndexMetadata(
            kind=IndexKind.EXACT,
            size=self.size,
            dim=self.dim,
            config=None,
            recall_at_100=1.0,
            built_at=self._built_at,
        )

    def search(
        self,
        queries: NDArray[np.floating],
        k: int,
        *,
        exclude: ExcludeIds | None = None,
        allowed: NDArray[np.bool_] | None = None,
    ) -> SearchResult:
        """The ``k`` items with the highest inner product with each query.

        Args:
            queries: ``(num_queries, dim)``, or ``(dim,)`` for one query.
            k: Results per query.
            exclude: Per query, item ids never returned for it.
            allowed: ``(size,)`` mask; only items where it is true are returned.

        Returns:
            ``(positions, scores)`` of shape ``(num_queries, k)``, best first; slots beyond the
            eligible items are ``MISSING_POSITION`` / ``-inf``.
        """
        batch = self._check_queries(queries, k)
        mask = self._check_allowed(allowed)
        excluded = self._exclude_positions(exclude, batch.shape[0])
        if k == 0 or self.size == 0:
            return empty_result(batch.shape[0], k)
        matrix, columns, blocked = self._candidates(mask)
        local_excluded = None if excluded is None else [_local_columns(skip, columns) for skip in excluded]
        return score_top_k(
            batch,
            matrix,
            k,
            blocked=blocked,
            excluded=local_excluded,
            columns=columns,
            block_cells=self._block_cells,
        )

    def _candidates(
        self, mask: NDArray[np.bool_] | None
    ) -> tuple[Embeddings, Positions | None, Positions | None]:
        """The rows to score, the positions they stand for, and columns to blank after scoring."""
        if mask is None:
            return self._embeddings, None, None
        kept = np.flatnonzero(mask).astype(np.int64)
        if 2 * kept.size <= self.size:
            # A selective mask: copying the few allowed rows costs less than scoring the whole catalog.
            return self._embeddings[kept], kept, None
        # A permissive mask: copying most of the catalog per call would cost more than blanking.
        return self._embeddings, None, np.flatnonzero(~mask)

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the index to a local directory (see ``index_files`` for the layout).

        Args:
            directory: Target directory; created if missing, files in it overwritten.
        """
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        np.save(path / index_files.EMBEDDINGS_FILE, self._embeddings)
        index_files.write_ids(path, self._ids)
        index_files.write_metadata(path, self.metadata)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, mmap: bool = False) -> ExactIndex:
        """Read an index written by :meth:`save`.

        Args:
            directory: Index directory.
            mmap: Memory-map the vectors instead of reading them, so replicas on one host share pages.

        Returns:
            The index.

        Raises:
            IndexFormatError: The directory holds no exact index, or its files disagree.
        """
        path = Path(directory)
        metadata = index_files.read_metadata(path, IndexKind.EXACT)
        embeddings = np.load(path / index_files.EMBEDDINGS_FILE, mmap_mode="r" if mmap else None)
        ids = index_files.read_ids(path)
        if embeddings.shape != (metadata.size, metadata.dim) or len(ids) != metadata.size:
            raise index_files.IndexFormatError(
                f"{directory}: metadata says ({metadata.size}, {metadata.dim}), "
                f"files hold {embeddings.shape} vectors and {len(ids)} ids"
            )
        return cls(embeddings, ids, built_at=metadata.built_at)


def _local_columns(skip: Positions, columns: Positions | None) -> Positions:
    """Map excluded positions to score columns when only a subset of rows was scored."""
    if columns is None or skip.size == 0:
        return skip
    where = np.minimum(np.searchsorted(columns, skip), columns.size - 1).astype(np.int64)
    local: Positions = where[columns[where] == skip]
    return local


def score_top_k(
    queries: Embeddings,
    matrix: Embeddings,
    k: int,
    *,
    blocked: Positions | None = None,
    excluded: Sequence[Positions] | None = None,
    columns: Positions | None = None,
    block_cells: int = DEFAULT_BLOCK_CELLS,
) -> SearchResult:
    """Exact top-``k`` inner products of ``queries`` against the rows of ``matrix``, in query blocks.

    Args:
        queries: ``(num_queries, dim)`` float32.
        matrix: ``(rows, dim)`` float32 vectors to score.
        k: Results per query.
        blocked: Rows of ``matrix`` no query may return.
        excluded: Per query, rows of ``matrix`` that query may not return.
        columns: Position each row of ``matrix`` stands for; row ``j`` is position ``j`` when omitted.
        block_cells: Score cells computed per block.

    Returns:
        ``(positions, scores)`` of shape ``(num_queries, k)``, best first.
    """
    assert queries.shape[1] == matrix.shape[1], (
        f"queries of dim {queries.shape[1]}, vectors of dim {matrix.shape[1]}"
    )
    assert excluded is None or len(excluded) == queries.shape[0], "one exclusion list per query"
    positions, scores = empty_result(queries.shape[0], k)
    if k == 0 or matrix.shape[0] == 0:
        return positions, scores
    rows_per_block = max(1, block_cells // matrix.shape[0])
    for start in range(0, queries.shape[0], rows_per_block):
        stop = min(start + rows_per_block, queries.shape[0])
        block = queries[start:stop] @ matrix.T
        if blocked is not None and blocked.size:
            block[:, blocked] = -np.inf
        if excluded is not None:
            for row, skip in enumerate(excluded[start:stop]):
                block[row, skip] = -np.inf
        positions[start:stop], scores[start:stop] = top_k_by_score(block, k, columns)
    return positions, scores
