"""The list last served to each user on each surface: the first fallback of a failed request.

Two copies: an LRU in the replica's memory (answers even when Redis does not) and a JSON copy in
Redis with a TTL (so another replica, or this one after a restart, can serve it). A served list is
kept only when the pipeline produced it, never when it was itself a fallback, so a long outage
does not keep re-serving the same stale popular list as if it were personal.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from core.deadlines import within
from features.redis_store import RedisStore, StoreUnavailable

DEFAULT_TTL_S: Final = 24 * 3600
"""How long a served list stays usable as a fallback."""


@dataclass(frozen=True, slots=True)
class ServedEntry:
    """One item of a remembered list.

    Attributes:
        item_id: The item.
        score: Its score when it was served.
        reason: Its reason when it was served.
        sources: The sources that produced it.
    """

    item_id: str
    score: float
    reason: str
    sources: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ServedList:
    """A list as it was served.

    Attributes:
        entries: The items, in served order.
        model_version: Bundle version that produced it.
        served_at_s: When, epoch seconds.
    """

    entries: tuple[ServedEntry, ...]
    model_version: str
    served_at_s: float

    def to_json(self) -> str:
        """Compact JSON for the Redis copy."""
        return json.dumps(
            {
                "v": self.model_version,
                "t": self.served_at_s,
                "i": [[e.item_id, e.score, e.reason, list(e.sources)] for e in self.entries],
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> ServedList:
        """Inverse of :meth:`to_json`.

        Raises:
            ValueError: The text is not a list written by :meth:`to_json`.
        """
        try:
            raw: dict[str, Any] = json.loads(text)
            entries = tuple(
                ServedEntry(str(i), float(s), str(r), tuple(str(x) for x in src)) for i, s, r, src in raw["i"]
            )
            return cls(entries=entries, model_version=str(raw["v"]), served_at_s=float(raw["t"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a served list: {exc}") from exc


class LastServedLists:
    """The last list per (surface, user): a bounded in-memory LRU and a Redis copy.

    Args:
        store: The Redis store.
        max_entries: Lists kept in memory.
        ttl_s: Lifetime of a list, in memory and in Redis.
        clock: Wall clock in epoch seconds (injectable for tests).
    """

    def __init__(
        self,
        store: RedisStore,
        *,
        max_entries: int = 10_000,
        ttl_s: int = DEFAULT_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        assert max_entries >= 1, f"max_entries must be positive, got {max_entries}"
        self._store = store
        self._max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._lists: OrderedDict[tuple[str, str], ServedList] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lists)

    def remember(self, surface: str, user_id: str, served: ServedList) -> None:
        """Keep a list in memory (the newest wins; the oldest user drops out past ``max_entries``)."""
        key = (surface, user_id)
        self._lists[key] = served
        self._lists.move_to_end(key)
        if len(self._lists) > self._max_entries:
            self._lists.popitem(last=False)

    def recall_local(self, surface: str, user_id: str) -> ServedList | None:
        """The list in memory, if it is there and younger than ``ttl_s``."""
        found = self._lists.get((surface, user_id))
        if found is None or self._clock() - found.served_at_s > self.ttl_s:
            return None
        self._lists.move_to_end((surface, user_id))
        return found

    def queue_save(self, pipe: Any, surface: str, user_id: str, served: ServedList) -> None:
        """Add the write of the Redis copy to a pipeline (one command), so it shares a round trip.

        Args:
            pipe: An asyncio Redis pipeline; its caller handles the reply (a failed write leaves
                the in-memory copy serving this replica).
            surface: The surface.
            user_id: The list's key (the user, with the seed item on seeded surfaces).
            served: The list.
        """
        pipe.set(self._store.keys.last_list(surface, user_id), served.to_json(), ex=self.ttl_s)

    async def recall_remote(self, surface: str, user_id: str, budget_ms: float) -> ServedList | None:
        """The Redis copy, or None when there is none, it is unreadable, or Redis is down or late.

        Args:
            surface: The surface.
            user_id: The user.
            budget_ms: Time the read may take.

        Returns:
            The list, also kept in memory from now on.
        """
        key = self._store.keys.last_list(surface, user_id)
        try:
            with self._store.guard():
                text = await within(self._store.aclient.get(key), budget_ms / 1000.0)
        except (StoreUnavailable, TimeoutError):
            return None
        if not isinstance(text, str):
            return None
        try:
            served = ServedList.from_json(text)
        except ValueError:
            return None
        self.remember(surface, user_id, served)
        return served
