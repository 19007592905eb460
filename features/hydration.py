"""Item feature hydration: catalog fields, item engagement and creator quality for every candidate.

One ``MGET`` reads, for all candidates at once, the item serving records (``item_engagement``),
the catalog records the :class:`~features.catalog_cache.CatalogCache` lacks, and the creator
serving records (``creator_quality``) of the creators the cache already knows. Only on a cache
miss does a second, small ``MGET`` follow for the creators of the items just read. Values whose
``ttl_s`` ran out are dropped exactly as :func:`features.definitions.serving_features` does.

A decoded serving record is also remembered with a hash of the raw text it came from: most
candidates are long-tail items whose records did not change since the last request, and for them
the hash matches and the feature map is reused instead of decoded and validated again (a 64-bit
hash collision between two versions of one item's record, the only way this could serve stale
engagement features, is negligible).

With ``record_ttl_s`` (the service sets it from ``ServingOptions.item_record_ttl_s``, 1 s by
default), a serving record read for one request is used as it is by the requests of the next
``record_ttl_s`` seconds instead of being read again (seed section 16: cached item features).
Consecutive requests share most of their candidates (trending, popular and the head of the
catalog): at 25 requests/s per replica on the 100k-item benchmark world, 65 % of the item records
a request needs were read by another request less than a second before. Engagement counters then
lag by at most that long; nothing that decides what may be served (removals, blocks, exclusions)
is in these records, and it is read on every request by the serving-state stage.

Within the same window a candidate's whole merged map is reused: while the records it was built
from may still be reused, none of its windowed values has run out, and the candidate arrives with
the very feature map it was merged with (almost always a shared serving-flag map), the next
request gets that map back from one lookup instead of the catalog lookup, the record lookups and
the merge. This halved the stage's CPU on the benchmark world (4.2-4.9 to 2.4-2.6 ms a request).
A catalog change then reaches the merged map at most ``record_ttl_s`` after it reaches the
catalog cache.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from functools import partial
from typing import Any, Final, cast

from core.schema import EntityType
from core.types import EMPTY_FEATURES, Candidate, FeatureInput, FeatureMap, RequestContext
from features.catalog_cache import CatalogCache, CatalogEntry
from features.definitions import SPECS, UPDATED_AT
from features.redis_store import RedisStore
from features.serving_record import loads as load_record

logger = logging.getLogger(__name__)

_FOREVER: Final = float("inf")

DEFAULT_ITEM_REFS: Final[tuple[str, ...]] = (
    "item_engagement:ctr_7d",
    "item_engagement:like_rate_7d",
    "item_engagement:trending_score",
    "item_engagement:event_count_total",
    "item_engagement:view_count_7d",
    "item_engagement:click_count_7d",
    "item_engagement:like_count_7d",
    "item_engagement:purchase_count_7d",
    "item_engagement:watch_count_7d",
    "item_engagement:view_count_24h",
    "item_engagement:click_count_24h",
    "item_engagement:last_event_ts",
)
"""Item features attached by default: what the pre-scorer, the bandit and the ranker read."""

DEFAULT_CREATOR_REFS: Final[tuple[str, ...]] = (
    "creator_quality:quality_score",
    "creator_quality:report_rate",
)
"""Creator features attached by default."""


class _RecordReader:
    """Turns serving records into feature maps of selected references, memoised on the raw text."""

    def __init__(self, refs: Sequence[str], max_entries: int) -> None:
        unknown = [ref for ref in refs if ref not in SPECS]
        if unknown:
            raise ValueError(f"unknown feature references {unknown}; see features.definitions.SPECS")
        self._ttl_s = {ref: SPECS[ref].ttl_s for ref in refs}
        self._max_entries = max_entries
        # entity id -> (hash of the raw text, the instant the map stops being valid, the map)
        self._memo: OrderedDict[str, tuple[int, float, FeatureMap]] = OrderedDict()

    def read(self, entity_id: str, raw: str | None, now_s: float) -> tuple[FeatureMap, float]:
        """The map of ``raw`` and the instant (seconds since the epoch) it stops being valid."""
        if raw is None:
            return EMPTY_FEATURES, _FOREVER
        digest = hash(raw)
        memo = self._memo.get(entity_id)
        if memo is not None and memo[0] == digest and now_s < memo[1]:
            self._memo.move_to_end(entity_id)
            return memo[2], memo[1]
        features, valid_until = self._decode(entity_id, raw, now_s)
        self._memo[entity_id] = (digest, valid_until, features)
        self._memo.move_to_end(entity_id)
        if len(self._memo) > self._max_entries:
            self._memo.popitem(last=False)
        return features, valid_until

    def _decode(self, entity_id: str, raw: str, now_s: float) -> tuple[FeatureMap, float]:
        try:
            record = load_record(raw)
            if record is None:  # a layout of other feature definitions: logged by load_record
                return EMPTY_FEATURES, now_s + 60.0
            stamp = record.get(UPDATED_AT)
            written_s = datetime.fromisoformat(stamp).timestamp() if isinstance(stamp, str) else now_s
        except (ValueError, AttributeError) as exc:
            logger.warning("serving record of %r is unreadable; served without it: %s", entity_id, exc)
            return EMPTY_FEATURES, now_s + 60.0
        age_s = now_s - written_s
        kept: dict[str, FeatureInput] = {}
        valid_until = float("inf")
        for ref, ttl_s in self._ttl_s.items():
            if ref not in record:
                continue
            if ttl_s is not None:
                if age_s > ttl_s:
                    continue
                valid_until = min(valid_until, written_s + ttl_s)
            kept[ref] = record[ref]
        return FeatureMap(kept), valid_until


class ItemFeatureHydrator:
    """Attaches ``item:*`` catalog fields, item engagement and creator quality features.

    Output keeps the input's length and order (the ``FeatureHydrator`` contract). Items missing
    from the catalog keep their features unchanged; the filters have already removed them when
    the pipeline runs the serving-state hydrator.

    Args:
        store: The Redis store.
        catalog_cache: Shared catalog cache (share it with the ``RequestStateLoader`` so the
            records that stage reads are not read twice).
        item_refs: Item serving features to attach.
        creator_refs: Creator serving features to attach.
        name: Stage id.
        budget_ms: Time the hydration may take.
        memo_entries: Serving records remembered with their decoded maps.
        record_ttl_s: How long a serving record read for one request, and the map merged from
            it, are reused by the next ones; 0 reads and merges every record on every request.
        clock: Monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        store: RedisStore,
        catalog_cache: CatalogCache,
        *,
        item_refs: Sequence[str] = DEFAULT_ITEM_REFS,
        creator_refs: Sequence[str] = DEFAULT_CREATOR_REFS,
        name: str = "item_features",
        budget_ms: float = 20.0,
        memo_entries: int = 100_000,
        record_ttl_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if record_ttl_s < 0:
            raise ValueError(f"record_ttl_s must be at least 0, not {record_ttl_s}")
        self.name = name
        self.budget_ms = budget_ms
        self._store = store
        self._cache = catalog_cache
        self._items = _RecordReader(item_refs, memo_entries)
        self._creators = _RecordReader(creator_refs, memo_entries)
        self._memo_entries = memo_entries
        # Item id -> the merge's inputs (catalog entry, item map, creator map, the candidate's own
        # map), the merged map, the monotonic instant the records it came from stop being
        # reusable, and the instant in seconds since the epoch its first windowed value runs out.
        self._combined: OrderedDict[
            str, tuple[CatalogEntry | None, FeatureMap, FeatureMap, FeatureMap, FeatureMap, float, float]
        ] = OrderedDict()
        # Key names of hot items, so the key layout is applied once per item, not once per request.
        self._item_key = functools.lru_cache(maxsize=memo_entries)(
            partial(store.keys.features, EntityType.ITEM)
        )
        self._creator_key = functools.lru_cache(maxsize=memo_entries)(
            partial(store.keys.features, EntityType.CREATOR)
        )
        self._record_ttl_s = record_ttl_s
        self._clock = clock
        # Raw serving records recently read, by key: (monotonic instant they expire, the text).
        # The same str object is handed to the readers again, so its hash is not computed again.
        self._recent: dict[str, tuple[float, str | None]] = {}

    async def hydrate(self, ctx: RequestContext, cands: list[Candidate]) -> list[Candidate]:
        """Attach the features to every candidate.

        Args:
            ctx: The request; ``ctx.now`` decides which windowed values are still valid.
            cands: Candidates to enrich.

        Returns:
            ``cands`` with the features merged into each (candidate values already present lose).

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        now_s = ctx.now.timestamp()
        pending = self._reuse_hydrated(cands, now_s) if self._record_ttl_s else cands
        if pending:
            await self._hydrate_afresh(ctx, pending, now_s)
        return cands

    def _reuse_hydrated(self, cands: list[Candidate], now_s: float) -> list[Candidate]:
        """Give back the merged map of candidates hydrated within the reuse window; returns the rest.

        A merged map is reused while every serving record it was built from may still be reused
        (``record_ttl_s`` from its read), every windowed value in it is still valid at
        ``now_s``, and the candidate's own features are the very map they were merged with.
        Most candidates of a request were hydrated by another one less than a second before,
        and for them this one lookup replaces the catalog lookup, the key names, the record
        lookups and the merge.
        """
        now, combined = self._clock(), self._combined
        pending: list[Candidate] = []
        for cand in cands:
            hit = combined.get(cand.item_id)
            if hit is not None and hit[3] is cand.features and now < hit[5] and now_s < hit[6]:
                cand.features = hit[4]
            else:
                pending.append(cand)
        return pending

    async def _hydrate_afresh(self, ctx: RequestContext, cands: list[Candidate], now_s: float) -> None:
        """Read, decode and merge the features of ``cands``, remembering each merged map."""
        keys = self._store.keys
        ids = list(dict.fromkeys(c.item_id for c in cands))
        entries, missing = self._cache.get_many(ids)
        creators = list(dict.fromkeys(e.creator_id for e in entries.values()))
        item_keys = [self._item_key(i) for i in ids]
        creator_keys = [self._creator_key(c) for c in creators]
        wanted = item_keys + creator_keys
        records = self._recent_records(wanted)
        to_read = [k for k in wanted if k not in records]
        catalog_keys = [keys.item(i) for i in missing]
        with self._store.guard():
            # The clients decode replies (decode_responses=True), so values are str, never bytes.
            key_list = to_read + catalog_keys
            raw = cast(list[str | None], await self._store.aclient.mget(key_list) if key_list else [])
        records.update(self._remember(to_read, raw[: len(to_read)]))
        catalog_raw = raw[len(to_read) :]
        item_raw = [records[k] for k in item_keys]
        creator_raw = {c: records[k] for c, k in zip(creators, creator_keys, strict=True)}

        fresh = _catalog_entries(missing, catalog_raw)
        if fresh:
            self._cache.put_many(fresh.values())
            entries.update(fresh)
            late = list(
                dict.fromkeys(e.creator_id for e in fresh.values() if e.creator_id not in creator_raw)
            )
            if late:
                late_keys = [self._creator_key(c) for c in late]
                late_records = self._recent_records(late_keys)
                unread = [k for k in late_keys if k not in late_records]
                if unread:
                    with self._store.guard():
                        late_raw = cast(list[str | None], await self._store.aclient.mget(unread))
                    late_records.update(self._remember(unread, late_raw))
                creator_raw.update((c, late_records[k]) for c, k in zip(late, late_keys, strict=True))

        creator_maps = {c: self._creators.read(c, text, now_s) for c, text in creator_raw.items()}
        no_creator = (EMPTY_FEATURES, _FOREVER)
        recent, ttl = self._recent, self._record_ttl_s
        parts: dict[str, tuple[CatalogEntry | None, FeatureMap, FeatureMap, float, float]] = {}
        for item_id, item_key, text in zip(ids, item_keys, item_raw, strict=True):
            entry = entries.get(item_id)
            item_map, valid_until = self._items.read(item_id, text, now_s)
            item_read = recent.get(item_key) if ttl else None
            reusable_until = item_read[0] if item_read else 0.0
            if entry is None:
                creator_map = EMPTY_FEATURES
            else:
                creator_map, creator_valid_until = creator_maps.get(entry.creator_id, no_creator)
                valid_until = min(valid_until, creator_valid_until)
                if ttl:
                    creator_read = recent.get(self._creator_key(entry.creator_id))
                    reusable_until = min(reusable_until, creator_read[0] if creator_read else 0.0)
            parts[item_id] = (entry, item_map, creator_map, reusable_until, valid_until)
        for cand in cands:
            # Values a source or an earlier stage set win: they are about this request.
            cand.features = self._combine(cand.item_id, *parts[cand.item_id], cand.features)

    def _recent_records(self, keys: Sequence[str]) -> dict[str, str | None]:
        """The records of ``keys`` read less than ``record_ttl_s`` ago (see the module docstring)."""
        if not self._record_ttl_s:
            return {}
        now, recent = self._clock(), self._recent
        out: dict[str, str | None] = {}
        for key in keys:
            hit = recent.get(key)
            if hit is not None and now < hit[0]:
                out[key] = hit[1]
        return out

    def _remember(self, keys: Sequence[str], raw: Sequence[str | None]) -> dict[str, str | None]:
        """Keep records just read for ``record_ttl_s``; returns them by key."""
        read = dict(zip(keys, raw, strict=True))
        if not self._record_ttl_s or not read:
            return read
        now, recent = self._clock(), self._recent
        # Kept in order of expiry (each write goes to the end), so what expired is at the front.
        stale = list(itertools.takewhile(lambda key: recent[key][0] <= now, recent))
        overflow = len(recent) - len(stale) + len(read) - self._memo_entries
        if overflow > 0:
            stale += list(itertools.islice(recent, len(stale), len(stale) + overflow))
        for key in stale:
            del recent[key]
        expires = now + self._record_ttl_s
        for key, text in read.items():
            recent.pop(key, None)
            recent[key] = (expires, text)
        return read

    def _combine(
        self,
        item_id: str,
        entry: CatalogEntry | None,
        item_map: FeatureMap,
        creator_map: FeatureMap,
        reusable_until: float,
        valid_until: float,
        own: FeatureMap,
    ) -> FeatureMap:
        """Catalog, item and creator features under the candidate's own, reused while all four are unchanged.

        A candidate's own features are almost always one of the few shared serving-flag maps, so
        the merged map of an item is the same object from one request to the next, and no
        candidate's features are copied. The map is remembered with the bounds of its reuse
        without a merge (``reusable_until``, ``valid_until``: see :meth:`_reuse_hydrated`).
        """
        memo = self._combined.get(item_id)
        # The readers, the cache and the flag maps return the very same objects while nothing changed.
        if (
            memo is not None
            and memo[0] is entry
            and memo[1] is item_map
            and memo[2] is creator_map
            and memo[3] is own
        ):
            final = memo[4]
        else:
            merged = item_map if entry is None else entry.features.union(item_map).union(creator_map)
            final = merged.union(own)
        self._combined[item_id] = (entry, item_map, creator_map, own, final, reusable_until, valid_until)
        self._combined.move_to_end(item_id)
        if len(self._combined) > self._memo_entries:
            self._combined.popitem(last=False)
        return final


def _catalog_entries(item_ids: Iterable[str], raw: Sequence[str | None]) -> dict[str, CatalogEntry]:
    out: dict[str, CatalogEntry] = {}
    for item_id, text in zip(item_ids, raw, strict=True):
        if text is None:
            continue
        try:
            record: Mapping[str, Any] = json.loads(text)
            out[item_id] = CatalogEntry.from_record(record)
        except (KeyError, TypeError, ValueError) as exc:
            logger.warning("catalog record of item %r is unreadable; hydrated without it: %s", item_id, exc)
    return out
