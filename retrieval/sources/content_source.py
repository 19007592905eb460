"""Content-based retrieval: the newest items of the user's categories and tags, and of liked creators."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from core.schema import EventType
from core.types import Candidate, RequestContext
from features.redis_store import RedisStore
from features.user_context import (
    POSITIVE_EVENTS,
    category_affinities,
    interest_categories,
    profile_interests,
    recent_events,
)
from retrieval.sources.content_index import ContentIndex

_LIKING_EVENTS = frozenset(
    t.value for t in (EventType.LIKE, EventType.SHARE, EventType.PURCHASE, EventType.WATCH)
)


class ContentMix(BaseModel):
    """How a content source splits its candidates between categories, tags and creators."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    category_share: Annotated[float, Field(ge=0)] = 0.6
    """Weight of the user's categories (affinity-weighted; onboarding interests for a new user)."""

    tag_share: Annotated[float, Field(ge=0)] = 0.2
    """Weight of the tags of the user's recent items (interests that are tags, for a new user)."""

    creator_share: Annotated[float, Field(ge=0)] = 0.2
    """Weight of the creators whose items the user liked, shared, bought or watched."""

    max_categories: Annotated[int, Field(ge=1, le=20)] = 5
    """Categories used, strongest first."""

    max_tags: Annotated[int, Field(ge=1, le=50)] = 5
    """Tags used, most frequent first."""

    max_creators: Annotated[int, Field(ge=1, le=50)] = 5
    """Creators used, most engaged with first."""


class ContentSource:
    """Items like the ones the user engages with, by category, tag and creator.

    - Categories: the user's decayed category affinities (onboarding interests, weighted equally,
      for a user without history); each category gets a share of the candidates proportional to
      its affinity and contributes its newest items.
    - Tags: the most frequent tags of the user's recent positive items; a new user's interests
      that are tags rather than categories count too.
    - Creators: the creators of items the user liked, shared, bought or watched; their current
      items come from the per-creator sets in Redis (one pipelined ``SMEMBERS``), newest first.

    Items the user already interacted with are skipped. Scores fall with the rank within a list
    and with the list's weight, in ``(0, 1]``.

    Args:
        index: The content index (swap a rebuilt one in with :meth:`update_index`).
        store: The Redis store, for the creator item sets.
        mix: The split between categories, tags and creators.
        name: Stage id.
        budget_ms: Time the source may take.
        max_candidates: How many candidates at most.
    """

    def __init__(
        self,
        index: ContentIndex,
        store: RedisStore,
        *,
        mix: ContentMix | None = None,
        name: str = "content",
        budget_ms: float = 10.0,
        max_candidates: int = 100,
    ) -> None:
        self.name = name
        self.budget_ms = budget_ms
        self.max_candidates = max_candidates
        self.mix = mix or ContentMix()
        self._index = index
        self._store = store

    def update_index(self, index: ContentIndex) -> None:
        """Serve from a rebuilt index from now on (requests in flight keep the old one)."""
        self._index = index

    async def fetch(self, ctx: RequestContext) -> list[Candidate]:
        """Candidates from the user's categories, tags and liked creators.

        Args:
            ctx: The request.

        Returns:
            Up to ``max_candidates`` candidates, best first; empty for a user who opted out or
            has neither history nor interests.

        Raises:
            StoreUnavailable: Redis could not be reached for the creator sets.
        """
        if not ctx.personalization:
            return []
        index = self._index
        history = recent_events(ctx.user_features)
        consumed = {e.item_id for e in history}
        positive = [e.item_id for e in history if e.event_type in POSITIVE_EVENTS]
        liked = [e.item_id for e in history if e.event_type in _LIKING_EVENTS]
        from_history = bool(category_affinities(ctx.user_features))

        categories = interest_categories(ctx)[: self.mix.max_categories]
        tags = [(t, float(n)) for t, n in index.top_tags(positive, self.mix.max_tags)]
        if not tags:
            tags = [(name, 1.0) for name in profile_interests(ctx) if index.tag(name)][: self.mix.max_tags]
        creators = [(c, float(n)) for c, n in index.top_creators(liked, self.mix.max_creators)]
        creator_items = await self._creator_items([c for c, _ in creators])

        verb = "Because you like" if from_history else "Based on your interest in"
        mix = self.mix
        lists: list[tuple[float, list[tuple[str, str]]]] = []
        for category, weight in _shares(mix.category_share, categories):
            lists.append((weight, self._unseen(index.category(category), consumed, f"{verb} {category}")))
        for tag, weight in _shares(mix.tag_share, tags):
            lists.append((weight, self._unseen(index.tag(tag), consumed, f"More {tag} for you")))
        for creator, weight in _shares(mix.creator_share, creators):
            newest = index.newest_first(creator_items.get(creator, ()))
            lists.append((weight, self._unseen(newest, consumed, "More from a creator you like")))
        return self._merge(lists)

    def _unseen(self, items: Iterable[str], consumed: set[str], reason: str) -> list[tuple[str, str]]:
        # No list contributes more than max_candidates (see _merge's quotas), and a category of a
        # large catalog holds thousands of items: stop at what can be used.
        fresh = (i for i in items if i not in consumed)
        return [(i, reason) for i in itertools.islice(fresh, self.max_candidates)]

    def _merge(self, lists: list[tuple[float, list[tuple[str, str]]]]) -> list[Candidate]:
        if not lists:
            return []
        top_weight = max(weight for weight, _ in lists)
        total_weight = sum(weight for weight, _ in lists)
        best: dict[str, Candidate] = {}
        for weight, items in lists:
            quota = max(1, math.ceil(self.max_candidates * weight / total_weight))
            for rank, (item_id, reason) in enumerate(items[:quota]):
                score = (weight / top_weight) * (1.0 - 0.5 * rank / quota)
                found = best.get(item_id)
                if found is None or score > found.retrieval_score:
                    best[item_id] = Candidate(item_id=item_id, retrieval_score=score, reason=reason)
        ranked = sorted(best.values(), key=lambda c: c.retrieval_score, reverse=True)
        return ranked[: self.max_candidates]

    async def _creator_items(self, creators: list[str]) -> dict[str, set[str]]:
        if not creators:
            return {}
        keys = self._store.keys
        with self._store.guard():
            pipe = self._store.aclient.pipeline(transaction=False)
            for creator in creators:
                pipe.smembers(keys.creator_items(creator))
            replies = await pipe.execute()
        return {creator: set(members) for creator, members in zip(creators, replies, strict=True)}


def _shares(share: float, weighted: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Split ``share`` between keys in proportion to their weights."""
    total = sum(weight for _, weight in weighted)
    if share <= 0 or total <= 0:
        return []
    return [(key, share * weight / total) for key, weight in weighted if weight > 0]
