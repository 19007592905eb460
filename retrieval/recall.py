"""Recall of an approximate index against exact search, and the sample queries it is measured on."""

from __future__ import annotations

from typing import Final

import numpy as np
from numpy.typing import NDArray

from retrieval.item_index import MISSING_POSITION, Embeddings, ItemIndex, Positions

DEFAULT_NOISE_RATIO: Final = 0.5
"""Query noise norm relative to the mean item norm: user vectors sit near, not on, their items."""


def sample_queries_from_items(
    embeddings: NDArray[np.floating],
    num_queries: int,
    *,
    noise_ratio: float = DEFAULT_NOISE_RATIO,
    seed: int = 0,
) -> Embeddings:
    """Draw user-like queries: random item vectors plus isotropic gaussian noise.

    Used when no logged user embeddings are at hand; querying with the item vectors themselves
    would overstate recall, since each query's best match would sit exactly on a stored point.

    Args:
        embeddings: ``(num_items, dim)`` item vectors.
        num_queries: Queries to draw (capped at ``num_items``, drawn without replacement).
        noise_ratio: Expected noise norm as a fraction of the mean item norm.
        seed: Random seed.

    Returns:
        ``(min(num_queries, num_items), dim)`` float32 queries.
    """
    items = np.asarray(embeddings, dtype=np.float32)
    assert items.ndim == 2 and items.shape[0] > 0, f"need a non-empty (n, dim) matrix, got {items.shape}"
    rng = np.random.default_rng(seed)
    count = min(num_queries, items.shape[0])
    picked = items[rng.choice(items.shape[0], size=count, replace=False)]
    dim = items.shape[1]
    mean_norm = float(np.linalg.norm(picked, axis=1).mean())
    noise = rng.standard_normal((count, dim), dtype=np.float32) * (noise_ratio * mean_norm / np.sqrt(dim))
    queries: Embeddings = np.asarray(picked + noise, dtype=np.float32)
    return queries


def recall_against(approx: Positions, truth: Positions) -> float:
    """Mean fraction of each query's true neighbours that the approximate result holds.

    Args:
        approx: ``(num_queries, k)`` positions from the index under test.
        truth: ``(num_queries, k)`` positions from exact search.

    Returns:
        Recall in ``[0, 1]``; 1.0 when there is nothing to find.
    """
    assert approx.shape[0] == truth.shape[0], f"{approx.shape[0]} results for {truth.shape[0]} truths"
    hits = 0
    wanted = 0
    for got, want in zip(approx, truth, strict=True):
        want_set = set(want[want != MISSING_POSITION].tolist())
        wanted += len(want_set)
        hits += len(want_set.intersection(got[got != MISSING_POSITION].tolist()))
    return 1.0 if wanted == 0 else hits / wanted


def measure_recall(
    index: ItemIndex,
    exact: ItemIndex,
    sample_queries: NDArray[np.floating],
    k: int = 100,
) -> float:
    """Recall@k of ``index`` against ``exact`` on ``sample_queries``.

    Args:
        index: Index under test.
        exact: Exact index over the same items in the same positions.
        sample_queries: ``(num_queries, dim)`` queries, user-like when possible.
        k: Neighbours compared per query.

    Returns:
        Mean recall@k in ``[0, 1]``.
    """
    assert index.size == exact.size and index.dim == exact.dim, (
        f"indexes differ: {index.size}x{index.dim} vs exact {exact.size}x{exact.dim}"
    )
    truth, _ = exact.search(sample_queries, k)
    approx, _ = index.search(sample_queries, k)
    return recall_against(approx, truth)
