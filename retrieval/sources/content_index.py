"""An in-memory inverted index of the active catalog: category and tag to items, newest first.

Redis keeps per-creator item sets but no per-category or per-tag lists, and content retrieval
wants "newest first within a category", so a replica builds this index from the catalog records
off the request path (at start and on a refresh timer) and swaps it in whole. An item removed
since the last build may still be listed: the filters drop it on every request. An item added
since is missing until the next build; trending and the ANN delta index cover new items meanwhile.

A rebuild reads every record again (one ``MGET`` per thousand items is cheap) but decodes only
those whose text changed since the build before: at 100k items, decoding all of them took each
ingress replica 2 s of CPU a minute, and the loading thread held the GIL against requests.

A rebuild is skipped altogether while the catalog is unchanged: every write of item records bumps
the catalog version (``{ns}:items:version``, see :meth:`features.keys.RedisKeys.items_version`),
an index remembers the version it was built from, and a refresh first reads that one key. Even
without decoding, a rebuild of 100k items costs about 0.6 s of CPU in a thread that contends with
requests for the GIL, and requests served meanwhile run several times slower (the serving
benchmark's p99).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

from features.catalog_cache import CatalogEntry
from features.redis_store import RedisStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ContentIndex:
    """Category and tag postings over the active items, newest first.

    Build with :meth:`from_entries` or :meth:`load`; never mutated afterwards.

    Attributes:
        by_category: Category to item ids, newest first.
        by_tag: Tag to item ids, newest first.
        entries: Item id to its catalog entry.
        digests: Item id to the hash of the record text its entry was decoded from (indexes built
            by :meth:`load` only), so the next load can tell which records changed.
        newest: Every indexed item, newest first.
        version: The catalog version the index was built from (see :func:`catalog_version`);
            None when unknown, and then every refresh rebuilds.
    """

    by_category: Mapping[str, tuple[str, ...]]
    by_tag: Mapping[str, tuple[str, ...]]
    entries: Mapping[str, CatalogEntry]
    digests: Mapping[str, int] = field(default_factory=dict)
    newest: tuple[str, ...] = ()
    version: int | None = None

    @classmethod
    def from_entries(
        cls,
        entries: Iterable[CatalogEntry],
        *,
        digests: Mapping[str, int] | None = None,
        version: int | None = None,
    ) -> ContentIndex:
        """Index catalog entries.

        Args:
            entries: Active items (each once; a repeat replaces the earlier entry).
            digests: Hashes of the records the entries were decoded from, kept for :meth:`load`.
            version: The catalog version the entries were read at.

        Returns:
            The index; items without a creation time sort last, ties by id.
        """
        by_id = {entry.item_id: entry for entry in entries}
        newest_first = sorted(
            by_id.values(),
            key=lambda e: (-(e.created_at_s if e.created_at_s is not None else float("-inf")), e.item_id),
        )
        categories: dict[str, list[str]] = {}
        tags: dict[str, list[str]] = {}
        for entry in newest_first:
            categories.setdefault(entry.category, []).append(entry.item_id)
            for tag in entry.tags:
                tags.setdefault(tag, []).append(entry.item_id)
        return cls(
            by_category={c: tuple(ids) for c, ids in categories.items()},
            by_tag={t: tuple(ids) for t, ids in tags.items()},
            entries=by_id,
            digests=dict(digests or {}),
            newest=tuple(entry.item_id for entry in newest_first),
            version=version,
        )

    @classmethod
    def load(
        cls,
        store: RedisStore,
        *,
        batch: int = 1000,
        previous: ContentIndex | None = None,
    ) -> ContentIndex:
        """Build the index from the active-items set and the item records in Redis.

        Blocking (``SSCAN`` and ``MGET`` in batches); call it from a thread or at start-up.

        Args:
            store: The Redis store.
            batch: Items per ``MGET``.
            previous: The index this one replaces: an item whose record text is unchanged
                keeps its entry instead of being decoded again.

        Returns:
            The index.

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        keys = store.keys
        # Read before the records: a write during the scan bumps it past this value, so the next
        # refresh rebuilds rather than keeping an index that missed the write.
        version = catalog_version(store)
        entries: list[CatalogEntry] = []
        digests: dict[str, int] = {}
        pending: list[str] = []
        known = previous.digests if previous is not None else {}
        indexed = previous.entries if previous is not None else {}

        def flush() -> None:
            # The client decodes replies (decode_responses=True), so values are str.
            raws = cast(list[str | None], store.client.mget([keys.item(i) for i in pending]))
            for item_id, raw in zip(pending, raws, strict=True):
                if raw is None:
                    continue
                digest = hash(raw)
                entry = indexed.get(item_id)
                if entry is None or known.get(item_id) != digest:
                    entry = _decode(item_id, raw)
                    if entry is None:
                        continue
                entries.append(entry)
                digests[item_id] = digest
            pending.clear()

        with store.guard():
            for item_id in store.client.sscan_iter(keys.items_active(), count=batch):
                pending.append(item_id)
                if len(pending) >= batch:
                    flush()
            if pending:
                flush()
        return cls.from_entries(entries, digests=digests, version=version)

    def __len__(self) -> int:
        return len(self.entries)

    def category(self, category: str) -> tuple[str, ...]:
        """Items of a category, newest first."""
        return self.by_category.get(category, ())

    def tag(self, tag: str) -> tuple[str, ...]:
        """Items with a tag, newest first."""
        return self.by_tag.get(tag, ())

    def newest_first(self, item_ids: Iterable[str]) -> list[str]:
        """``item_ids`` ordered newest first; ids the index does not know go last, by id."""
        known: list[tuple[float, str]] = []
        unknown: list[str] = []
        for item_id in item_ids:
            entry = self.entries.get(item_id)
            if entry is None or entry.created_at_s is None:
                unknown.append(item_id)
            else:
                known.append((-entry.created_at_s, item_id))
        return [item_id for _, item_id in sorted(known)] + sorted(unknown)

    def top_tags(self, item_ids: Sequence[str], limit: int) -> list[tuple[str, int]]:
        """The most frequent tags of some items: ``(tag, count)``, most frequent first."""
        counts: Counter[str] = Counter()
        for item_id in item_ids:
            entry = self.entries.get(item_id)
            if entry is not None:
                counts.update(entry.tags)
        return sorted(counts.items(), key=lambda pair: (-pair[1], pair[0]))[:limit]

    def top_creators(self, item_ids: Sequence[str], limit: int) -> list[tuple[str, int]]:
        """The most frequent creators of some items: ``(creator_id, count)``, most frequent first."""
        counts = Counter(self.entries[i].creator_id for i in item_ids if i in self.entries)
        return sorted(counts.items(), key=lambda pair: (-pair[1], pair[0]))[:limit]


def _version(raw: object) -> int | None:
    try:
        return int(cast(str, raw)) if raw is not None else None
    except ValueError:
        return None


def catalog_version(store: RedisStore) -> int | None:
    """The catalog version (bumped by every write of item records); None when never written.

    Raises:
        StoreUnavailable: Redis could not be reached.
    """
    with store.guard():
        return _version(store.client.get(store.keys.items_version()))


async def acatalog_version(store: RedisStore) -> int | None:
    """:func:`catalog_version` on the event loop's client.

    Raises:
        StoreUnavailable: Redis could not be reached.
    """
    with store.guard():
        return _version(await store.aclient.get(store.keys.items_version()))


def _decode(item_id: str, raw: str) -> CatalogEntry | None:
    """The entry of an active item's record text; None for an inactive or unreadable record."""
    try:
        record = json.loads(raw)
        if not isinstance(record, dict):
            raise TypeError(f"expected a JSON object, found {type(record).__name__}")
        if record.get("status", "active") != "active":
            return None
        return CatalogEntry.from_record(record)
    except (KeyError, TypeError, ValueError) as exc:
        logger.warning("catalog record of item %r is unreadable; not indexed: %s", item_id, exc)
        return None
