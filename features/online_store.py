"""The online feature store: per-entity view states and serving records in Redis.

Layout (key names from :class:`features.keys.RedisKeys`):

- ``{ns}:feature-state:{entity}:{id}`` HASH, field = view name, value = the view's JSON state
  (one JSON string per entity per view). Expires ``state_ttl_s`` after the last update.
- ``{ns}:features:{entity}:{id}`` STRING, the packed serving record: JSON object of
  ``view:feature`` reference to value for every view of the entity, plus ``"updated_at"``
  (ISO 8601, UTC). The request path reads a batch of them with one ``MGET``.
- ``{ns}:processed:{event_id}`` STRING ``"1"`` with a TTL (:attr:`OnlineFeatureStore.processed_ttl_s`):
  the event was applied. Per-id keys rather than one set, because they expire on their own while
  a set grows until someone prunes it; the TTL must exceed any redelivery delay (entries are
  claimed within minutes; seven days by default).
- ``{ns}:trending-{global,region,category}:{epoch}[:{value}]`` ZSET (see :mod:`features.trending`).
- ``{ns}:excluded:{user}`` SET of item ids (hide, not interested, report).

Exactly-once effects: :meth:`OnlineFeatureStore.apply_events` runs an optimistic transaction.
It ``WATCH``es the processed markers of the batch, the states it will fold into and the erased-user
set; reads them; folds; and writes states, serving records, trending increments, exclusions and
the processed markers in one ``MULTI``/``EXEC``. Either all of a batch's effects land, markers
included, or none do; a crash before ``EXEC`` leaves nothing, a crash after it leaves markers
that make the redelivered events no-ops. A concurrent writer touching a watched key makes
``EXEC`` fail and the batch is re-read and re-folded, so two consumers never lose each other's
updates.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from redis.exceptions import WatchError

from core.schema import NEGATIVE_FEEDBACK, EntityType, utcnow
from core.types import FeatureMap, FeatureValue
from features import trending
from features.definitions import UPDATED_AT, VIEWS, serving_features
from features.params import DAY_S, DEFAULT_PARAMS, FeatureParams
from features.records import EventRecord, ItemInfo
from features.redis_store import RedisStore
from features.spec import FeatureView, State
from features.trending import TrendingScope

logger = logging.getLogger(__name__)

PROCESSED_TTL_S: Final = int(7 * DAY_S)
"""Default lifetime of a processed-event marker."""


class ApplyConflict(RuntimeError):
    """A batch kept conflicting with concurrent writers and was not applied (safe to retry)."""


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What :meth:`OnlineFeatureStore.apply_events` did with a batch.

    Attributes:
        applied: Events folded into features now.
        duplicates: Events applied before (earlier batch or repeated within this one): no effect.
        skipped: Events of erased users: marked processed, never folded.
        entities: Entity states written.
        retries: Transactions retried after a concurrent write.
        applied_by_type: ``applied`` split by event type.
    """

    applied: int = 0
    duplicates: int = 0
    skipped: int = 0
    entities: int = 0
    retries: int = 0
    applied_by_type: Mapping[str, int] = field(default_factory=dict)


def _dumps(value: Any) -> str:
    # NaN or infinity in a state is a bug upstream; refuse it rather than store invalid JSON.
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def _iso(now: datetime) -> str:
    return now.isoformat().replace("+00:00", "Z")


@dataclass(slots=True)
class _Plan:
    """The routing of a batch: which entity states each event folds into."""

    events: list[EventRecord]
    erased: list[EventRecord]
    groups: dict[tuple[EntityType, str], dict[str, list[EventRecord]]]


