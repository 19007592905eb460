"""The safety state of one request: removals, blocks and exclusions, read fresh from Redis.

Seed section 18 asks for strong consistency here: an item taken down, a creator blocked or an
item hidden must not be served on the very next request. So nothing of this state is cached; it
is read once per request, for exactly the candidates at hand, in one pipelined round trip:

- ``SMISMEMBER`` of the candidate ids in the global removed-items and blocked-items sets and in
  the user's exclusion set (the sets may be large; only membership of the candidates is asked);
- ``SMEMBERS`` of the global and the user's blocked-creator sets (small);
- ``MGET`` of the catalog records of the candidates whose creator is not in the catalog cache.

Which creator made an item is catalog data, not safety state: it comes from the
:class:`~features.catalog_cache.CatalogCache` when the cache holds the item. The blocked-creator
sets themselves are always read fresh.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.types import RequestContext
from features.catalog_cache import CatalogCache, CatalogEntry
from features.redis_store import RedisStore

logger = logging.getLogger(__name__)


def _frozen(members: Sequence[str], flags: Sequence[Any]) -> frozenset[str]:
    return frozenset(m for m, flag in zip(members, flags, strict=True) if flag)


@dataclass(frozen=True, slots=True)
class RequestState:
    """What the filters enforce for one request, as read from Redis for its candidates.

    Attributes:
        removed: Candidate ids taken down, or unknown to the catalog (their creator cannot be
            checked, so they are not served either).
        blocked_items: Candidate ids an operator blocked for everyone.
        blocked_creators: Creator ids an operator blocked for everyone.
        user_blocked_creators: Creator ids the user blocked.
        excluded: Candidate ids the user hid, marked not interested or reported.
        creator_of: Creator id of every candidate the catalog knows.
    """

    removed: frozenset[str] = frozenset()
    blocked_items: frozenset[str] = frozenset()
    blocked_creators: frozenset[str] = frozenset()
    user_blocked_creators: frozenset[str] = frozenset()
    excluded: frozenset[str] = frozenset()
    creator_of: Mapping[str, str] = field(default_factory=dict)

    def is_creator_blocked(self, item_id: str) -> bool:
        """Whether an operator blocked the item's creator."""
        creator = self.creator_of.get(item_id)
        return creator is not None and creator in self.blocked_creators

    def is_creator_blocked_by_user(self, item_id: str) -> bool:
        """Whether the user blocked the item's creator."""
        creator = self.creator_of.get(item_id)
        return creator is not None and creator in self.user_blocked_creators


class RequestStateLoader:
    """Reads a request's :class:`RequestState` in one pipelined round trip.

    Args:
        store: The Redis store.
        catalog_cache: Where creators of known items are looked up and fresh catalog records are
            put; without one every candidate's record is read.
    """

    def __init__(self, store: RedisStore, catalog_cache: CatalogCache | None = None) -> None:
        self._store = store
        self._cache = catalog_cache

    async def load(self, ctx: RequestContext, candidate_ids: Sequence[str]) -> RequestState:
        """Read the state for ``candidate_ids``.

        Args:
            ctx: The request (its ``user_id`` selects the exclusion and blocked-creator sets).
            candidate_ids: The ids to check, each once.

        Returns:
            The state.

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        ids = list(candidate_ids)
        keys = self._store.keys
        cached: dict[str, CatalogEntry] = {}
        to_read = ids
        if self._cache is not None:
            cached, to_read = self._cache.get_many(ids)
        # guard() only wraps exceptions, so it holds across the await.
        with self._store.guard():
            pipe = self._store.aclient.pipeline(transaction=False)
            if ids:
                pipe.smismember(keys.removed_items(), ids)
                pipe.smismember(keys.blocked_items(), ids)
                pipe.smismember(keys.exclusions(ctx.user_id), ids)
            pipe.smembers(keys.blocked_creators_global())
            pipe.smembers(keys.blocked_creators(ctx.user_id))
            if to_read:
                pipe.mget([keys.item(i) for i in to_read])
            replies = await pipe.execute()
        if not ids:
            return RequestState(
                blocked_creators=frozenset(replies[0]), user_blocked_creators=frozenset(replies[1])
            )
        removed_flags, blocked_flags, excluded_flags, blocked_creators, user_blocked = replies[:5]
        creator_of = {item_id: entry.creator_id for item_id, entry in cached.items()}
        unknown: list[str] = []
        if to_read:
            fresh = self._read_records(to_read, replies[5], unknown)
            creator_of.update((entry.item_id, entry.creator_id) for entry in fresh)
            if self._cache is not None:
                self._cache.put_many(fresh)
        return RequestState(
            removed=_frozen(ids, removed_flags) | frozenset(unknown),
            blocked_items=_frozen(ids, blocked_flags),
            blocked_creators=frozenset(blocked_creators),
            user_blocked_creators=frozenset(user_blocked),
            excluded=_frozen(ids, excluded_flags),
            creator_of=creator_of,
        )

    @staticmethod
    def _read_records(
        item_ids: Sequence[str], raw: Sequence[str | None], unknown: list[str]
    ) -> list[CatalogEntry]:
        entries: list[CatalogEntry] = []
        for item_id, text in zip(item_ids, raw, strict=True):
            if text is None:
                unknown.append(item_id)
                continue
            try:
                entries.append(CatalogEntry.from_record(json.loads(text)))
            except (KeyError, TypeError, ValueError) as exc:
                # An unreadable record cannot prove the item safe to serve.
                logger.warning("catalog record of item %r is unreadable; not served: %s", item_id, exc)
                unknown.append(item_id)
        return entries
