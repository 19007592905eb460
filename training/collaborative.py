"""The collaborative retrieval model: EASE over the catalog rows of a release.

EASE (Steck, WWW 2019) is an item-item weight matrix in closed form: with ``X`` the binary
user-item matrix of the training positives and ``P = (XᵀX + λI)⁻¹``, ``B = I - P · diag(1/diag(P))``
(zero diagonal). A user's score for every item is ``x_u B``: the sum of the rows of ``B`` of the
items in the user's history. That is all serving needs, so a user who likes something new gets new
scores on the very next request, without any user state in the model.

The matrix is dense (``4 · n²`` bytes), so a release carries it (``cf_ease.npy``) only when the
catalog has at most :data:`MAX_ITEMS` items; above that the release says so in its manifest and
retrieval and ranking run without the collaborative signal.

The same :class:`CollaborativeModel` scores offline (evaluation, ranker training lists) and online
(the ``collaborative`` source and the ranker's features), so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

CF_FILE: Final = "cf_ease.npy"
"""File name of the EASE weights in a release bundle."""

MAX_ITEMS: Final = 10_000
"""Largest catalog whose EASE matrix is fitted and shipped (400 MB in float32 at this size)."""


def fit_ease(user_rows: IntArray, item_rows: IntArray, n_items: int, l2: float) -> FloatArray:
    """EASE weights of a set of (user, item) positives.

    Args:
        user_rows: User of each positive (any integer coding; only equality matters).
        item_rows: Catalog row of each positive, in ``[0, n_items)``.
        n_items: Catalog size (items without positives get zero rows and columns).
        l2: Positive ridge penalty λ.

    Returns:
        The ``(n_items, n_items)`` float32 matrix ``B``, zero on the diagonal.

    Raises:
        ValueError: ``l2`` is not positive or the catalog exceeds :data:`MAX_ITEMS`.
    """
    if l2 <= 0:
        raise ValueError(f"l2 must be positive, got {l2}")
    if n_items > MAX_ITEMS:
        raise ValueError(f"EASE is limited to {MAX_ITEMS} items, the catalog has {n_items}")
    users, user_codes = np.unique(user_rows, return_inverse=True)
    matrix = sp.csr_matrix(
        (np.ones(len(item_rows), dtype=np.float64), (user_codes, item_rows)), shape=(len(users), n_items)
    )
    # Duplicate pairs would count twice; the model is over the binary matrix.
    matrix.data[:] = 1.0
    matrix.sum_duplicates()
    matrix.data = np.minimum(matrix.data, 1.0)
    # Double precision for the inverse: float32 loses the small off-diagonal weights.
    gram = np.asarray((matrix.T @ matrix).toarray(), dtype=np.float64)
    gram[np.diag_indices(n_items)] += l2
    precision = np.linalg.inv(gram)
    weights = precision / -np.diag(precision)[None, :]
    weights[np.diag_indices(n_items)] = 0.0
    return weights.astype(np.float32)


@dataclass(frozen=True, eq=False)
class CollaborativeModel:
    """EASE weights over catalog rows, and the scoring every consumer shares.

    Attributes:
        weights: ``(n_items, n_items)`` float32 ``B``; row ``i`` is what item ``i`` in a history
            adds to every item's score.
    """

    weights: FloatArray

    @property
    def n_items(self) -> int:
        """Catalog rows the model covers."""
        return int(self.weights.shape[0])

    @classmethod
    def fit(cls, user_rows: IntArray, item_rows: IntArray, n_items: int, l2: float) -> CollaborativeModel:
        """Fit on (user, catalog row) positives (see :func:`fit_ease`)."""
        return cls(fit_ease(user_rows, item_rows, n_items, l2))

    def scores(self, histories: Sequence[IntArray]) -> FloatArray:
        """Every item's score for each history, with the history's own items set to ``-inf``.

        Args:
            histories: Per user, the catalog rows of the history (``-1`` entries are ignored).

        Returns:
            ``(len(histories), n_items)`` scores; items already in a history cannot be candidates.
        """
        n = self.n_items
        lengths = [int(np.count_nonzero(h >= 0)) for h in histories]
        rows = np.repeat(np.arange(len(histories), dtype=np.int64), lengths)
        cols = (
            np.concatenate([h[h >= 0] for h in histories]).astype(np.int64)
            if histories
            else np.zeros(0, dtype=np.int64)
        )
        indicator = sp.csr_matrix(
            (np.ones(len(cols), dtype=np.float32), (rows, cols)), shape=(len(histories), n)
        )
        indicator.sum_duplicates()
        indicator.data = np.minimum(indicator.data, 1.0)
        out = np.asarray(indicator @ self.weights, dtype=np.float32)
        out[rows, cols] = -np.inf
        return out

    def save(self, directory: str | Path) -> None:
        """Write ``cf_ease.npy`` into a bundle directory."""
        np.save(Path(directory) / CF_FILE, self.weights.astype(np.float32))

    @classmethod
    def load(cls, path: str | Path) -> CollaborativeModel:
        """Read a file written by :meth:`save`."""
        return cls(np.load(path).astype(np.float32, copy=False))


def ranks_of(scores: FloatArray) -> FloatArray:
    """The 1-based rank of every item in each row's descending order (``-inf`` items rank last).

    Args:
        scores: ``(batch, n_items)`` scores from :meth:`CollaborativeModel.scores`.

    Returns:
        ``(batch, n_items)`` ranks as float32 (ties broken by catalog row).
    """
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(1, scores.shape[1] + 1)[None, :], axis=1)
    return ranks.astype(np.float32)


def candidate_features(scores: FloatArray, rows: IntArray) -> tuple[FloatArray, FloatArray]:
    """EASE score and 1-based EASE rank of some candidates of one user.

    Args:
        scores: ``(n_items,)`` one row of :meth:`CollaborativeModel.scores`.
        rows: Catalog rows of the candidates.

    Returns:
        ``(score, rank)`` per candidate; an item of the history (``-inf``) gets score 0 and the
        last rank.
    """
    ordered = np.sort(scores)
    picked = scores[rows]
    finite = np.isfinite(picked)
    # Rank = 1 + items scoring strictly higher; -inf items all come after every finite one.
    rank = (len(scores) - np.searchsorted(ordered, picked, side="right") + 1).astype(np.float32)
    rank[~finite] = float(len(scores))
    return np.where(finite, picked, 0.0).astype(np.float32), rank


def top_items(scores: FloatArray, k: int) -> IntArray:
    """The ``k`` best rows of each score row, best first (``-1`` where fewer are finite).

    Args:
        scores: ``(batch, n_items)`` scores.
        k: How many.

    Returns:
        ``(batch, k)`` catalog rows.
    """
    k_eff = min(k, scores.shape[1])
    if k_eff < scores.shape[1]:
        part = np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff]
    else:
        part = np.tile(np.arange(scores.shape[1]), (scores.shape[0], 1))
    picked = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-picked, axis=1, kind="stable")
    top = np.take_along_axis(part, order, axis=1).astype(np.int64)
    top[~np.isfinite(np.take_along_axis(picked, order, axis=1))] = -1
    out = np.full((scores.shape[0], k), -1, dtype=np.int64)
    out[:, :k_eff] = top
    return out


__all__ = [
    "CF_FILE",
    "MAX_ITEMS",
    "CollaborativeModel",
    "candidate_features",
    "fit_ease",
    "ranks_of",
    "top_items",
]
