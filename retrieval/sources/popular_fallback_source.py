"""A precomputed popular list: the floor under every list, and all a new user gets on an empty day.

Trending sets start empty (a fresh deployment, a new epoch after a quiet spell); this list, made
offline from the lake (all-time or 30-day engagement), keeps a cold-start request from coming
back empty. Its scores are scaled below those of the live sources, so it only fills the list
when they are thin.
"""

from __future__ import annotations

from collections.abc import Sequence

from core.types import Candidate, RequestContext


class PopularFallbackSource:
    """Serves a precomputed popular list held in memory.

    Args:
        popular: ``(item_id, popularity)``, in any order; replaced with :meth:`replace`.
        name: Stage id.
        budget_ms: Time the source may take (it never waits on I/O).
        max_candidates: How many candidates at most.
        score_scale: Retrieval score of the most popular item; the rest scale down from it.
        reason: The reason shown with its items.
    """

    def __init__(
        self,
        popular: Sequence[tuple[str, float]] = (),
        *,
        name: str = "popular",
        budget_ms: float = 5.0,
        max_candidates: int = 50,
        score_scale: float = 0.1,
        reason: str = "Popular right now",
    ) -> None:
        self.name = name
        self.budget_ms = budget_ms
        self.max_candidates = max_candidates
        self.score_scale = score_scale
        self.reason = reason
        self._ranked: tuple[tuple[str, float], ...] = ()
        self.replace(popular)

    def replace(self, popular: Sequence[tuple[str, float]]) -> None:
        """Swap in a new list (after the offline job refreshed it); requests in flight keep the old one.

        Args:
            popular: ``(item_id, popularity)``; non-positive popularity is dropped.
        """
        best: dict[str, float] = {}
        for item_id, score in popular:
            if score > 0 and score > best.get(item_id, 0.0):
                best[item_id] = float(score)
        # One assignment, so a concurrent fetch sees either the old list or the new one.
        self._ranked = tuple(sorted(best.items(), key=lambda pair: (-pair[1], pair[0])))

    async def fetch(self, ctx: RequestContext) -> list[Candidate]:
        """The most popular items, scaled to ``score_scale``.

        Args:
            ctx: The request (not used: the list is the same for everyone).

        Returns:
            Up to ``max_candidates`` candidates, best first.
        """
        ranked = self._ranked[: self.max_candidates]
        if not ranked:
            return []
        top = ranked[0][1]
        return [
            Candidate(item_id=item_id, retrieval_score=self.score_scale * score / top, reason=self.reason)
            for item_id, score in ranked
        ]
