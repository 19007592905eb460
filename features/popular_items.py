"""The popular list a serving replica holds in memory: the floor under every list and the last fallback.

Refreshed periodically from what is trending now (the online store's global trending set) and
from the popularity the current model release was trained with; when both are empty (a fresh
deployment before any event) the newest catalog items stand in. Items taken down or blocked are
dropped at refresh time, because the last fallback is served when Redis cannot be asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol, TypeVar

from redis.exceptions import RedisError

from features.online_store import OnlineFeatureStore
from features.redis_store import RedisStore, StoreUnavailable
from features.trending import TrendingScope


class PopularListHolder(Protocol):
    """Anything that serves a popular list and takes a new one (the popular candidate source)."""

    def replace(self, popular: Sequence[tuple[str, float]]) -> None:
        """Serve ``popular`` from now on."""
        ...


_Holder = TypeVar("_Holder", bound=PopularListHolder)


def _normalised(rows: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    positive = [(i, s) for i, s in rows if s > 0]
    if not positive:
        return []
    top = max(s for _, s in positive)
    return [(i, s / top) for i, s in positive]


class PopularItems:
    """The replica's popular list, and the popular sources that serve it.

    Args:
        store: The Redis store (removal and block sets).
        online: The online store (trending).
        size: Items kept.

    Attributes:
        items: ``(item_id, popularity)``, best first; replaced whole on refresh.
    """

    def __init__(self, store: RedisStore, online: OnlineFeatureStore, *, size: int = 200) -> None:
        self._store = store
        self._online = online
        self.size = size
        self.items: tuple[tuple[str, float], ...] = ()
        self._sources: list[PopularListHolder] = []

    def attach(self, source: _Holder) -> _Holder:
        """Serve this list through ``source`` from now on (it gets every refresh).

        Args:
            source: A popular source of some surface's pipeline.

        Returns:
            The source.
        """
        source.replace(self.items)
        self._sources.append(source)
        return source

    def top(self, k: int, exclude: frozenset[str] = frozenset()) -> list[tuple[str, float]]:
        """The ``k`` most popular items not in ``exclude``."""
        return [(i, s) for i, s in self.items if i not in exclude][:k]

    async def refresh(
        self, model_popular: Sequence[tuple[str, float]], newest: Sequence[str], now: datetime
    ) -> int:
        """Rebuild the list: trending first, then the model's popularity, then the newest items.

        Args:
            model_popular: ``(item_id, popularity)`` of the serving release (empty without one).
            newest: Newest catalog items, newest first, for an empty day without a model.
            now: The instant trending is read for.

        Returns:
            Items in the new list.

        Raises:
            StoreUnavailable: Redis could not be reached and a list is already held (it stays).
                A replica that has none yet takes the model's popularity and the newest items
                unchecked: the last fallback must have something to serve.
        """
        try:
            trending = await self._online.atop_trending(TrendingScope.everywhere(), self.size, now)
        except (StoreUnavailable, RedisError, OSError):
            if self.items:
                raise
            trending = []
        merged: dict[str, float] = {}
        # Trending outranks model popularity (it is live), which outranks mere recency.
        for item_id, score in _normalised(trending):
            merged.setdefault(item_id, 2.0 + score)
        for item_id, score in _normalised(model_popular):
            merged.setdefault(item_id, 1.0 + score)
        for rank, item_id in enumerate(newest):
            merged.setdefault(item_id, 0.5 / (1 + rank))
        ranked = sorted(merged.items(), key=lambda pair: (-pair[1], pair[0]))[: self.size * 2]
        try:
            kept = await self._servable(ranked)
        except StoreUnavailable:
            if self.items:
                raise
            kept = ranked
        self.items = tuple(kept[: self.size])
        for source in self._sources:
            source.replace(self.items)
        return len(self.items)

    async def _servable(self, ranked: list[tuple[str, float]]) -> list[tuple[str, float]]:
        if not ranked:
            return []
        ids = [i for i, _ in ranked]
        keys = self._store.keys
        with self._store.guard():
            pipe = self._store.aclient.pipeline(transaction=False)
            pipe.smismember(keys.items_active(), ids)
            pipe.smismember(keys.removed_items(), ids)
            pipe.smismember(keys.blocked_items(), ids)
            active, removed, blocked = await pipe.execute()
        return [
            pair
            for pair, is_active, is_removed, is_blocked in zip(ranked, active, removed, blocked, strict=True)
            if is_active and not is_removed and not is_blocked
        ]
