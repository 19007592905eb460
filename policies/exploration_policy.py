"""Exploration slots: a share of the list goes to items the bandit wants to learn about."""

from __future__ import annotations

import hashlib

import numpy as np

from core.types import Candidate, RequestContext
from features.candidate_refs import RERANK_EXPLORATION
from policies.creator_cap_policy import creator_of
from policies.sponsored_marks import split_sponsored
from policies.thompson_sampler import PoolDraws, ThompsonSampler
from policies.window_cap import fits_at


def request_rng(ctx: RequestContext, salt: str) -> np.random.Generator:
    """A generator seeded by the request id, so a retried or replayed request draws the same."""
    digest = hashlib.blake2b(f"{ctx.request_id}:{salt}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "big"))


class ExplorationPolicy:
    """Fills about ``share`` of the first ``ctx.limit`` positions with Thompson-sampled items.

    Each of the first ``ctx.limit`` positions is, independently with probability ``share``
    (drawn from a generator seeded by the request id), an exploration slot. Exploitation keeps
    the ranked order; each exploration slot gets an item the ranking would not have shown (the
    ``pool_size`` organic candidates right below position ``ctx.limit``), chosen by
    :class:`ThompsonSampler` among those whose creator still fits the creator cap there.

    Propensities (multiplied into ``Candidate.propensity``):

    - exploitation items: ``1 - share``, the chance their slot was not an exploration slot
      (the policy is otherwise deterministic); ``1.0`` when there was nothing to explore with;
    - exploration items: ``share * p``, with ``p`` the sampler's Monte-Carlo estimate of the
      chance it had of winning among the eligible pool (see :class:`ThompsonSampler`).

    Both are in ``(0, 1]`` for ``share < 1``. Exploration items are marked
    ``rerank:exploration``. Sponsored candidates pass through at the end.

    Args:
        share: Expected share of exploration slots, in ``[0, 1)``.
        pool_size: Candidates below the fold the bandit chooses from.
        sampler: The bandit.
        creator_cap: ``(max_per_window, window)`` of the creator cap to keep, or None.
        name: Stage id (also salts the request's generator).
    """

    def __init__(
        self,
        share: float = 0.1,
        pool_size: int = 50,
        sampler: ThompsonSampler | None = None,
        *,
        creator_cap: tuple[int, int] | None = None,
        name: str = "exploration",
    ) -> None:
        if not 0.0 <= share < 1.0:
            raise ValueError(f"share must be in [0, 1), got {share}")
        if pool_size < 1:
            raise ValueError(f"pool_size must be at least 1, got {pool_size}")
        self.name = name
        self.share = share
        self.pool_size = pool_size
        self.sampler = sampler or ThompsonSampler()
        self.creator_cap = creator_cap

    def apply(self, ctx: RequestContext, ranked: list[Candidate]) -> list[Candidate]:
        """Insert exploration items at the drawn slots and set every organic item's propensity."""
        organic, sponsored = split_sponsored(ranked)
        limit = ctx.limit
        shown, pool, tail = (
            organic[:limit],
            organic[limit : limit + self.pool_size],
            organic[limit + self.pool_size :],
        )
        if self.share == 0.0 or not pool:
            return organic + sponsored
        rng = request_rng(ctx, self.name)
        slots = np.flatnonzero(rng.random(limit) < self.share).tolist()
        listed = list(shown)
        explored: set[str] = set()
        draws: PoolDraws | None = None  # drawn at the first slot with a choice to make
        for slot in slots:
            if slot > len(listed):
                break
            blocked = self._blocked(listed, slot)
            eligible = [
                k for k, c in enumerate(pool) if c.item_id not in explored and creator_of(c) not in blocked
            ]
            if not eligible:
                continue
            if draws is None:
                draws = self.sampler.draws(rng, pool)
            index, probability = draws.choose(rng, eligible)
            chosen = pool[eligible[index]]
            chosen.propensity *= self.share * probability
            chosen.features = chosen.features.with_values({RERANK_EXPLORATION: True})
            explored.add(chosen.item_id)
            listed.insert(slot, chosen)
        for cand in organic:
            if cand.item_id not in explored:
                cand.propensity *= 1.0 - self.share
        rest = [c for c in pool if c.item_id not in explored]
        return listed + rest + tail + sponsored

    def _blocked(self, listed: list[Candidate], slot: int) -> set[str]:
        """The creators whose item at ``slot`` would break the creator cap."""
        if self.creator_cap is None:
            return set()
        max_per_window, window = self.creator_cap
        creators = [creator_of(c) for c in listed]
        # Only a creator already in the windows around the slot can break the cap there, so
        # those few are checked once per slot instead of every candidate of the pool.
        near = {k for k in creators[max(0, slot - window + 1) : slot + window - 1] if k is not None}
        return {k for k in near if not fits_at(creators, slot, k, max_per_window, window)}
