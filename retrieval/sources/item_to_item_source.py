"""Item-to-item collaborative filtering: neighbours of everything the user engaged with recently."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from core.schema import EventType
from core.types import Candidate, FeatureMap, RequestContext
from features.candidate_refs import RETRIEVAL_SEED_ITEM_ID
from features.user_context import POSITIVE_EVENTS, recent_events
from retrieval.sources.item_neighbors import ItemNeighbors

DEFAULT_SEED_WEIGHTS: Final[Mapping[str, float]] = MappingProxyType(
    {
        EventType.PURCHASE.value: 3.0,
        EventType.LIKE.value: 2.5,
        EventType.SHARE.value: 2.5,
        EventType.WATCH.value: 1.5,
        EventType.CLICK.value: 1.0,
        EventType.VIEW.value: 0.5,
    }
)
"""How much an event says the user liked its item; negative feedback and skips never seed."""


class ItemToItemSource:
    """Sums the similarities of each neighbour to the user's recent items ("users who liked X also liked Y").

    Every positive recent event is a seed, weighted by its event type and decayed by its rank in
    the history (``recency_decay ** rank``), so a neighbour of several recent items, and of recent
    purchases more than of old views, ranks first. Items the user already interacted with are not
    returned. Scores are normalised so the best candidate has 1.0.

    Args:
        neighbors: The item-item table (co-occurrence based, typically).
        name: Stage id.
        budget_ms: Time the source may take.
        max_candidates: How many candidates at most.
        max_seeds: Recent items used as seeds, newest first.
        per_seed: Neighbours read per seed.
        recency_decay: Weight ratio between a seed and the next older one.
        seed_weights: Weight of each event type as a seed.
    """

    def __init__(
        self,
        neighbors: ItemNeighbors,
        *,
        name: str = "item_to_item",
        budget_ms: float = 10.0,
        max_candidates: int = 100,
        max_seeds: int = 20,
        per_seed: int = 30,
        recency_decay: float = 0.9,
        seed_weights: Mapping[str, float] = DEFAULT_SEED_WEIGHTS,
    ) -> None:
        self.name = name
        self.budget_ms = budget_ms
        self.max_candidates = max_candidates
        self.max_seeds = max_seeds
        self.per_seed = per_seed
        self.recency_decay = recency_decay
        self.seed_weights = dict(seed_weights)
        self._neighbors = neighbors

    def seeds(self, ctx: RequestContext) -> dict[str, float]:
        """Seed item to weight, from the user's recent positive events."""
        seeds: dict[str, float] = {}
        if not ctx.personalization:
            return seeds
        rank = 0
        for event in recent_events(ctx.user_features):
            if event.event_type not in POSITIVE_EVENTS:
                continue
            weight = self.seed_weights.get(event.event_type, 0.0) * self.recency_decay**rank
            rank += 1
            if weight > seeds.get(event.item_id, 0.0):
                seeds[event.item_id] = weight
            if len(seeds) >= self.max_seeds:
                break
        return seeds

    async def fetch(self, ctx: RequestContext) -> list[Candidate]:
        """Neighbours of the user's recent items.

        Args:
            ctx: The request.

        Returns:
            Up to ``max_candidates`` candidates, best first; empty for a user without history.
        """
        seeds = self.seeds(ctx)
        if not seeds:
            return []
        consumed = {e.item_id for e in recent_events(ctx.user_features)}
        totals: dict[str, float] = {}
        best_seed: dict[str, tuple[float, str]] = {}
        for seed, weight in seeds.items():
            for neighbor, similarity in self._neighbors.neighbors(seed, self.per_seed):
                if neighbor in consumed or similarity <= 0:
                    continue
                contribution = weight * similarity
                totals[neighbor] = totals.get(neighbor, 0.0) + contribution
                if contribution > best_seed.get(neighbor, (0.0, ""))[0]:
                    best_seed[neighbor] = (contribution, seed)
        if not totals:
            return []
        ranked = sorted(totals.items(), key=lambda pair: (-pair[1], pair[0]))[: self.max_candidates]
        top = ranked[0][1]
        seed_maps = {seed: FeatureMap({RETRIEVAL_SEED_ITEM_ID: seed}) for seed in seeds}
        return [
            Candidate(
                item_id=item_id,
                retrieval_score=total / top,
                features=seed_maps[best_seed[item_id][1]],
                reason="People who liked what you liked also liked this",
            )
            for item_id, total in ranked
        ]
