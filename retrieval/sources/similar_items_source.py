"""Neighbours of the page's item, for the "you may also like" surface."""

from __future__ import annotations

from core.types import Candidate, FeatureMap, RequestContext
from features.candidate_refs import RETRIEVAL_SEED_ITEM_ID
from retrieval.sources.item_neighbors import ItemNeighbors


class SimilarItemsSource:
    """The nearest neighbours of ``ctx.item_id`` in the item-item table.

    Not personalised: it runs for users who opted out too. Scores are the table's similarities
    divided by the best one.

    Args:
        neighbors: The item-item table.
        name: Stage id.
        budget_ms: Time the source may take.
        max_candidates: How many candidates at most.
    """

    def __init__(
        self,
        neighbors: ItemNeighbors,
        *,
        name: str = "similar_items",
        budget_ms: float = 10.0,
        max_candidates: int = 100,
    ) -> None:
        self.name = name
        self.budget_ms = budget_ms
        self.max_candidates = max_candidates
        self._neighbors = neighbors

    async def fetch(self, ctx: RequestContext) -> list[Candidate]:
        """Neighbours of the seed item.

        Args:
            ctx: The request; ``ctx.item_id`` is the seed.

        Returns:
            Up to ``max_candidates`` candidates, best first; empty without a seed or when the
            table does not know it.
        """
        seed = ctx.item_id
        if seed is None:
            return []
        pairs = [
            (i, s) for i, s in self._neighbors.neighbors(seed, self.max_candidates) if i != seed and s > 0
        ]
        if not pairs:
            return []
        top = pairs[0][1]
        seed_map = FeatureMap({RETRIEVAL_SEED_ITEM_ID: seed})
        return [
            Candidate(item_id=i, retrieval_score=s / top, features=seed_map, reason="You may also like")
            for i, s in pairs
        ]