class OnlineFeatureStore:
    """Reads and writes the online features of one namespace.

    Args:
        store: The Redis store.
        params: Fold constants; must equal those of the offline computation.
        views: The views to maintain (all of :data:`features.definitions.VIEWS` by default).
        processed_ttl_s: Lifetime of processed-event markers.
        max_retries: Transactions retried on conflicts before :class:`ApplyConflict`.
        clock: Current time, timezone-aware (injectable for tests).
    """

    def __init__(
        self,
        store: RedisStore,
        *,
        params: FeatureParams = DEFAULT_PARAMS,
        views: Sequence[FeatureView] = VIEWS,
        processed_ttl_s: int = PROCESSED_TTL_S,
        max_retries: int = 20,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.keys = store.keys
        self.params = params
        self.views = tuple(views)
        self._by_name = {v.name: v for v in self.views}
        self.processed_ttl_s = processed_ttl_s
        self.max_retries = max_retries
        self._clock = clock

    def _views_of(self, entity_type: EntityType) -> tuple[FeatureView, ...]:
        return tuple(v for v in self.views if v.entity is entity_type)

    def _record_ttl_s(self, entity_type: EntityType) -> int:
        return max(v.state_ttl_s for v in self._views_of(entity_type))

    # -- the request path ----------------------------------------------------------------------

    def get_serving(self, entity_type: EntityType, ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """The packed serving records of entities, with one ``MGET``.

        Args:
            entity_type: Their type.
            ids: Entity ids.

        Returns:
            One record per id, in order (``view:feature`` to value plus ``updated_at``); ``None``
            where an entity has no features yet.

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        return self.store.mget_json([self.keys.features(entity_type, i) for i in ids])

    async def aget_serving(self, entity_type: EntityType, ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """Async :meth:`get_serving` on the asyncio pool."""
        return await self.store.amget_json([self.keys.features(entity_type, i) for i in ids])

    def get_features(
        self, entity_type: EntityType, ids: Sequence[str], now: datetime | None = None
    ) -> list[FeatureMap]:
        """Serving records as feature maps, expired values dropped (see :func:`serving_features`).

        Args:
            entity_type: Their type.
            ids: Entity ids.
            now: The request's instant; the clock when omitted.

        Returns:
            One map per id, in order; empty for entities without features.
        """
        at = now or self._clock()
        return [serving_features(r, at) for r in self.get_serving(entity_type, ids)]

    async def aget_features(
        self, entity_type: EntityType, ids: Sequence[str], now: datetime | None = None
    ) -> list[FeatureMap]:
        """Async :meth:`get_features` on the asyncio pool."""
        at = now or self._clock()
        return [serving_features(r, at) for r in await self.aget_serving(entity_type, ids)]

    def top_trending(
        self, scope: TrendingScope, limit: int, now: datetime | None = None
    ) -> list[tuple[str, float]]:
        """The currently trending items of a scope.

        Args:
            scope: Global, one region or one category.
            limit: How many items.
            now: The instant; the clock when omitted.

        Returns:
            ``(item_id, decayed weight as of now)``, highest first.
        """
        now_s = (now or self._clock()).timestamp()
        epoch = trending.epoch_of(now_s, self.params)
        with self.store.guard():
            rows = self.store.client.zrevrange(scope.key(self.keys, epoch), 0, limit - 1, withscores=True)
        return self._scored(rows, epoch, now_s)

    def _scored(self, rows: Any, epoch: int, now_s: float) -> list[tuple[str, float]]:
        return [(str(m), trending.current_score(float(s), epoch, now_s, self.params)) for m, s in rows]

    async def atop_trending(
        self, scope: TrendingScope, limit: int, now: datetime | None = None
    ) -> list[tuple[str, float]]:
        """Async :meth:`top_trending` on the asyncio pool."""
        now_s = (now or self._clock()).timestamp()
        epoch = trending.epoch_of(now_s, self.params)
        rows = await self.store.aclient.zrevrange(scope.key(self.keys, epoch), 0, limit - 1, withscores=True)
        return self._scored(rows, epoch, now_s)

    def record_exclusion(self, user_id: str, item_id: str) -> bool:
        """Exclude an item for a user at once (hide, not interested, report).

        This is the synchronous write the API makes before it answers, so the very next request
        already filters the item; the stream processor adds it again later, harmlessly.

        Returns:
            True when the item was not excluded before.

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        with self.store.guard():
            return bool(self.store.client.sadd(self.keys.exclusions(user_id), item_id))

    async def arecord_exclusion(self, user_id: str, item_id: str) -> bool:
        """Async :meth:`record_exclusion` on the asyncio pool."""
        return bool(await self.store.aclient.sadd(self.keys.exclusions(user_id), item_id))

    # -- states --------------------------------------------------------------------------------

    def read_states(self, view: FeatureView, ids: Sequence[str]) -> list[State | None]:
        """The stored states of one view for some entities, in one pipeline.

        Returns:
            One state per id, in order; ``None`` where the entity has none.
        """
        if not ids:
            return []
        with self.store.guard():
            pipe = self.store.client.pipeline(transaction=False)
            for entity_id in ids:
                pipe.hget(self.keys.feature_state(view.entity, entity_id), view.name)
            raw = pipe.execute()
        return [None if r is None else json.loads(r) for r in raw]

    def write_states(
        self, view: FeatureView, states: Mapping[str, State], now: datetime | None = None
    ) -> int:
        """Replace some entities' states of one view and refresh their serving records.

        Used to load states computed offline (backfill). Runs the same optimistic transaction as
        :meth:`apply_events`, so it is safe while the stream processor runs, though events the
        processor applied in between are overwritten by the offline state.

        Args:
            view: The view.
            states: Entity id to its new state.
            now: Instant the serving records are computed for; the clock when omitted.

        Returns:
            How many states were written.
        """
        if not states:
            return 0
        at = now or self._clock()
        entity = view.entity
        state_keys = {eid: self.keys.feature_state(entity, eid) for eid in states}
        for _ in range(self.max_retries + 1):
            try:
                with self.store.guard(), self.store.client.pipeline(transaction=True) as tx:
                    tx.watch(*state_keys.values())  # type: ignore[no-untyped-call]
                    current = self._read_hashes(list(state_keys.values()))
                    tx.multi()
                    for eid, key in state_keys.items():
                        views = self._decode_views(entity, current[key])
                        views[view.name] = states[eid]
                        tx.hset(key, view.name, _dumps(states[eid]))
                        tx.expire(key, self._record_ttl_s(entity))
                        self._queue_record(tx, entity, eid, views, at)
                    tx.execute()
                    return len(states)
            except WatchError:
                continue
        raise ApplyConflict(f"write_states of {len(states)} {view.name} states kept conflicting")

    def _read_hashes(self, keys: Sequence[str]) -> dict[str, dict[str, str]]:
        # A separate connection is fine after WATCH: anything changed since then fails EXEC anyway.
        pipe = self.store.client.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        return dict(zip(keys, pipe.execute(), strict=True))

    def _decode_views(self, entity: EntityType, raw: Mapping[str, str]) -> dict[str, State]:
        return {v.name: json.loads(raw[v.name]) if v.name in raw else {} for v in self._views_of(entity)}

    def _queue_record(
        self, tx: Any, entity: EntityType, entity_id: str, states: Mapping[str, State], now: datetime
    ) -> None:
        record: dict[str, FeatureValue | str] = {}
        for v in self._views_of(entity):
            record.update(v.serve_refs(states[v.name], now, self.params))
        record[UPDATED_AT] = _iso(now)
        tx.set(self.keys.features(entity, entity_id), _dumps(record), ex=self._record_ttl_s(entity))

    # -- the write path ------------------------------------------------------------------------

    def item_infos(self, item_ids: Sequence[str]) -> dict[str, ItemInfo]:
        """Catalog info of items, from their packed records; unknown or unreadable items are left out."""
        records = self.store.mget_json([self.keys.item(i) for i in item_ids])
        return self._infos(item_ids, records)

    @staticmethod
    def _infos(item_ids: Sequence[str], records: Sequence[Mapping[str, Any] | None]) -> dict[str, ItemInfo]:
        infos: dict[str, ItemInfo] = {}
        for item_id, record in zip(item_ids, records, strict=True):
            if record is None:
                continue
            try:
                infos[item_id] = ItemInfo.from_catalog(record)
            except (KeyError, TypeError, ValueError) as exc:
                logger.warning(
                    "catalog record of item %r is unreadable, treated as unknown: %s", item_id, exc
                )
        return infos

    def _plan(
        self,
        events: Sequence[EventRecord],
        items: Mapping[str, ItemInfo],
        erased: set[str],
        opted_out: set[str],
    ) -> _Plan:
        plan = _Plan(events=[], erased=[], groups={})
        for event in events:
            if event.user_id in erased:
                plan.erased.append(event)
                continue
            plan.events.append(event)
            item = items.get(event.item_id)
            for v in self.views:
                if v.entity is EntityType.USER and event.user_id in opted_out:
                    continue  # the user asked for no behaviour features
                entity_id = v.entity_key(event, item)
                if entity_id is not None:
                    plan.groups.setdefault((v.entity, entity_id), {}).setdefault(v.name, []).append(event)
        return plan

    def apply_events(self, events: Sequence[EventRecord]) -> ApplyResult:
        """Apply a batch of events exactly once (see the module docstring).

        Events already applied (their marker exists) and repeats within the batch are dropped;
        events of erased users are only marked processed. Each entity's events are folded in
        ``(ts, event_id)`` order.

        Args:
            events: The batch, in any order.

        Returns:
            What was applied.

        Raises:
            ApplyConflict: Concurrent writers kept invalidating the transaction.
            StoreUnavailable: Redis could not be reached; nothing of the batch was applied.
        """
        first_seen: dict[str, EventRecord] = {}
        for event in events:
            first_seen.setdefault(event.event_id, event)
        unique = list(first_seen.values())
        duplicates = len(events) - len(unique)
        if not unique:
            return ApplyResult(duplicates=duplicates)
        keys = self.keys
        item_ids = sorted({e.item_id for e in unique})
        user_ids = sorted({e.user_id for e in unique})
        with self.store.guard():
            pipe = self.store.client.pipeline(transaction=False)
            pipe.mget([keys.processed_event(e.event_id) for e in unique])
            pipe.mget([keys.item(i) for i in item_ids])
            pipe.mget([keys.user(u) for u in user_ids])
            done, item_raw, user_raw = pipe.execute()
        pending = [e for e, flag in zip(unique, done, strict=True) if flag is None]
        duplicates += len(unique) - len(pending)
        items = self._infos(item_ids, [None if r is None else json.loads(r) for r in item_raw])
        opted_out = {
            u
            for u, r in zip(user_ids, user_raw, strict=True)
            if r is not None and not _personalized(json.loads(r))
        }
        retries = 0
        while pending:
            try:
                result = self._commit(pending, items, opted_out)
            except WatchError:
                retries += 1
                if retries > self.max_retries:
                    raise ApplyConflict(f"a batch of {len(pending)} events kept conflicting") from None
                continue
            if isinstance(result, ApplyResult):
                return ApplyResult(
                    applied=result.applied,
                    duplicates=duplicates,
                    skipped=result.skipped,
                    entities=result.entities,
                    retries=retries,
                    applied_by_type=result.applied_by_type,
                )
            # Some events were applied by a concurrent consumer since the first check.
            duplicates += len(pending) - len(result)
            pending = result
        return ApplyResult(duplicates=duplicates, retries=retries)

    def _commit(
        self, pending: list[EventRecord], items: Mapping[str, ItemInfo], opted_out: set[str]
    ) -> ApplyResult | list[EventRecord]:
        """One optimistic attempt; returns the still-pending events when some turned out done."""
        keys = self.keys
        markers = [keys.processed_event(e.event_id) for e in pending]
        user_ids = sorted({e.user_id for e in pending})
        # Routing needs no erased flags: erased users' events are routed, then dropped below.
        routed = self._plan(pending, items, set(), opted_out)
        state_keys = {entity: keys.feature_state(entity[0], entity[1]) for entity in routed.groups}
        with self.store.guard(), self.store.client.pipeline(transaction=True) as tx:
            tx.watch(*markers, *state_keys.values(), keys.erased_users())  # type: ignore[no-untyped-call]
            reader = self.store.client.pipeline(transaction=False)
            reader.mget(markers)
            reader.smismember(keys.erased_users(), user_ids)
            for key in state_keys.values():
                reader.hgetall(key)
            replies = reader.execute()
            done, erased_flags, raw_states = replies[0], replies[1], replies[2:]
            if any(flag is not None for flag in done):
                return [e for e, flag in zip(pending, done, strict=True) if flag is None]
            erased = {u for u, flag in zip(user_ids, erased_flags, strict=True) if flag}
            plan = self._plan(pending, items, erased, opted_out) if erased else routed
            raw_by_entity = dict(zip(state_keys, raw_states, strict=True))
            now = self._clock()

            tx.multi()
            for entity, by_view in plan.groups.items():
                entity_type, entity_id = entity
                states = self._decode_views(entity_type, raw_by_entity[entity])
                key = state_keys[entity]
                for name, view_events in by_view.items():
                    states[name] = self._by_name[name].update(states[name], view_events, items, self.params)
                    tx.hset(key, name, _dumps(states[name]))
                tx.expire(key, self._record_ttl_s(entity_type))
                self._queue_record(tx, entity_type, entity_id, states, now)
            for (scope, epoch), amounts in trending.increments(plan.events, items, self.params).items():
                zkey = scope.key(keys, epoch)
                for item_id, amount in amounts.items():
                    tx.zincrby(zkey, amount, item_id)
                tx.expireat(zkey, trending.expire_at_s(epoch, self.params))
            for event in plan.events:
                if event.event_type in NEGATIVE_FEEDBACK:
                    tx.sadd(keys.exclusions(event.user_id), event.item_id)
            for marker in markers:
                tx.set(marker, "1", ex=self.processed_ttl_s)
            tx.execute()
        return ApplyResult(
            applied=len(plan.events),
            skipped=len(plan.erased),
            entities=len(plan.groups),
            applied_by_type=dict(Counter(e.event_type.value for e in plan.events)),
        )


def _personalized(user_record: Mapping[str, Any]) -> bool:
    # Only an explicit opt-out counts; a record without the flag keeps the default (personalised).
    return user_record.get("personalization") is not False
