"""An in-process LRU cache of the catalog fields serving needs, with a time-to-live.

Category, creator, tags and creation time of an item change rarely, so a replica keeps them
instead of reading every candidate's catalog record on every request. Removal is not a catalog
field here: it is enforced by the filters from state read fresh on every request, so a stale
entry can only ever be late by ``ttl_s`` on a re-categorisation, never serve a removed item.

Behind the LRU, a cache may be backed by the entries of the replica's content index
(:meth:`CatalogCache.back_with`), which holds every active item's entry, decoded when the catalog
last changed. A lookup the LRU cannot answer is answered from there, so only items the index
does not hold (removed, or added since its build) are read from Redis. On the 100k-item
benchmark world, without the backing, about 27 records a request (4 % of the lookups) were read
and decoded on the request path. A backing entry is as fresh as the index: while Redis answers,
at most one catalog refresh (``ServingOptions.catalog_refresh_s``, 60 s) behind a catalog write,
within the LRU's own ``ttl_s``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from core.types import FeatureInput, FeatureMap
from features.candidate_refs import (
    ITEM_CATEGORY,
    ITEM_CREATED_AT_S,
    ITEM_CREATOR_ID,
    ITEM_LANGUAGE,
    ITEM_REGION,
    ITEM_TAGS,
    ITEM_TITLE,
    ITEM_TYPE,
)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """The catalog fields of one item that serving reads, with their feature map built once.

    Attributes:
        item_id: The item.
        category: Its category.
        creator_id: Its creator.
        tags: Its tags.
        created_at_s: Creation time, epoch seconds, when known.
        item_type: ``video``, ``product``, ..., when known.
        title: Display title, when known.
        region: ``metadata.region``, when set.
        language: ``metadata.language``, when set.
        features: The fields as ``item:*`` features, ready to merge into a candidate's map.
    """

    item_id: str
    category: str
    creator_id: str
    tags: tuple[str, ...]
    created_at_s: float | None
    item_type: str | None
    title: str | None
    region: str | None
    language: str | None
    features: FeatureMap

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> CatalogEntry:
        """The entry of a packed catalog record (``{ns}:item:{id}``, see :mod:`features.catalog`).

        Args:
            record: The decoded JSON object.

        Returns:
            The entry.

        Raises:
            KeyError: ``item_id``, ``category`` or ``creator_id`` is missing.
            ValueError: ``created_at`` is not ISO 8601.
        """
        item_id, category, creator_id = record["item_id"], record["category"], record["creator_id"]
        created = record.get("created_at")
        created_at_s = datetime.fromisoformat(created).timestamp() if isinstance(created, str) else None
        metadata = record.get("metadata")
        meta: Mapping[str, Any] = metadata if isinstance(metadata, Mapping) else {}
        tags = tuple(str(tag) for tag in record.get("tags") or ())
        values: dict[str, FeatureInput] = {
            ITEM_CATEGORY: str(category),
            ITEM_CREATOR_ID: str(creator_id),
            ITEM_TAGS: tags,
            ITEM_CREATED_AT_S: created_at_s,
            ITEM_TYPE: _text(record.get("item_type")),
            ITEM_TITLE: _text(record.get("title")),
            ITEM_REGION: _text(meta.get("region")),
            ITEM_LANGUAGE: _text(meta.get("language")),
        }
        return cls(
            item_id=str(item_id),
            category=str(category),
            creator_id=str(creator_id),
            tags=tags,
            created_at_s=created_at_s,
            item_type=_text(record.get("item_type")),
            title=_text(record.get("title")),
            region=_text(meta.get("region")),
            language=_text(meta.get("language")),
            features=FeatureMap(values),
        )


class CatalogCache:
    """Least-recently-used catalog entries, each kept at most ``ttl_s`` seconds.

    Not thread-safe: one per event loop (a Serve replica runs its requests on one loop).

    Args:
        max_entries: Entries kept; the least recently used goes first beyond it.
        ttl_s: Seconds an entry is served before it is read from Redis again.
        clock: Monotonic clock in seconds (injectable for tests).
    """

    def __init__(
        self, max_entries: int = 100_000, ttl_s: float = 300.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, CatalogEntry]] = OrderedDict()
        self._backing: Mapping[str, CatalogEntry] = {}
        self.hits = 0
        self.misses = 0

    def back_with(self, entries: Mapping[str, CatalogEntry]) -> None:
        """Answer lookups the LRU cannot from ``entries`` (a content index's), from now on.

        Args:
            entries: Item id to entry; replaced whole by the next call, never copied or mutated.
        """
        self._backing = entries

    def __len__(self) -> int:
        return len(self._entries)

    def get_many(self, item_ids: Sequence[str]) -> tuple[dict[str, CatalogEntry], list[str]]:
        """Look items up.

        Args:
            item_ids: Items to look up.

        Returns:
            The fresh entries found, and the ids (each once, in input order) to read from Redis.
        """
        now = self._clock()
        found: dict[str, CatalogEntry] = {}
        missing: dict[str, None] = {}
        entries, backing = self._entries, self._backing
        for item_id in item_ids:
            slot = entries.get(item_id)
            if slot is not None and slot[0] > now:
                entries.move_to_end(item_id)
                found[item_id] = slot[1]
            else:
                entry = backing.get(item_id)
                if entry is not None:
                    found[item_id] = entry
                else:
                    missing[item_id] = None
        self.hits += len(found)
        self.misses += len(missing)
        return found, list(missing)

    def put_many(self, entries: Iterable[CatalogEntry]) -> None:
        """Store fresh entries (read from Redis just now)."""
        expires = self._clock() + self.ttl_s
        store = self._entries
        for entry in entries:
            store[entry.item_id] = (expires, entry)
            store.move_to_end(entry.item_id)
        while len(store) > self.max_entries:
            store.popitem(last=False)

    def clear(self) -> None:
        """Forget every entry, the backing ones included."""
        self._entries.clear()
        self._backing = {}
