"""Baselines every trained model is compared with on the same split.

* :class:`MostPop`: item popularity in train, the same list for everyone. A model that does not beat
  it is not personalising.
* :class:`ItemKNN`: cosine similarity between items' user sets, pruned to each item's nearest
  neighbours; a user's score for an item sums its similarity to the user's items.
* :class:`EASE`: Steck's closed-form linear autoencoder (WWW 2019), a strong shallow baseline on
  MovieLens-sized data.

All three fit on a :class:`~training.evaluation.splits.Interactions` and score dense
``(batch, n_items)`` matrices, the contract of :func:`~training.evaluation.metrics.evaluate_scores`.
:class:`ItemKNN` and :class:`EASE` keep a dense item-item matrix (``4 * n_items**2`` bytes once fitted,
a few times that while fitting), so they refuse catalogues above ``max_items``.
"""

from __future__ import annotations

from typing import Any, Final, Protocol, Self, TypeVar

import numpy as np
import numpy.typing as npt

from training.evaluation.splits import IntArray, Interactions

FloatMatrix = npt.NDArray[np.float32]
_T = TypeVar("_T")

DEFAULT_MAX_ITEMS: Final = 20_000
"""Largest catalogue the dense item-item models accept unless told otherwise (about 1.6 GB per matrix)."""


class TooManyItemsError(ValueError):
    """Raised when a dense item-item model is asked to fit a catalogue above its ``max_items``."""


class Recommender(Protocol):
    """What the evaluation needs of a model: fit on train, then score users against every item."""

    name: str

    def fit(self, train: Interactions) -> Self:
        """Learn from the training interactions; returns the fitted model."""
        ...

    def score(self, user_indices: IntArray) -> FloatMatrix:
        """Scores of every item for each user, shape ``(len(user_indices), n_items)``."""
        ...


class MostPop:
    """Ranks items by how many training users have them, identically for every user."""

    name = "most_pop"

    def __init__(self) -> None:
        self._popularity: FloatMatrix | None = None

    def fit(self, train: Interactions) -> Self:
        """Count each item's training users.

        Args:
            train: Training interactions.

        Returns:
            This model, fitted.
        """
        self._popularity = train.item_counts().astype(np.float32)
        return self

    def score(self, user_indices: IntArray) -> FloatMatrix:
        """Popularity of every item, one identical row per user.

        Args:
            user_indices: Users to score.

        Returns:
            A new ``(len(user_indices), n_items)`` array.
        """
        popularity = _fitted(self._popularity, self.name)
        return np.tile(popularity, (len(user_indices), 1))


