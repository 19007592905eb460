"""Items related to the last few things the user viewed or bought, each with "Because you viewed …"."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from core.schema import EventType
from core.types import Candidate, FeatureMap, RequestContext
from features.candidate_refs import RETRIEVAL_SEED_ITEM_ID
from features.redis_store import RedisStore
from features.user_context import recent_events
from retrieval.sources.item_neighbors import ItemNeighbors

SEED_VERBS: Final[Mapping[str, str]] = MappingProxyType(
    {
        EventType.PURCHASE.value: "bought",
        EventType.WATCH.value: "watched",
        EventType.LIKE.value: "liked",
        EventType.CLICK.value: "viewed",
        EventType.VIEW.value: "viewed",
    }
)
"""Event types that seed this source, with the verb its reasons use."""


class RecentlyViewedRelatedSource:
    """Neighbours of each of the user's last few viewed, watched or bought items, interleaved.

    Unlike :class:`~retrieval.sources.item_to_item_source.ItemToItemSource`, which blends the
    whole history, this source keeps the seeds apart: the newest seed's best neighbour comes
    first, then the next seed's, and so on, so each recent item is represented and every
    candidate can name the item it relates to. One ``MGET`` reads the seeds' titles.

    Args:
        neighbors: The item-item table (content or embedding based, typically).
        store: The Redis store, for the seeds' catalog titles.
        name: Stage id.
        budget_ms: Time the source may take.
        max_candidates: How many candidates at most.
        max_seeds: Recent items used as seeds, newest first.
        per_seed: Neighbours read per seed.
    """

    def __init__(
        self,
        neighbors: ItemNeighbors,
        store: RedisStore,
        *,
        name: str = "recently_viewed_related",
        budget_ms: float = 10.0,
        max_candidates: int = 45,
        max_seeds: int = 3,
        per_seed: int = 15,
    ) -> None:
        self.name = name
        self.budget_ms = budget_ms
        self.max_candidates = max_candidates
        self.max_seeds = max_seeds
        self.per_seed = per_seed
        self._neighbors = neighbors
        self._store = store

    def seeds(self, ctx: RequestContext) -> list[tuple[str, str]]:
        """The newest distinct seed items with their verb: ``(item_id, verb)``."""
        if not ctx.personalization:
            return []
        seeds: dict[str, str] = {}
        for event in recent_events(ctx.user_features):
            verb = SEED_VERBS.get(event.event_type)
            if verb is not None and event.item_id not in seeds:
                seeds[event.item_id] = verb
                if len(seeds) >= self.max_seeds:
                    break
        return list(seeds.items())

    async def fetch(self, ctx: RequestContext) -> list[Candidate]:
        """Related items of the recent seeds, interleaved newest seed first.

        Args:
            ctx: The request.

        Returns:
            Up to ``max_candidates`` candidates; scores fall with the rank within a seed's list
            and with the seed's age.

        Raises:
            StoreUnavailable: Redis could not be reached for the titles.
        """
        seeds = self.seeds(ctx)
        if not seeds:
            return []
        consumed = {e.item_id for e in recent_events(ctx.user_features)}
        lists = [self._neighbors.neighbors(seed, self.per_seed) for seed, _ in seeds]
        records = await self._store.amget_json([self._store.keys.item(seed) for seed, _ in seeds])
        reasons = [
            _reason(verb, record.get("title") if record is not None else None)
            for (_, verb), record in zip(seeds, records, strict=True)
        ]
        seed_maps = [FeatureMap({RETRIEVAL_SEED_ITEM_ID: seed}) for seed, _ in seeds]
        out: dict[str, Candidate] = {}
        for rank in range(self.per_seed):
            for seed_rank, pairs in enumerate(lists):
                if rank >= len(pairs) or len(out) >= self.max_candidates:
                    continue
                item_id, similarity = pairs[rank]
                if item_id in consumed or item_id in out or similarity <= 0:
                    continue
                score = (1.0 - rank / (self.per_seed + 1)) * 0.85**seed_rank
                out[item_id] = Candidate(
                    item_id=item_id,
                    retrieval_score=score,
                    features=seed_maps[seed_rank],
                    reason=reasons[seed_rank],
                )
        return list(out.values())


def _reason(verb: str, title: object) -> str:
    if isinstance(title, str) and title.strip():
        return f"Because you {verb} {title.strip()}"
    return f"Because of something you {verb} recently"
