"""Choose, build and load the right item index for a catalog: exact when small, ScaNN otherwise."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from retrieval import index_files
from retrieval.ann_config import AnnConfig
from retrieval.exact_index import ExactIndex
from retrieval.item_index import IndexKind
from retrieval.scann_index import ScannIndex


def build_item_index(
    embeddings: NDArray[np.floating],
    ids: Sequence[str],
    config: AnnConfig | None = None,
    *,
    sample_queries: NDArray[np.floating] | None = None,
) -> ExactIndex | ScannIndex:
    """Index a catalog: an ``ExactIndex`` below ``config.exact_below_items``, else a ``ScannIndex``.

    Args:
        embeddings: ``(num_items, dim)`` item vectors; row ``p`` is ``ids[p]``.
        ids: Unique item ids.
        config: ANN parameters; derived from the catalog size when omitted.
        sample_queries: User-like queries for the ScaNN build's tuning and recall measurement.

    Returns:
        The index; its ``metadata`` holds the kind, config and recall@100.
    """
    matrix = np.asarray(embeddings)
    if matrix.ndim != 2:
        raise ValueError(f"embeddings must be (num_items, dim), got {matrix.shape}")
    num_items, dim = matrix.shape
    if num_items == 0:
        return ExactIndex(matrix, ids)
    config = config or AnnConfig.from_catalog_size(num_items, dim)
    if config.uses_exact(num_items):
        return ExactIndex(matrix, ids)
    return ScannIndex.build(matrix, ids, config, sample_queries=sample_queries)


def load_item_index(directory: str | os.PathLike[str]) -> ExactIndex | ScannIndex:
    """Load whichever index a directory holds, by the kind in its metadata.

    Args:
        directory: A directory written by ``ExactIndex.save`` or ``ScannIndex.save``.

    Returns:
        The index.

    Raises:
        IndexFormatError: The directory holds no complete index.
    """
    metadata = index_files.read_metadata(directory)
    if metadata.kind == IndexKind.EXACT:
        return ExactIndex.load(directory)
    assert metadata.kind == IndexKind.SCANN, f"unhandled index kind {metadata.kind}"
    return ScannIndex.load(directory)
