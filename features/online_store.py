"""The online feature store: per-entity view states and serving records in Redis.

Layout (key names from :class:`features.keys.RedisKeys`):

- ``{ns}:feature-state:{entity}:{id}`` HASH, field = view name, value = the view's JSON state
  (one JSON string per entity per view), plus field ``_v`` (:data:`VERSION_FIELD`), a token
  every write replaces. Expires ``state_ttl_s`` after the last update.
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
It reads the processed markers of the batch, the erased flags of its users and the states it will
fold into (with their version tokens); folds; and hands every write (states with a new token,
serving records, trending increments, exclusions and the processed markers) to one Lua script,
:data:`APPLY_SCRIPT`. The script first checks that no marker appeared, no user was erased and
every state still carries the token it was read with, and writes only then; scripts run
atomically, so either all of a batch's effects land, markers included, or none do. A crash before
the script leaves nothing, a crash after it leaves markers that make the redelivered events
no-ops. A concurrent writer that got in first changes a token or adds a marker, the check fails,
and the batch is re-read and re-folded, so two consumers never lose each other's updates.

Why a script rather than ``WATCH``/``MULTI``/``EXEC``: a batch touches thousands of keys, and
Redis checks each key of a ``WATCH`` against every key the connection already watches, so the
cost grows with the square of the keys (1,000 keys took 10 ms, the 5,000 of a 2,000-event batch
a quarter of a second, during which the server answers nobody); and a command per write meant
packing and parsing thousands of replies in Python, which was most of the processor's time. The
script checks and writes in time linear in the keys, and a batch costs a few commands however
many entities it touches.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

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

READ_STATES_SCRIPT: Final = """#!lua flags=no-writes
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('HGETALL', KEYS[i])
end
return out
"""
"""``HGETALL`` of every key given, as one command: one flat field/value list per key."""

VERSION_FIELD: Final = "_v"
"""Field of a feature-state hash holding the token of its last write (see the module docstring)."""

APPLY_SCRIPT: Final = """
-- Checks, then writes; nothing is written unless every check passes.
-- ARGV[1..3]: m markers, s states, u users (KEYS: the m markers, the s state hashes, then the
-- erased-user set when u > 0). ARGV then holds the s expected version tokens, the u user ids,
-- their u expected erased flags ('0' or '1') and the new token.
-- Writes: six counts (HSET, EXPIRE, SET EX, ZINCRBY, EXPIREAT, SADD); KEYS continues with their
-- keys in that order and ARGV with the rest of their arguments in the same order.
local m, s, u = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local a = 4
local done = {}
for i = 1, m do
  if redis.call('EXISTS', KEYS[i]) == 1 then done[#done + 1] = i end
end
if #done > 0 then return {0, done} end
for i = 1, s do
  if (redis.call('HGET', KEYS[m + i], '_v') or '') ~= ARGV[a] then return {2, i} end
  a = a + 1
end
local k = m + s + 1
if u > 0 then
  for i = 1, u do
    if tostring(redis.call('SISMEMBER', KEYS[k], ARGV[a + i - 1])) ~= ARGV[a + u + i - 1] then
      return {2, 0}
    end
  end
  a = a + 2 * u
  k = k + 1
end
local token = ARGV[a]
a = a + 1
local c = {}
for i = 1, 6 do c[i] = tonumber(ARGV[a + i - 1]) end
a = a + 6
for i = 1, s do
  redis.call('HSET', KEYS[m + i], '_v', token)
end
for _ = 1, c[1] do
  redis.call('HSET', KEYS[k], ARGV[a], ARGV[a + 1]); k = k + 1; a = a + 2
end
for _ = 1, c[2] do
  redis.call('EXPIRE', KEYS[k], ARGV[a]); k = k + 1; a = a + 1
end
for _ = 1, c[3] do
  redis.call('SET', KEYS[k], ARGV[a], 'EX', ARGV[a + 1]); k = k + 1; a = a + 2
end
for _ = 1, c[4] do
  redis.call('ZINCRBY', KEYS[k], ARGV[a], ARGV[a + 1]); k = k + 1; a = a + 2
end
for _ = 1, c[5] do
  redis.call('EXPIREAT', KEYS[k], ARGV[a]); k = k + 1; a = a + 1
end
for _ = 1, c[6] do
  redis.call('SADD', KEYS[k], ARGV[a]); k = k + 1; a = a + 1
end
return {1}
"""
"""Check-and-write of one batch (or one backfill), atomically; answers ``{1}`` when written,
``{0, indexes}`` (1-based) of the markers that already exist, or ``{2, …}`` when a state or an
erased flag changed since it was read."""


class _StateChanged(Exception):
    """A state or erased flag changed between the read and the write: read and fold again."""


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


# NaN or infinity in a state is a bug upstream; refuse it rather than store invalid JSON. States
# and records are trees decoded from JSON or built by the folds, never cyclic, so the encoder
# skips the cycle bookkeeping; one shared encoder saves building one per call.
_dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False, check_circular=False).encode


class _Fresh(dict[str, Any]):
    """A state decoded for one fold and held by nothing else.

    Every view's ``update`` deep-copies its input so the caller's state stays untouched. A state
    just decoded from Redis has no other holder, so that copy (slower than decoding the JSON
    again) is wasted: ``copy.deepcopy`` hands back this same object and the fold updates it in
    place.
    """

    __slots__ = ()

    def __deepcopy__(self, memo: dict[int, Any]) -> _Fresh:
        return self


def _loads_state(raw: str) -> State:
    state = json.loads(raw)
    return _Fresh(state) if isinstance(state, dict) else state


def _iso(now: datetime) -> str:
    return now.isoformat().replace("+00:00", "Z")


class _Writes:
    """The writes of one transaction, collected by kind for :data:`APPLY_SCRIPT`."""

    __slots__ = ("_args", "_keys")

    def __init__(self) -> None:
        # One (keys, args) pair per command kind, in the order APPLY_SCRIPT applies them.
        self._keys: tuple[list[str], ...] = ([], [], [], [], [], [])
        self._args: tuple[list[str | int | float], ...] = ([], [], [], [], [], [])

    def hset(self, key: str, field: str, value: str) -> None:
        self._keys[0].append(key)
        self._args[0].extend((field, value))

    def expire(self, key: str, ttl_s: int) -> None:
        self._keys[1].append(key)
        self._args[1].append(ttl_s)

    def set(self, key: str, value: str, ex: int) -> None:
        self._keys[2].append(key)
        self._args[2].extend((value, ex))

    def zincrby(self, key: str, amount: float, member: str) -> None:
        self._keys[3].append(key)
        # repr keeps every digit of the double, as redis-py's own ZINCRBY encoding does.
        self._args[3].extend((repr(float(amount)), member))

    def expireat(self, key: str, at_s: int) -> None:
        self._keys[4].append(key)
        self._args[4].append(at_s)

    def sadd(self, key: str, member: str) -> None:
        self._keys[5].append(key)
        self._args[5].append(member)

    def keys(self) -> list[str]:
        """The keys written, in script order."""
        return [key for part in self._keys for key in part]

    def args(self) -> list[str | int | float]:
        """The six counts, then the other arguments, in script order."""
        return [*(len(part) for part in self._keys), *(arg for part in self._args for arg in part)]


def _hashes(replies: Sequence[Sequence[str]]) -> list[dict[str, str]]:
    # READ_STATES_SCRIPT answers flat [field, value, field, value, ...] lists.
    out: list[dict[str, str]] = []
    for flat in replies:
        pairs = iter(flat)
        out.append(dict(zip(pairs, pairs, strict=True)))
    return out


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
        # Looked up for every entity of every batch; the view list never changes after this.
        self._entity_views = {e: tuple(v for v in self.views if v.entity is e) for e in EntityType}
        self._entity_ttl_s = {
            e: max((v.state_ttl_s for v in vs), default=0) for e, vs in self._entity_views.items()
        }
        self.processed_ttl_s = processed_ttl_s
        self.max_retries = max_retries
        self._clock = clock

    def _views_of(self, entity_type: EntityType) -> tuple[FeatureView, ...]:
        return self._entity_views[entity_type]

    def _record_ttl_s(self, entity_type: EntityType) -> int:
        return self._entity_ttl_s[entity_type]

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
            with self.store.guard():
                current = self._read_hashes(list(state_keys.values()))
                writes = _Writes()
                for eid, key in state_keys.items():
                    views = self._decode_views(entity, current[key])
                    views[view.name] = states[eid]
                    writes.hset(key, view.name, _dumps(states[eid]))
                    writes.expire(key, self._record_ttl_s(entity))
                    self._queue_record(writes, entity, eid, views, at)
                try:
                    self._apply([], {key: current[key] for key in state_keys.values()}, {}, writes)
                except _StateChanged:
                    continue
                return len(states)
        raise ApplyConflict(f"write_states of {len(states)} {view.name} states kept conflicting")

    def _read_hashes(self, keys: Sequence[str]) -> dict[str, dict[str, str]]:
        if not keys:
            return {}
        replies = self.store.client.eval(READ_STATES_SCRIPT, len(keys), *keys)
        return dict(zip(keys, _hashes(replies), strict=True))

    def _decode_views(self, entity: EntityType, raw: Mapping[str, str]) -> dict[str, State]:
        return {v.name: _loads_state(raw[v.name]) if v.name in raw else {} for v in self._views_of(entity)}

    def _queue_record(
        self, writes: _Writes, entity: EntityType, entity_id: str, states: Mapping[str, State], now: datetime
    ) -> None:
        record: dict[str, FeatureValue | str] = {}
        for v in self._views_of(entity):
            record.update(v.serve_refs(states[v.name], now, self.params))
        record[UPDATED_AT] = _iso(now)
        writes.set(self.keys.features(entity, entity_id), _dumps(record), ex=self._record_ttl_s(entity))

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
            except _StateChanged:
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

    def _apply(
        self,
        markers: Sequence[str],
        states: Mapping[str, Mapping[str, str]],
        erased_by_user: Mapping[str, bool],
        writes: _Writes,
    ) -> set[int]:
        """Run :data:`APPLY_SCRIPT`: the writes, provided nothing read has changed.

        Args:
            markers: Processed markers that must still be absent.
            states: State hash key to the hash as read (its token is checked, then replaced).
            erased_by_user: User id to whether it was erased when read.
            writes: Everything to write.

        Returns:
            The 1-based indexes of ``markers`` that exist now (nothing was written then); empty
            when the writes were made.

        Raises:
            _StateChanged: A state or erased flag changed since it was read; nothing was written.
            StoreUnavailable: Redis could not be reached.
        """
        users = list(erased_by_user)
        check_keys = [*markers, *states, *([self.keys.erased_users()] if users else [])]
        args: list[str | int | float] = [
            len(markers),
            len(states),
            len(users),
            *(raw.get(VERSION_FIELD, "") for raw in states.values()),
            *users,
            *("1" if erased_by_user[u] else "0" for u in users),
            uuid.uuid4().hex,
            *writes.args(),
        ]
        keys = [*check_keys, *writes.keys()]
        with self.store.guard():
            reply = self.store.client.eval(APPLY_SCRIPT, len(keys), *keys, *args)
        status = int(reply[0])
        if status == 0:
            return {int(i) for i in reply[1]}
        if status == 2:
            raise _StateChanged
        return set()

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
        with self.store.guard():
            reader = self.store.client.pipeline(transaction=False)
            reader.mget(markers)
            reader.smismember(keys.erased_users(), user_ids)
            if state_keys:
                reader.eval(READ_STATES_SCRIPT, len(state_keys), *state_keys.values())
            replies = reader.execute()
        done, erased_flags = replies[0], replies[1]
        raw_states = _hashes(replies[2]) if state_keys else []
        if any(flag is not None for flag in done):
            return [e for e, flag in zip(pending, done, strict=True) if flag is None]
        erased_by_user = {u: bool(flag) for u, flag in zip(user_ids, erased_flags, strict=True)}
        erased = {u for u, flag in erased_by_user.items() if flag}
        plan = self._plan(pending, items, erased, opted_out) if erased else routed
        raw_by_entity = dict(zip(state_keys, raw_states, strict=True))
        now = self._clock()

        writes = _Writes()
        for entity, by_view in plan.groups.items():
            entity_type, entity_id = entity
            states = self._decode_views(entity_type, raw_by_entity[entity])
            key = state_keys[entity]
            for name, view_events in by_view.items():
                states[name] = self._by_name[name].update(states[name], view_events, items, self.params)
                writes.hset(key, name, _dumps(states[name]))
            writes.expire(key, self._record_ttl_s(entity_type))
            self._queue_record(writes, entity_type, entity_id, states, now)
        for (scope, epoch), amounts in trending.increments(plan.events, items, self.params).items():
            zkey = scope.key(keys, epoch)
            for item_id, amount in amounts.items():
                writes.zincrby(zkey, amount, item_id)
            writes.expireat(zkey, trending.expire_at_s(epoch, self.params))
        for event in plan.events:
            if event.event_type in NEGATIVE_FEEDBACK:
                writes.sadd(keys.exclusions(event.user_id), event.item_id)
        for marker in markers:
            writes.set(marker, "1", ex=self.processed_ttl_s)
        # Only the states folded need their tokens checked: an erased user's state is not written.
        folded = {state_keys[entity]: raw_by_entity[entity] for entity in plan.groups}
        done_now = self._apply(markers, folded, erased_by_user, writes)
        if done_now:
            return [e for i, e in enumerate(pending, start=1) if i not in done_now]
        return ApplyResult(
            applied=len(plan.events),
            skipped=len(plan.erased),
            entities=len(plan.groups),
            applied_by_type=dict(Counter(e.event_type.value for e in plan.events)),
        )


def _personalized(user_record: Mapping[str, Any]) -> bool:
    # Only an explicit opt-out counts; a record without the flag keeps the default (personalised).
    return user_record.get("personalization") is not False
