"""Collaborative candidates: the release's EASE model applied to the user's recent positive history.

The history is the one every model of the request reads (``positive_history``: the positively
engaged items among the online store's recent events, newest first), so a like changes this
source's candidates on the very next request, and the ranker's EASE features are computed from
the same items.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from core.types import Candidate, RequestContext
from features.user_context import positive_history

HistoryScorer = Callable[[Sequence[str], int], list[tuple[str, float]]]
"""Given a history (item ids, newest first) and ``k``: the ``k`` best items with their scores,
best first, history items left out."""


class CollaborativeSource:
    """EASE's best items for the user's recent positives.

    Args:
        scorer: The release's EASE scoring of a history.
        name: Stage id.
        budget_ms: Time the source may take.
        max_candidates: How many candidates at most.
    """

    def __init__(
        self,
        scorer: HistoryScorer,
        *,
        name: str = "collaborative",
        budget_ms: float = 20.0,
        max_candidates: int = 200,
    ) -> None:
        self.name = name
        self.budget_ms = budget_ms
        self.max_candidates = max_candidates
        self._scorer = scorer

    async def fetch(self, ctx: RequestContext) -> list[Candidate]:
        """EASE candidates of the request's user.

        Args:
            ctx: The request.

        Returns:
            Up to ``max_candidates`` candidates, best first, scores scaled so the best is 1.0;
            empty for a user without history or who opted out.
        """
        history = positive_history(ctx)
        if not history:
            return []
        # A matrix-vector product over the catalog: off the event loop.
        ranked = await asyncio.to_thread(self._scorer, history, self.max_candidates)
        ranked = [(item, score) for item, score in ranked if score > 0]
        if not ranked:
            return []
        top = ranked[0][1]
        return [
            Candidate(
                item_id=item_id,
                retrieval_score=score / top,
                reason="People with tastes like yours liked this",
            )
            for item_id, score in ranked
        ]


__all__ = ["CollaborativeSource", "HistoryScorer"]
