"""Per-user NDCG and the paired bootstrap of a difference between two models over the same users.

Averages over a few hundred users move by a few thousandths from one split to the next, so a
difference between two models is reported with an interval: users are resampled with replacement,
both models' per-user values move together (paired), and the 2.5th and 97.5th percentiles of
the mean difference are the 95 % interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from training.evaluation.splits import IntArray, Split

FloatArray = npt.NDArray[np.float64]


def per_user_ndcg(lists: IntArray, split: Split, users: IntArray, k: int, part: str = "test") -> FloatArray:
    """NDCG@k of each user's list against the user's held-out items.

    Args:
        lists: ``(len(users), >= k)`` split item indices, best first; ``-1`` for empty slots.
            Items the user already has must already be left out.
        split: The split.
        users: The user index of each row.
        k: Cut-off.
        part: ``"valid"`` or ``"test"``.

    Returns:
        One value per row.
    """
    targets = split.part("valid" if part == "valid" else "test")
    relevant = targets.dense_rows(users, np.bool_)
    top = lists[:, :k]
    hit = np.take_along_axis(relevant, np.maximum(top, 0), axis=1) & (top >= 0)
    discount = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))
    dcg = hit @ discount
    n_relevant = np.minimum(relevant.sum(axis=1), k)
    ideal = np.cumsum(discount)[np.maximum(n_relevant, 1) - 1]
    return np.where(n_relevant > 0, dcg / ideal, 0.0)


@dataclass(frozen=True)
class PairedDifference:
    """Mean difference ``a - b`` over users with its bootstrap interval.

    Attributes:
        mean: Observed mean difference.
        low: 2.5th percentile of the resampled means.
        high: 97.5th percentile.
        users: Users compared.
        samples: Resamples drawn.
    """

    mean: float
    low: float
    high: float
    users: int
    samples: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "mean": self.mean,
            "low": self.low,
            "high": self.high,
            "users": self.users,
            "samples": self.samples,
        }


def paired_bootstrap(a: FloatArray, b: FloatArray, *, samples: int = 1000, seed: int = 0) -> PairedDifference:
    """Paired bootstrap over users of the mean of ``a - b``.

    Args:
        a: Per-user values of the first model.
        b: Per-user values of the second, same users in the same order.
        samples: Resamples.
        seed: Seed of the resampling.

    Returns:
        The observed mean difference and its 95 % percentile interval.
    """
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal shapes, got {a.shape} and {b.shape}")
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(diff), size=(samples, len(diff)))
    means = diff[picks].mean(axis=1)
    return PairedDifference(
        mean=float(diff.mean()),
        low=float(np.percentile(means, 2.5)),
        high=float(np.percentile(means, 97.5)),
        users=len(diff),
        samples=samples,
    )


__all__ = ["PairedDifference", "paired_bootstrap", "per_user_ndcg"]