class ItemKNN:
    """Item-based nearest neighbours on the binary user-item matrix.

    ``sim(i, j) = |U_i ∩ U_j| / (sqrt(|U_i|) * sqrt(|U_j|) + shrink)``, where ``U_i`` is the set of
    training users of item ``i``. Each item keeps only its ``k_neighbours`` most similar items; a
    user's score for item ``j`` is the sum of ``sim(i, j)`` over the user's items ``i`` that kept ``j``.
    Shrinkage pulls similarities resting on few co-occurrences towards zero.

    Attributes:
        k_neighbours: Neighbours kept per item.
        shrink: Added to the cosine denominator; 0 gives plain cosine.
        max_items: Largest catalogue accepted.
    """

    name = "item_knn"

    def __init__(
        self,
        k_neighbours: int = 100,
        shrink: float = 0.0,
        *,
        max_items: int = DEFAULT_MAX_ITEMS,
        batch_users: int = 2048,
    ) -> None:
        """Configure the model.

        Args:
            k_neighbours: Neighbours kept per item.
            shrink: Non-negative shrinkage added to the cosine denominator.
            max_items: Largest catalogue accepted.
            batch_users: Users per block when accumulating co-occurrence counts.

        Raises:
            ValueError: A parameter is out of range.
        """
        if k_neighbours < 1:
            raise ValueError(f"k_neighbours must be positive, got {k_neighbours}")
        if shrink < 0:
            raise ValueError(f"shrink must be non-negative, got {shrink}")
        self.k_neighbours = k_neighbours
        self.shrink = shrink
        self.max_items = max_items
        self._batch_users = batch_users
        self._similarity: FloatMatrix | None = None
        self._train: Interactions | None = None

    @property
    def similarity(self) -> FloatMatrix:
        """The pruned similarity matrix: row ``i`` holds item ``i``'s kept neighbours."""
        return _fitted(self._similarity, self.name)

    def fit(self, train: Interactions) -> Self:
        """Compute item-item cosine similarities and keep each item's nearest neighbours.

        Args:
            train: Training interactions.

        Returns:
            This model, fitted.

        Raises:
            TooManyItemsError: The catalogue exceeds ``max_items``.
        """
        n_items = train.n_items
        _check_catalogue(n_items, self.max_items, self.name)
        gram = item_gram(train, dtype=np.float32, batch_users=self._batch_users)
        norms = np.sqrt(np.diag(gram)).astype(np.float32)
        similarity = np.zeros_like(gram)
        k = min(self.k_neighbours, n_items)
        block_rows = max(1, 2**22 // max(n_items, 1))
        # Row blocks of about 4M entries bound the temporaries to tens of MB whatever the catalogue size.
        for start in range(0, n_items, block_rows):
            stop = min(start + block_rows, n_items)
            denominator = norms[start:stop, None] * norms[None, :] + np.float32(self.shrink)
            block = np.divide(
                gram[start:stop],
                denominator,
                out=np.zeros((stop - start, n_items), dtype=np.float32),
                where=denominator > 0,
            )
            block[np.arange(stop - start), np.arange(start, stop)] = 0.0
            if k < n_items:
                kept = np.argpartition(-block, k - 1, axis=1)[:, :k]
                np.put_along_axis(
                    similarity[start:stop], kept, np.take_along_axis(block, kept, axis=1), axis=1
                )
            else:
                similarity[start:stop] = block
        self._similarity = similarity
        self._train = train
        return self

    def score(self, user_indices: IntArray) -> FloatMatrix:
        """Summed neighbour similarities of every item to each user's training items.

        Args:
            user_indices: Users to score.

        Returns:
            A ``(len(user_indices), n_items)`` array.
        """
        similarity = _fitted(self._similarity, self.name)
        history = _fitted(self._train, self.name).dense_rows(user_indices, np.float32)
        return history @ similarity


class EASE:
    """Embarrassingly Shallow Autoencoder: an item-item weight matrix in closed form.

    With ``X`` the binary user-item matrix and ``P = (XᵀX + λI)⁻¹``, the weights are
    ``B = I - P · diag(1 / diag(P))``, i.e. ``B[i, j] = -P[i, j] / P[j, j]`` off the diagonal and 0 on
    it: the ridge regression of each item on all the others, with no item allowed to predict itself.
    A user's scores are ``x_u B``.

    Attributes:
        l2: Ridge penalty λ; about 500 suits MovieLens 100K, larger data wants more.
        max_items: Largest catalogue accepted.
    """

    name = "ease"

    def __init__(
        self, l2: float = 500.0, *, max_items: int = DEFAULT_MAX_ITEMS, batch_users: int = 2048
    ) -> None:
        """Configure the model.

        Args:
            l2: Positive ridge penalty λ.
            max_items: Largest catalogue accepted.
            batch_users: Users per block when accumulating ``XᵀX``.

        Raises:
            ValueError: ``l2`` is not positive.
        """
        if l2 <= 0:
            raise ValueError(f"l2 must be positive, got {l2}")
        self.l2 = l2
        self.max_items = max_items
        self._batch_users = batch_users
        self._weights: FloatMatrix | None = None
        self._train: Interactions | None = None

    @property
    def weights(self) -> FloatMatrix:
        """The fitted ``(n_items, n_items)`` matrix ``B``, zero on the diagonal."""
        return _fitted(self._weights, self.name)

    def fit(self, train: Interactions) -> Self:
        """Solve for ``B`` in closed form.

        Args:
            train: Training interactions.

        Returns:
            This model, fitted.

        Raises:
            TooManyItemsError: The catalogue exceeds ``max_items``.
        """
        n_items = train.n_items
        _check_catalogue(n_items, self.max_items, self.name)
        # Double precision for the inverse: float32 loses the small off-diagonal weights.
        gram = item_gram(train, dtype=np.float64, batch_users=self._batch_users)
        gram[np.diag_indices(n_items)] += self.l2
        precision = np.linalg.inv(gram)
        weights = precision / -np.diag(precision)[None, :]
        weights[np.diag_indices(n_items)] = 0.0
        self._weights = weights.astype(np.float32)
        self._train = train
        return self

    def score(self, user_indices: IntArray) -> FloatMatrix:
        """Reconstructed preference of each user for every item.

        Args:
            user_indices: Users to score.

        Returns:
            A ``(len(user_indices), n_items)`` array.
        """
        weights = _fitted(self._weights, self.name)
        history = _fitted(self._train, self.name).dense_rows(user_indices, np.float32)
        return history @ weights


def item_gram(
    train: Interactions, *, dtype: npt.DTypeLike = np.float64, batch_users: int = 2048
) -> npt.NDArray[Any]:
    """Item co-occurrence counts ``XᵀX`` of the binary user-item matrix.

    Accumulated over blocks of users, so memory is the ``n_items²`` result plus one block of
    ``batch_users`` rows, whatever the number of users.

    Args:
        train: Interactions defining ``X``.
        dtype: Element type of the result.
        batch_users: Users per block.

    Returns:
        A symmetric ``(n_items, n_items)`` matrix: ``[i, j]`` counts users having both items, the
        diagonal counts each item's users.
    """
    gram = np.zeros((train.n_items, train.n_items), dtype=dtype)
    users = train.active_users()
    for start in range(0, len(users), batch_users):
        # float32 is exact here: a block's counts never exceed batch_users, far below 2**24.
        block = train.dense_rows(users[start : start + batch_users], np.float32)
        gram += block.T @ block
    return gram


def _check_catalogue(n_items: int, max_items: int, model: str) -> None:
    if n_items > max_items:
        gigabytes = 4 * n_items**2 / 1e9
        raise TooManyItemsError(
            f"{model} keeps a dense {n_items}x{n_items} item-item matrix (~{gigabytes:.1f} GB in float32, "
            f"more while fitting); {n_items} items exceed max_items={max_items}. Raise max_items if the "
            "machine has the memory, or restrict the catalogue (e.g. to items with enough interactions)."
        )


def _fitted(value: _T | None, model: str) -> _T:
    if value is None:
        raise RuntimeError(f"{model} is not fitted; call fit() first")
    return value
