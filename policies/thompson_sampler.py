"""Beta-Bernoulli Thompson sampling over candidates, with Monte-Carlo selection probabilities."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from core.types import Candidate

IMPRESSIONS_REF = "item_engagement:view_count_7d"
CLICKS_REF = "item_engagement:click_count_7d"


class ThompsonSampler:
    """Picks one candidate by Thompson sampling on its click-through rate.

    Each candidate's CTR has the posterior ``Beta(a0 + clicks, b0 + max(views - clicks, 0))``
    from its 7-day view and click counts, and a prior with mean ``prior_mean`` worth
    ``prior_strength`` views (the defaults of the smoothed ``ctr_7d`` feature). A new item's
    posterior is the wide prior: it beats an item proven at 1 % CTR about 83 % of the time and one
    proven at 10 % about 13 % of the time, so new and uncertain items get tried while proven
    good ones keep winning. One draw per candidate picks the winner.

    Selection probability: the chance that a given candidate wins is not available in closed
    form for more than two Betas, so it is estimated by Monte Carlo. ``mc_samples`` joint draws
    are made, the first of which is the one that actually chose; the estimate is the share of
    draws the chosen candidate wins. It is at least ``1 / mc_samples`` (never 0), its bias is
    ``(1 - p) / mc_samples`` upwards, and its standard error is about
    ``sqrt(p (1 - p) / mc_samples)``. The random generator is passed in, seeded per request, so
    the choice and the estimate are reproducible.

    Args:
        prior_mean: Prior mean CTR.
        prior_strength: Pseudo-views the prior is worth.
        mc_samples: Joint draws per selection, the deciding one included.
    """

    def __init__(self, prior_mean: float = 0.05, prior_strength: float = 20.0, mc_samples: int = 256) -> None:
        if not 0.0 < prior_mean < 1.0 or prior_strength <= 0:
            raise ValueError("prior_mean must be in (0, 1) and prior_strength positive")
        if mc_samples < 1:
            raise ValueError(f"mc_samples must be at least 1, got {mc_samples}")
        self.prior_alpha = prior_mean * prior_strength
        self.prior_beta = (1.0 - prior_mean) * prior_strength
        self.mc_samples = mc_samples

    def posterior(self, cands: Sequence[Candidate]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """``(alpha, beta)`` of each candidate's CTR posterior."""
        clicks = np.array([max(c.features.get_int(CLICKS_REF, 0), 0) for c in cands], dtype=np.float64)
        views = np.array([max(c.features.get_int(IMPRESSIONS_REF, 0), 0) for c in cands], dtype=np.float64)
        return self.prior_alpha + clicks, self.prior_beta + np.maximum(views - clicks, 0.0)

    def choose(self, rng: np.random.Generator, cands: Sequence[Candidate]) -> tuple[int, float]:
        """Pick one of ``cands``.

        Args:
            rng: The request's generator.
            cands: At least one candidate.

        Returns:
            ``(index of the winner, estimated probability it had of winning)``; the probability
            is in ``[1 / mc_samples, 1]``.

        Raises:
            ValueError: ``cands`` is empty.
        """
        if not cands:
            raise ValueError("cannot choose among no candidates")
        alpha, beta = self.posterior(cands)
        draws = rng.beta(alpha, beta, size=(self.mc_samples, len(cands)))
        winners = np.argmax(draws, axis=1)
        chosen = int(winners[0])
        return chosen, float(np.count_nonzero(winners == chosen)) / self.mc_samples
