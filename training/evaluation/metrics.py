"""Offline ranking metrics over the full catalogue, and AUC for pointwise scorers.

Every user with at least one held-out item in the evaluated part is ranked against ALL items of the
vocabulary, not a sample of negatives: sampled metrics are known to reorder models. Items the user
already has in train (and in validation, when test is scored) are removed from the ranking first,
as serving's seen-items filter would remove them.

Per user, with ``rel`` the held-out items and ``hits`` those among the top K:

* ``Recall@K`` = ``|hits| / |rel|``
* ``P@K`` (precision) = ``|hits| / K``
* ``Hit@K`` = 1 if ``hits`` is not empty
* ``MRR@K`` = 1 / rank of the first hit (0 without a hit)
* ``NDCG@K`` = DCG / ideal DCG, binary gains, ``log2(rank + 1)`` discounts, the ideal list holding
  ``min(K, |rel|)`` relevant items

Each is averaged over evaluated users. ``Coverage@K`` is the share of the catalogue that appears in
at least one evaluated user's top K. Ties between scores are broken arbitrarily but consistently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from training.evaluation.splits import BoolArray, IntArray, Interactions, Split

ScoreFn = Callable[[IntArray], npt.NDArray[Any]]
"""Dense scorer: user indices of a batch -> ``(batch, n_items)`` scores, higher is better."""

EvalPart = Literal["valid", "test"]

RANKING_METRICS: Final[tuple[str, ...]] = ("Recall", "NDCG", "MRR", "Hit", "P", "Coverage")
"""Metric names, keyed in results as ``f"{name}@{k}"``."""

USERS_KEY: Final = "users"
"""Result key holding the number of users evaluated."""


def metric_key(name: str, k: int) -> str:
    """The result key of a ranking metric at a cut-off, e.g. ``metric_key("NDCG", 10) == "NDCG@10"``."""
    return f"{name}@{k}"


def top_k(
    score_fn: ScoreFn,
    split: Split,
    k: int,
    *,
    part: EvalPart = "test",
    batch_users: int = 1024,
) -> tuple[IntArray, IntArray]:
    """Top-k lists of every user with held-out items, over all items, with known items excluded.

    Useful on its own to feed a later stage (e.g. retrieve 500, then rerank) and
    :func:`evaluate_topk`.

    Args:
        score_fn: Dense scorer; see :data:`ScoreFn`.
        split: The split; its train (and, for test, validation) items are excluded.
        k: Length of each list.
        part: Which held-out part decides the users ranked.
        batch_users: Users scored per call of ``score_fn``; bounds memory at about
            ``batch_users * n_items`` scores.

    Returns:
        ``(users, items)``: the sorted user indices and a ``(len(users), k)`` array of item indices,
        best first, padded with -1 where a user has fewer than ``k`` rankable items.
    """
    _check_positive(k=k, batch_users=batch_users)
    known = split.known_before(part)
    users = split.part(part).active_users()
    lists = [top for _, top in _ranked_batches(score_fn, known, users, k, batch_users)]
    items = np.concatenate(lists) if lists else np.empty((0, k), dtype=np.int64)
    return users, items


def evaluate_scores(
    score_fn: ScoreFn,
    split: Split,
    ks: Sequence[int] = (10, 20),
    batch_users: int = 1024,
    *,
    part: EvalPart = "test",
) -> dict[str, float]:
    """Full-ranking metrics of a dense scorer on one held-out part.

    Args:
        score_fn: Dense scorer; see :data:`ScoreFn`. It may return a view or cached array: scores
            are copied before known items are masked.
        split: The split. When ``part="test"``, items of train and validation are excluded.
        ks: Cut-offs.
        batch_users: Users scored per call of ``score_fn``.
        part: ``"valid"`` for model selection, ``"test"`` for reported numbers.

    Returns:
        ``{"Recall@10": …, "NDCG@10": …, …, "Coverage@20": …, "users": n}`` for every metric of
        :data:`RANKING_METRICS` at every cut-off.

    Raises:
        ValueError: A cut-off or the batch size is not positive, no user has held-out items, or
            ``score_fn`` returns the wrong shape or NaN.
    """
    cutoffs = _check_ks(ks)
    _check_positive(batch_users=batch_users)
    targets = split.part(part)
    known = split.known_before(part)
    users = _evaluated_users(targets, part)
    accumulator = _RankingAccumulator(cutoffs, targets.n_items)
    for batch, top in _ranked_batches(score_fn, known, users, max(cutoffs), batch_users):
        accumulator.add(top, *_relevance(targets, batch, top))
    return accumulator.result()


def evaluate_topk(
    topk_items: npt.NDArray[np.integer[Any]],
    split: Split,
    ks: Sequence[int] = (10, 20),
    *,
    part: EvalPart = "test",
    user_indices: IntArray | None = None,
    exclude_seen: bool = True,
    batch_users: int = 4096,
) -> dict[str, float]:
    """Full-ranking metrics of precomputed recommendation lists on one held-out part.

    For pipelines that produce lists rather than dense scores (retrieval, then a reranker). Only
    users with held-out items in ``part`` are evaluated; the other rows are ignored.

    Args:
        topk_items: ``(n_rows, K)`` item indices, best first; -1 marks an empty slot, which is
            skipped (the items after it move up). ``K`` must reach the largest cut-off.
        split: The split the lists were produced for.
        ks: Cut-offs.
        part: ``"valid"`` or ``"test"``.
        user_indices: The user of each row (as returned by :func:`top_k`). When omitted, there is one
            row per user of the vocabulary and row ``u`` is user index ``u``.
        exclude_seen: Drop items the user already has (train, plus validation for test) and move
            the rest up, as :func:`evaluate_scores` does; when false they stay and count as misses.
        batch_users: Users processed at once.

    Returns:
        The same keys as :func:`evaluate_scores`.

    Raises:
        ValueError: The array's shape or values do not fit the split, a user with held-out items has
            no row, a list repeats an item, or no user has held-out items.
    """
    cutoffs = _check_ks(ks)
    _check_positive(batch_users=batch_users)
    targets = split.part(part)
    known = split.known_before(part)
    lists = np.asarray(topk_items)
    if not np.issubdtype(lists.dtype, np.integer):
        raise ValueError(f"topk_items must hold integer item indices, not {lists.dtype}")
    if user_indices is None:
        row_users = np.arange(targets.n_users, dtype=np.int64)
    else:
        row_users = np.asarray(user_indices, dtype=np.int64)
        if len(row_users) and (int(row_users.min()) < 0 or int(row_users.max()) >= targets.n_users):
            raise ValueError(f"user indices must lie in [0, {targets.n_users})")
    if lists.ndim != 2 or lists.shape[0] != len(row_users):
        raise ValueError(
            f"topk_items must have shape ({len(row_users)}, K), one row per user, not {lists.shape}"
        )
    if lists.shape[1] < max(cutoffs):
        raise ValueError(f"lists of {lists.shape[1]} items cannot be cut at K={max(cutoffs)}")
    if lists.size and (int(lists.min()) < -1 or int(lists.max()) >= targets.n_items):
        raise ValueError(f"item indices must lie in [0, {targets.n_items}) or be -1 for an empty slot")

    users = _evaluated_users(targets, part)
    row_of_user = np.full(targets.n_users, -1, dtype=np.int64)
    row_of_user[row_users] = np.arange(len(row_users), dtype=np.int64)
    missing = users[row_of_user[users] < 0]
    if len(missing):
        # Leaving them out would silently average over the easier users only.
        raise ValueError(
            f"{len(missing)} users with held-out items have no list, e.g. user index {missing[0]}"
        )
    accumulator = _RankingAccumulator(cutoffs, targets.n_items)
    for batch in _batches(users, batch_users):
        top = lists[row_of_user[batch]].astype(np.int64)
        if exclude_seen:
            seen = np.take_along_axis(known.dense_rows(batch, np.bool_), np.maximum(top, 0), axis=1)
            top[seen & (top >= 0)] = -1
        # Stable sort on "is empty" moves every empty slot to the end and keeps the order of the rest.
        top = np.take_along_axis(top, np.argsort(top < 0, axis=1, kind="stable"), axis=1)
        ordered = np.sort(top, axis=1)
        if np.any((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)):
            raise ValueError("a recommendation list repeats an item")
        top = top[:, : max(cutoffs)]
        accumulator.add(top, *_relevance(targets, batch, top))
    return accumulator.result()


def auc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Area under the ROC curve of a pointwise scorer, by the rank-sum (Mann-Whitney) formula.

    Equals the probability that a random positive scores above a random negative, a tie counting
    one half: tied scores share their average rank.

    Args:
        labels: Binary labels (truthy = positive).
        scores: One score per label, higher meaning more likely positive.

    Returns:
        The AUC in [0, 1].

    Raises:
        ValueError: The lengths differ, a score is NaN, or only one class is present.
    """
    positive = np.asarray(labels).astype(np.bool_).ravel()
    values = np.asarray(scores, dtype=np.float64).ravel()
    if positive.shape != values.shape:
        raise ValueError(f"{positive.size} labels but {values.size} scores")
    if np.isnan(values).any():
        raise ValueError("scores hold NaN")
    n_pos = int(np.count_nonzero(positive))
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs at least one positive and one negative label")
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    # 1-based rank of each distinct value, averaged over its ties.
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum = float(average_rank[inverse][positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


class _RankingAccumulator:
    """Sums per-user metrics batch by batch, so memory does not grow with the number of users."""

    def __init__(self, ks: tuple[int, ...], n_items: int) -> None:
        self._ks = ks
        self._n_items = n_items
        self._n_users = 0
        self._sums = {metric_key(name, k): 0.0 for k in ks for name in RANKING_METRICS if name != "Coverage"}
        self._covered = {k: np.zeros(n_items, dtype=np.bool_) for k in ks}
        self._discount = 1.0 / np.log2(np.arange(2, max(ks) + 2, dtype=np.float64))
        self._ideal_dcg = np.cumsum(self._discount)

    def add(self, top: IntArray, relevant: BoolArray, n_relevant: IntArray) -> None:
        for k in self._ks:
            rel = relevant[:, :k]
            hits = rel.sum(axis=1)
            self._sums[metric_key("Recall", k)] += float((hits / n_relevant).sum())
            self._sums[metric_key("P", k)] += float(hits.sum()) / k
            self._sums[metric_key("Hit", k)] += float(np.count_nonzero(hits))
            first = np.argmax(rel, axis=1)
            self._sums[metric_key("MRR", k)] += float(np.where(hits > 0, 1.0 / (first + 1), 0.0).sum())
            dcg = rel @ self._discount[:k]
            ideal = self._ideal_dcg[np.minimum(k, n_relevant) - 1]
            self._sums[metric_key("NDCG", k)] += float((dcg / ideal).sum())
            listed = top[:, :k]
            self._covered[k][listed[listed >= 0]] = True
        self._n_users += len(top)

    def result(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for k in self._ks:
            for name in RANKING_METRICS:
                key = metric_key(name, k)
                if name == "Coverage":
                    out[key] = float(np.count_nonzero(self._covered[k])) / self._n_items
                else:
                    out[key] = self._sums[key] / self._n_users
        out[USERS_KEY] = float(self._n_users)
        return out


def _ranked_batches(
    score_fn: ScoreFn, known: Interactions, users: IntArray, k: int, batch_users: int
) -> Iterator[tuple[IntArray, IntArray]]:
    n_items = known.n_items
    for batch in _batches(users, batch_users):
        raw = np.asarray(score_fn(batch))
        if raw.shape != (len(batch), n_items):
            raise ValueError(f"score_fn returned shape {raw.shape}, expected {(len(batch), n_items)}")
        # Float32 halves memory for big catalogues; float64 scores keep their precision.
        dtype = np.float64 if raw.dtype == np.float64 else np.float32
        scores: npt.NDArray[np.floating[Any]] = np.array(raw, dtype=dtype, copy=True)
        if np.isnan(scores).any():
            raise ValueError("score_fn returned NaN scores")
        rows, items = known.coordinates(batch)
        scores[rows, items] = -np.inf
        yield batch, _select_top(scores, k)


def _select_top(scores: npt.NDArray[np.floating[Any]], k: int) -> IntArray:
    n_rows, n_items = scores.shape
    width = min(k, n_items)
    if width < n_items:
        # argpartition finds the k best in linear time; only those k are then sorted.
        candidates = np.argpartition(-scores, width - 1, axis=1)[:, :width]
    else:
        candidates = np.broadcast_to(np.arange(n_items), (n_rows, n_items))
    candidate_scores = np.take_along_axis(scores, candidates, axis=1)
    order = np.argsort(-candidate_scores, axis=1, kind="stable")
    top = np.take_along_axis(candidates, order, axis=1).astype(np.int64)
    top[np.isneginf(np.take_along_axis(candidate_scores, order, axis=1))] = -1
    if width < k:
        top = np.concatenate([top, np.full((n_rows, k - width), -1, dtype=np.int64)], axis=1)
    return top


def _relevance(targets: Interactions, batch: IntArray, top: IntArray) -> tuple[BoolArray, IntArray]:
    held_out = targets.dense_rows(batch, np.bool_)
    relevant = np.take_along_axis(held_out, np.maximum(top, 0), axis=1) & (top >= 0)
    return relevant, targets.user_counts()[batch]


def _evaluated_users(targets: Interactions, part: EvalPart) -> IntArray:
    users = targets.active_users()
    if len(users) == 0:
        raise ValueError(f"no user has held-out items in {part!r}")
    return users


def _batches(users: IntArray, size: int) -> Iterator[IntArray]:
    for start in range(0, len(users), size):
        yield users[start : start + size]


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    cutoffs = tuple(sorted({int(k) for k in ks}))
    if not cutoffs or cutoffs[0] < 1:
        raise ValueError(f"cut-offs must be positive integers, got {list(ks)}")
    return cutoffs


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
