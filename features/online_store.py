"""The online feature store: per-entity view states and serving records in Redis.

Layout (key names from :class:`features.keys.RedisKeys`):

- ``{ns}:state:{entity}:{id}`` STRING: a version token of :data:`TOKEN_LEN` characters, which
  every write replaces, then a JSON object of view name to the view's state (views never folded
  left out). Expires ``state_ttl_s`` after the last update. One string rather than a hash of
  views: a batch reads the states it lacks with one ``MGET`` (a script running ``HGETALL`` per
  key cost Redis ten times as much per state), checks a token with ``GETRANGE`` and writes a
  state with one ``SET`` (``HSET`` and ``EXPIRE`` before). An entity's views all belong to one
  feature partition (see :mod:`features.partitions`), so one writer owns the whole value.
- ``{ns}:features:{entity}:{id}`` STRING, the packed serving record: a positional JSON array
  (layout id, ``updated_at`` in ISO 8601 UTC, then the value of every feature of the entity's
  views; see :mod:`features.serving_record`). The request path reads a batch of them with one
  ``MGET`` and gets each as a ``view:feature`` reference to value mapping.
- ``{ns}:processed:{partition}:{minute}`` SET of event ids: the event was applied to that feature
  partition (see :mod:`features.partitions`). One set per minute of *event* time
  (:data:`PROCESSED_BUCKET_S`; ``minute`` counts from the Unix epoch), so every copy of an event
  (a redelivered entry, a client's retry) looks in the same set, and a batch, whose events mostly
  share a minute or two, checks and writes its markers with a command or two per set rather
  than one per event. Each write sets the set's TTL (:attr:`OnlineFeatureStore.processed_ttl_s`)
  again, so a marker lives at least that long after it was written, and the sets expire on their
  own; the TTL must exceed any redelivery delay (entries are claimed within minutes; an hour by
  default, `Settings.processed_ttl_s`).
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

A store made with ``state_cache_size`` (the stream processor's) keeps the states it wrote, with
the token it wrote them with, and folds the next batch onto those instead of reading and decoding
them again; the script checks their tokens the same way, so a state another writer changed in
between is a conflict and is read again. Hot items and creators recur in nearly every batch, and
reading and decoding their states was a good part of a batch's work.

Why a script rather than ``WATCH``/``MULTI``/``EXEC``: a batch touches thousands of keys, and
Redis checks each key of a ``WATCH`` against every key the connection already watches, so the
cost grows with the square of the keys (1,000 keys took 10 ms, the 5,000 of a 2,000-event batch
a quarter of a second, during which the server answers nobody); and a command per write meant
packing and parsing thousands of replies in Python, which was most of the processor's time. The
script checks and writes in time linear in the keys, and a batch costs a few commands however
many entities it touches.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from typing import Any, Final, TypeAlias

import orjson

from core.schema import NEGATIVE_FEEDBACK, EntityType, utcnow
from core.types import FeatureMap
from features import trending
from features.definitions import VIEWS, serving_features
from features.keys import RedisKeys
from features.params import DEFAULT_PARAMS, FeatureParams
from features.partitions import PARTITIONS, FeaturePartition
from features.records import EventRecord, ItemInfo
from features.redis_store import PendingReply, RedisStore
from features.serving_record import layout_of
from features.serving_record import loads as load_record
from features.spec import FeatureView, State
from features.trending import TrendingScope

logger = logging.getLogger(__name__)

PROCESSED_TTL_S: Final = 3_600
"""Default lifetime of a processed-event marker (``Settings.processed_ttl_s``, which says why)."""

PROCESSED_BUCKET_S: Final = 60
"""Event time whose processed markers share one set (see the module docstring)."""


def marker_bucket(ts_s: float) -> int:
    """The processed-marker set an event of time ``ts_s`` (epoch seconds) belongs in."""
    return int(ts_s // PROCESSED_BUCKET_S)


TOKEN_LEN: Final = 32
"""Length of the version token that starts every feature-state value (see the module docstring)."""

APPLY_SCRIPT: Final = """
-- Checks, then writes; nothing is written unless every check passes.
-- ARGV[1..6]: m marker sets, s states, u users, z trending sets, x exclusion sets, the markers'
-- TTL (each state's new value carries its new version token). KEYS: the m marker sets, the s
-- states, the erased-user set when u > 0, the s serving records (one per state, same entity),
-- the z trending sets each followed by its epoch's predecessor and successor, the x exclusion
-- sets. ARGV then holds, per marker set, its event count n and n event ids; the s expected
-- version tokens ('' for a state that does not exist), the u user ids and their u expected
-- erased flags ('0' or '1'); per state its TTL, its new value (starting with the new token) and
-- the serving record; per trending set its and its successor's EXPIREAT instants, the carry
-- factor between epochs (features.trending), member count n and n increment/member pairs; per
-- exclusion set its member count n and n members.
-- Each state is written with one SET, and the markers and erased flags are checked with one
-- multi-member command per chunk: the script's cost is mostly per argument and per command.
-- Chunks keep each unpack within Lua's limit on values.
local m, s, u = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local z, x = tonumber(ARGV[4]), tonumber(ARGV[5])
local marker_ttl = ARGV[6]
local a = 7
local chunk = 1000
local ids_at, done = {}, {}
for i = 1, m do
  local n = tonumber(ARGV[a])
  ids_at[i] = a + 1
  for first = a + 1, a + n, chunk do
    local last = math.min(first + chunk - 1, a + n)
    local flags = redis.call('SMISMEMBER', KEYS[i], unpack(ARGV, first, last))
    for j = 1, #flags do
      if flags[j] == 1 then done[#done + 1] = ARGV[first + j - 1] end
    end
  end
  a = a + n + 1
end
if #done > 0 then return {0, done} end
for i = 1, s do
  if redis.call('GETRANGE', KEYS[m + i], 0, 31) ~= ARGV[a] then return {2, i} end
  a = a + 1
end
local k = m + s + 1
if u > 0 then
  for first = 1, u, chunk do
    local last = math.min(first + chunk - 1, u)
    local flags = redis.call('SMISMEMBER', KEYS[k], unpack(ARGV, a + first - 1, a + last - 1))
    for i = first, last do
      if tostring(flags[i - first + 1]) ~= ARGV[a + u + i - 1] then return {2, 0} end
    end
  end
  a = a + 2 * u
  k = k + 1
end
for i = 1, s do
  local ttl = ARGV[a]
  redis.call('SET', KEYS[m + i], ARGV[a + 1], 'EX', ttl)
  redis.call('SET', KEYS[k], ARGV[a + 2], 'EX', ttl)
  a = a + 3
  k = k + 1
end
for _ = 1, z do
  local key, previous, following = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  local at, following_at, carry, n = ARGV[a], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3])
  a = a + 4
  if redis.call('EXISTS', key) == 0 then
    -- The epoch's first write: it starts from the previous epoch's set, rescaled.
    redis.call('ZUNIONSTORE', key, 1, previous, 'WEIGHTS', carry)
  end
  -- Late events of an epoch whose successor has begun count there too, rescaled.
  local late = redis.call('EXISTS', following) == 1
  local factor = tonumber(carry)
  for _ = 1, n do
    redis.call('ZINCRBY', key, ARGV[a], ARGV[a + 1])
    if late then
      redis.call('ZINCRBY', following, string.format('%.17g', tonumber(ARGV[a]) * factor), ARGV[a + 1])
    end
    a = a + 2
  end
  redis.call('EXPIREAT', key, at)
  if late then redis.call('EXPIREAT', following, following_at) end
  k = k + 3
end
for _ = 1, x do
  local n = tonumber(ARGV[a])
  redis.call('SADD', KEYS[k], unpack(ARGV, a + 1, a + n))
  a = a + n + 1
  k = k + 1
end
for i = 1, m do
  local first = ids_at[i]
  local last = first + tonumber(ARGV[first - 1]) - 1
  for c = first, last, chunk do
    redis.call('SADD', KEYS[i], unpack(ARGV, c, math.min(c + chunk - 1, last)))
  end
  redis.call('EXPIRE', KEYS[i], marker_ttl)
end
return {1}
"""
"""Check-and-write of one batch (or one backfill), atomically; answers ``{1}`` when written,
``{0, event ids}`` of the events already marked processed, or ``{2, …}`` when a state or an
erased flag changed since it was read."""


ITEM_INFO_CACHE_SIZE: Final = 20_000
"""Catalog records whose decoded :class:`ItemInfo` a store keeps, keyed by the record's JSON."""


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


# States and serving records are encoded and decoded with orjson: the stream processor writes
# one state and one record per entity of every batch, and the standard library's codec was the
# largest part of its time (``python -m benchmarks.stream_processor``). orjson writes compact JSON
# that reads back to the same values; it would write a non-finite float as null, but none can
# arise: every input is finite and bounded (validated timestamps, watch times up to a day), and
# ``math.exp2`` raises rather than overflowing to infinity.
_dumps = orjson.dumps


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


def _loads_record(raw: str) -> Any:
    # Catalog and user records are written by other code with the standard library, which also
    # accepts the NaN and Infinity literals orjson refuses; reading them the same way as before
    # keeps one odd record from failing every batch that touches it.
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def _iso(now: datetime) -> str:
    return now.isoformat().replace("+00:00", "Z")


_Arg: TypeAlias = str | bytes | int | float
"""One argument of a script call."""


class _Writes:
    """The writes of one transaction, laid out for :data:`APPLY_SCRIPT`.

    Each state written is also a state checked: its expected version token goes with it.
    """

    __slots__ = (
        "_exclusions",
        "_record_keys",
        "_state_args",
        "_state_keys",
        "_token_bytes",
        "_tokens",
        "_trending",
        "token",
    )

    def __init__(self) -> None:
        self.token = uuid.uuid4().hex
        """The version token every state written gets."""
        self._token_bytes = self.token.encode()
        self._state_keys: list[str] = []
        self._tokens: list[str] = []
        self._record_keys: list[str] = []
        self._state_args: list[_Arg] = []
        # Set key to its predecessor's and successor's keys, their EXPIREAT instants, the carry
        # factor and the increment/member pairs.
        self._trending: dict[str, tuple[str, str, int, int, str, list[_Arg]]] = {}
        self._exclusions: dict[str, list[str]] = {}

    def state(
        self,
        key: str,
        expected_token: str,
        ttl_s: int,
        states: Mapping[str, State],
        record_key: str,
        record: str | bytes,
    ) -> None:
        """Write one entity's state and its serving record.

        Args:
            key: The entity's state.
            expected_token: The version token it was read with (``""``: none).
            ttl_s: Lifetime of the state and of the record from now.
            states: View name to state, every view of the entity; views never folded (an empty
                state) are left out.
            record_key: The entity's serving record.
            record: The record's JSON.
        """
        self._state_keys.append(key)
        self._tokens.append(expected_token)
        self._record_keys.append(record_key)
        value = self._token_bytes + _dumps({name: state for name, state in states.items() if state})
        self._state_args.extend((ttl_s, value, record))

    def trending(
        self,
        scope: TrendingScope,
        epoch: int,
        amounts: Mapping[str, float],
        keys: RedisKeys,
        params: FeatureParams,
    ) -> None:
        """Add to the members of a scope's trending set of an epoch (see :mod:`features.trending`)."""
        key = scope.key(keys, epoch)
        args: list[_Arg] = []
        for member, amount in amounts.items():
            # repr keeps every digit of the double, as redis-py's own ZINCRBY encoding does.
            args.extend((repr(float(amount)), member))
        if key in self._trending:
            args = [*self._trending[key][-1], *args]
        self._trending[key] = (
            scope.key(keys, max(epoch - 1, 0)),
            scope.key(keys, epoch + 1),
            trending.expire_at_s(epoch, params),
            trending.expire_at_s(epoch + 1, params),
            repr(trending.carry_factor(params)),
            args,
        )

    def sadd(self, key: str, member: str) -> None:
        """Add a member to a set."""
        self._exclusions.setdefault(key, []).append(member)

    def command(
        self,
        markers: Mapping[str, Sequence[str]],
        marker_ttl_s: int,
        erased_by_user: Mapping[str, bool],
        keys: RedisKeys,
    ) -> tuple[int, list[_Arg]]:
        """The ``EVAL`` arguments after the script: the key count, and the keys then the other arguments.

        ``markers`` maps each processed-marker set to the event ids to check in it and add to it.
        """
        users = list(erased_by_user)
        key_list: list[str] = [
            *markers,
            *self._state_keys,
            *([keys.erased_users()] if users else []),
            *self._record_keys,
            *(
                k
                for key, (previous, following, *_) in self._trending.items()
                for k in (key, previous, following)
            ),
            *self._exclusions,
        ]
        args: list[_Arg] = [
            len(markers),
            len(self._state_keys),
            len(users),
            len(self._trending),
            len(self._exclusions),
            marker_ttl_s,
        ]
        for ids in markers.values():
            args.append(len(ids))
            args.extend(ids)
        args += [
            *self._tokens,
            *users,
            *("1" if erased_by_user[u] else "0" for u in users),
            *self._state_args,
        ]
        for _previous, _following, at_s, following_at_s, carry, pairs in self._trending.values():
            args.extend((at_s, following_at_s, carry, len(pairs) // 2, *pairs))
        for members in self._exclusions.values():
            args.append(len(members))
            args.extend(members)
        return len(key_list), [*key_list, *args]


@dataclass(slots=True)
class _Staged:
    """One attempt's writes, ready for :data:`APPLY_SCRIPT`, and what they amount to."""

    markers: dict[str, list[str]]
    erased_by_user: dict[str, bool]
    writes: _Writes
    written: list[tuple[str, dict[str, State]]]
    result: ApplyResult


@dataclass(frozen=True, slots=True)
class StagedApply:
    """A batch read and folded by :meth:`OnlineFeatureStore.stage_events`, not written yet.

    Attributes:
        events: The batch as given.
        generation: The store's :attr:`OnlineFeatureStore.generation` when it was staged.
        result: The outcome when there is nothing to write (every event a repeat).
        staged: The writes; ``None`` when there are none, or when the batch must be applied
            synchronously (some events turned out applied by another consumer).
    """

    events: Sequence[EventRecord]
    generation: int
    result: ApplyResult | None
    staged: _Staged | None


@dataclass(frozen=True, slots=True)
class InFlightApply:
    """A batch whose write :meth:`OnlineFeatureStore.send` started.

    Attributes:
        batch: The staged batch.
        reply: The commit script's reply to come; ``None`` when the batch was applied at once.
        result: The outcome of a batch applied at once.
    """

    batch: StagedApply
    reply: PendingReply | None
    result: ApplyResult | None


@dataclass(slots=True)
class _Plan:
    """The routing of a batch: which entity states each event folds into."""

    events: list[EventRecord]
    erased: list[EventRecord]
    groups: dict[tuple[EntityType, str], dict[str, list[EventRecord]]]


def _unique_events(events: Sequence[EventRecord]) -> tuple[list[EventRecord], int]:
    """The batch with each event id once (its first occurrence), and how many repeats were dropped."""
    first_seen: dict[str, EventRecord] = {}
    for event in events:
        first_seen.setdefault(event.event_id, event)
    unique = list(first_seen.values())
    return unique, len(events) - len(unique)


class OnlineFeatureStore:
    """Reads and writes the online features of one namespace.

    Args:
        store: The Redis store.
        params: Fold constants; must equal those of the offline computation.
        views: The views to maintain (all of :data:`features.definitions.VIEWS` by default).
        partitions: The feature partitions it applies events to (see :mod:`features.partitions`):
            only their views are folded and only their side effects (trending, exclusions)
            written, and an event counts as applied once any of their processed markers exists.
            A stream processor's store has one; the default, every partition, suits replays.
        processed_ttl_s: Lifetime of processed-event markers.
        max_retries: Transactions retried on conflicts before :class:`ApplyConflict`.
        clock: Current time, timezone-aware (injectable for tests).
        state_cache_size: Entities whose states :meth:`apply_events` keeps in memory after writing
            them, most recently written first; 0 keeps none. A cached state is used instead of
            reading and decoding it again only while Redis still holds the version token it was
            written with: the commit script checks that token as it checks one read from Redis, so
            a state another writer changed meanwhile is a conflict, read again, never lost.
    """

    def __init__(
        self,
        store: RedisStore,
        *,
        params: FeatureParams = DEFAULT_PARAMS,
        views: Sequence[FeatureView] = VIEWS,
        partitions: Sequence[FeaturePartition] = PARTITIONS,
        processed_ttl_s: int = PROCESSED_TTL_S,
        max_retries: int = 20,
        clock: Callable[[], datetime] = utcnow,
        state_cache_size: int = 0,
    ) -> None:
        if state_cache_size < 0:
            raise ValueError(f"state_cache_size must be at least 0, not {state_cache_size}")
        if not partitions:
            raise ValueError("a feature store needs at least one partition")
        self.store = store
        self.keys = store.keys
        self.params = params
        self.partitions = tuple(partitions)
        entities = frozenset(e for p in self.partitions for e in p.entities)
        self.views = tuple(v for v in views if v.entity in entities)
        self._trending = any(p.trending for p in self.partitions)
        self._exclusions = any(p.exclusions for p in self.partitions)
        # Opt-outs matter only to behaviour (user) views; the items partition skips their read.
        self._reads_opt_outs = EntityType.USER in entities
        self._marker_prefixes = tuple(self.keys.processed_prefix(p.name) for p in self.partitions)
        self._by_name = {v.name: v for v in self.views}
        # Looked up for every entity of every batch; the view list never changes after this.
        self._entity_views = {e: tuple(v for v in self.views if v.entity is e) for e in EntityType}
        self._entity_ttl_s = {
            e: max((v.state_ttl_s for v in vs), default=0) for e, vs in self._entity_views.items()
        }
        # Key prefixes by entity type (see RedisKeys.feature_state_prefix): two keys per entity
        # of every batch.
        self._state_prefix = {e: self.keys.feature_state_prefix(e) for e in EntityType}
        self._record_prefix = {e: self.keys.features_prefix(e) for e in EntityType}
        # How each event is routed, per view: (view name, entity type, entity_key, behaviour
        # view?), unpacked once rather than read off every view for every event.
        self._routes = tuple(
            (v.name, v.entity, v.entity_key, v.entity is EntityType.USER) for v in self.views
        )
        # Served names and their ``view:feature`` references, in spec order, built once.
        self._ref_order = {
            v.name: (tuple(spec.name for spec in v.specs), tuple(spec.ref for spec in v.specs))
            for v in self.views
        }
        # Each entity's serving-record layout: the default one unless other views were given.
        self._layouts = {e: layout_of(views) for e, views in self._entity_views.items() if views}
        self.processed_ttl_s = processed_ttl_s
        self.max_retries = max_retries
        self._clock = clock
        self.state_cache_size = state_cache_size
        # State key to (version token written, view name to state), oldest write first.
        self._state_cache: dict[str, tuple[str, dict[str, State]]] = {}
        self._generation = 0
        # Catalog record JSON to its info (None: unreadable). Every batch reads the records of
        # its items and hot items recur in each; decoding them again was 4% of the processor's
        # CPU. Keyed by the JSON itself, a changed record is a miss, never a stale hit.
        self._item_infos: dict[str, ItemInfo | None] = {}

    def _views_of(self, entity_type: EntityType) -> tuple[FeatureView, ...]:
        return self._entity_views[entity_type]

    def _record_ttl_s(self, entity_type: EntityType) -> int:
        return self._entity_ttl_s[entity_type]

    def _state_key(self, entity_type: EntityType, entity_id: str) -> str:
        # An empty id goes through RedisKeys, which refuses it.
        return (
            self._state_prefix[entity_type] + entity_id
            if entity_id
            else self.keys.feature_state(entity_type, entity_id)
        )

    def _record_key(self, entity_type: EntityType, entity_id: str) -> str:
        return (
            self._record_prefix[entity_type] + entity_id
            if entity_id
            else self.keys.features(entity_type, entity_id)
        )

    # -- the request path ----------------------------------------------------------------------

    def get_serving(self, entity_type: EntityType, ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """The packed serving records of entities, with one ``MGET``.

        Args:
            entity_type: Their type.
            ids: Entity ids.

        Returns:
            One record per id, in order, read as a mapping (``view:feature`` to value plus
            ``updated_at``, see :func:`features.serving_record.loads`); ``None`` where an entity
            has no features yet or its record is of a layout this release does not know.

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        return self.store.mget_json([self.keys.features(entity_type, i) for i in ids], unpack=load_record)

    async def aget_serving(self, entity_type: EntityType, ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """Async :meth:`get_serving` on the asyncio pool."""
        return await self.store.amget_json(
            [self.keys.features(entity_type, i) for i in ids], unpack=load_record
        )

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
        rows: Any = []
        with self.store.guard():
            for epoch in self._trend_epochs(now_s):
                rows = self.store.client.zrevrange(scope.key(self.keys, epoch), 0, limit - 1, withscores=True)
                if rows:
                    break
        return self._scored(rows, epoch, now_s)

    def _trend_epochs(self, now_s: float) -> tuple[int, ...]:
        """The epochs whose trending sets to read, in turn, until one has members.

        The current one, then the previous: a scope's set of an epoch starts from the previous
        one's at the epoch's first event there (see :mod:`features.trending`), so until then the
        previous set is the trend.
        """
        epoch = trending.epoch_of(now_s, self.params)
        return (epoch, epoch - 1) if epoch > 0 else (epoch,)

    def _scored(self, rows: Any, epoch: int, now_s: float) -> list[tuple[str, float]]:
        return [(str(m), trending.current_score(float(s), epoch, now_s, self.params)) for m, s in rows]

    async def atop_trending(
        self, scope: TrendingScope, limit: int, now: datetime | None = None
    ) -> list[tuple[str, float]]:
        """Async :meth:`top_trending` on the asyncio pool."""
        (rows,) = await self.atop_trending_many([(scope, limit)], now)
        return rows

    async def atop_trending_many(
        self, wanted: Sequence[tuple[TrendingScope, int]], now: datetime | None = None
    ) -> list[list[tuple[str, float]]]:
        """:meth:`atop_trending` of several scopes, each epoch's reads in one pipelined round trip.

        Args:
            wanted: ``(scope, limit)`` pairs.
            now: The instant; the clock when omitted.

        Returns:
            One list per pair, in order, as :meth:`atop_trending` returns it.
        """
        now_s = (now or self._clock()).timestamp()
        out: list[list[tuple[str, float]]] = [[] for _ in wanted]
        pending = list(range(len(wanted)))
        for epoch in self._trend_epochs(now_s):
            if not pending:
                break
            pipe = self.store.aclient.pipeline(transaction=False)
            for n in pending:
                scope, limit = wanted[n]
                pipe.zrevrange(scope.key(self.keys, epoch), 0, limit - 1, withscores=True)
            replies = await pipe.execute()
            empty: list[int] = []
            for n, rows in zip(pending, replies, strict=True):
                if rows:
                    out[n] = self._scored(rows, epoch, now_s)
                else:
                    empty.append(n)
            pending = empty
        return out

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
            raw = self.store.client.mget([self.keys.feature_state(view.entity, i) for i in ids])
        return [None if r is None else orjson.loads(r[TOKEN_LEN:]).get(view.name) for r in raw]

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
                current = self._read_states(list(state_keys.values()))
                writes = _Writes()
                ttl_s, stamp = self._record_ttl_s(entity), _iso(at)
                for eid, key in state_keys.items():
                    token, views = self._decode_state(entity, current[key])
                    views[view.name] = states[eid]
                    writes.state(
                        key,
                        token,
                        ttl_s,
                        views,
                        self.keys.features(entity, eid),
                        self._record(entity, views, at, stamp),
                    )
                try:
                    self._apply({}, {}, writes)
                except _StateChanged:
                    continue
                return len(states)
        raise ApplyConflict(f"write_states of {len(states)} {view.name} states kept conflicting")

    def _read_states(self, keys: Sequence[str]) -> dict[str, str | None]:
        if not keys:
            return {}
        raw: Any = self.store.client.mget(keys)  # a client decoding replies to str
        return dict(zip(keys, raw, strict=True))

    def _decode_state(self, entity: EntityType, raw: str | None) -> tuple[str, dict[str, State]]:
        """The version token and every view's state (empty when never folded) of a stored state."""
        if raw is None:
            return "", {v.name: {} for v in self._views_of(entity)}
        stored = orjson.loads(raw[TOKEN_LEN:])
        return raw[:TOKEN_LEN], {
            v.name: _Fresh(stored[v.name]) if v.name in stored else {} for v in self._views_of(entity)
        }

    def _record(self, entity: EntityType, states: Mapping[str, State], now: datetime, stamp: str) -> bytes:
        """The serving record of an entity's states: every view's served values, in its layout's order."""
        record = self._layouts[entity].head(stamp)
        for v in self._views_of(entity):
            served = v.serve(states[v.name], now, self.params)
            names, refs = self._ref_order[v.name]
            # The layout lists each view's references in spec order, and serve answers its names
            # in that order; a serve that did not is placed by reference instead.
            if tuple(served) == names:
                record.extend(served.values())
            else:
                by_ref = v.serve_refs(states[v.name], now, self.params)
                record.extend(by_ref[ref] for ref in refs)
        return _dumps(record)

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

    def _cached_infos(self, item_ids: Sequence[str], raws: Sequence[str | None]) -> dict[str, ItemInfo]:
        """:meth:`_infos` of raw catalog records, decoding only records not seen before."""
        cache = self._item_infos
        if len(cache) > ITEM_INFO_CACHE_SIZE:
            cache.clear()  # a catalog-sized bound; refilling costs one batch's decoding
        infos: dict[str, ItemInfo] = {}
        for item_id, raw in zip(item_ids, raws, strict=True):
            if raw is None:
                continue
            if raw in cache:
                info = cache[raw]
            else:
                info = cache[raw] = self._infos([item_id], [_loads_record(raw)]).get(item_id)
            if info is not None:
                infos[item_id] = info
        return infos

    def _plan(
        self,
        events: Sequence[EventRecord],
        items: Mapping[str, ItemInfo],
        erased: set[str],
        opted_out: set[str],
    ) -> _Plan:
        plan = _Plan(events=[], erased=[], groups={})
        groups, routes = plan.groups, self._routes
        for event in events:
            if event.user_id in erased:
                plan.erased.append(event)
                continue
            plan.events.append(event)
            item = items.get(event.item_id)
            opted = event.user_id in opted_out
            for name, entity_type, entity_key, behaviour in routes:
                if behaviour and opted:
                    continue  # the user asked for no behaviour features
                entity_id = entity_key(event, item)
                if entity_id is not None:
                    groups.setdefault((entity_type, entity_id), {}).setdefault(name, []).append(event)
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
        unique, duplicates = _unique_events(events)
        if not unique:
            return ApplyResult(duplicates=duplicates)
        # Events applied before are found by each attempt's own read of the processed markers.
        pending = unique
        items, opted_out = self._catalog(unique)
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

    def _catalog(self, events: Sequence[EventRecord]) -> tuple[dict[str, ItemInfo], set[str]]:
        """Catalog info of the events' items, and which of their users opted out of personalisation."""
        with self.store.guard():
            pipe = self.store.client.pipeline(transaction=False)
            decode = self._queue_catalog(pipe, events)
            replies = pipe.execute()
        return decode(replies)

    def _queue_catalog(
        self, pipe: Any, events: Sequence[EventRecord]
    ) -> Callable[[Sequence[Any]], tuple[dict[str, ItemInfo], set[str]]]:
        """Queue the reads of :meth:`_catalog` on a pipeline; the returned function decodes its replies.

        The reads take the first one or two replies of the pipeline.
        """
        keys = self.keys
        item_ids = sorted({e.item_id for e in events})
        user_ids = sorted({e.user_id for e in events}) if self._reads_opt_outs else []
        pipe.mget([keys.item(i) for i in item_ids])
        if user_ids:
            pipe.mget([keys.user(u) for u in user_ids])

        def decode(replies: Sequence[Any]) -> tuple[dict[str, ItemInfo], set[str]]:
            item_raw = replies[0]
            user_raw = replies[1] if user_ids else []
            opted_out = {
                u
                for u, r in zip(user_ids, user_raw, strict=True)
                if r is not None and _may_opt_out(r) and not _personalized(_loads_record(r))
            }
            return self._cached_infos(item_ids, item_raw), opted_out

        return decode

    def _remember(self, token: str, written: Sequence[tuple[str, dict[str, State]]]) -> None:
        """Cache states just written with ``token``, dropping the least recently written beyond the size."""
        size = self.state_cache_size
        if not size:
            return
        cache = self._state_cache
        for key, states in written[-size:]:
            cache.pop(key, None)  # inserted again at the end: the most recently written
            # Fresh: a fold may update them in place (see _Fresh); nothing else holds them.
            fresh = {name: _Fresh(st) if type(st) is dict else st for name, st in states.items()}
            cache[key] = (token, fresh)
        for key in list(islice(cache, max(0, len(cache) - size))):
            del cache[key]

    def _apply(
        self, markers: Mapping[str, Sequence[str]], erased_by_user: Mapping[str, bool], writes: _Writes
    ) -> set[str]:
        """Run :data:`APPLY_SCRIPT`: the writes, provided nothing read has changed.

        Args:
            markers: Processed-marker set to the event ids that must still be absent from it;
                added with the rest.
            erased_by_user: User id to whether it was erased when read.
            writes: Everything else to write, with the version tokens the states were read with.

        Returns:
            The ids of the events marked processed now (nothing was written then); empty when
            the writes were made.

        Raises:
            _StateChanged: A state or erased flag changed since it was read; nothing was written.
            StoreUnavailable: Redis could not be reached.
        """
        n_keys, keys_and_args = writes.command(markers, self.processed_ttl_s, erased_by_user, self.keys)
        with self.store.guard():
            reply = self.store.eval_many(APPLY_SCRIPT, n_keys, *keys_and_args)
        status = int(reply[0])
        if status == 0:
            return {str(event_id) for event_id in reply[1]}
        if status == 2:
            raise _StateChanged
        return set()

    def _commit(
        self, pending: list[EventRecord], items: Mapping[str, ItemInfo], opted_out: set[str]
    ) -> ApplyResult | list[EventRecord]:
        """One optimistic attempt; returns the still-pending events when some turned out done."""
        staged = self._stage(pending, items, opted_out)
        if not isinstance(staged, _Staged):
            return staged
        done_now = self._apply(staged.markers, staged.erased_by_user, staged.writes)
        if done_now:
            return [e for e in pending if e.event_id not in done_now]
        self._remember(staged.writes.token, staged.written)
        return staged.result

    def _stage(
        self,
        pending: list[EventRecord],
        items: Mapping[str, ItemInfo] | None = None,
        opted_out: set[str] | None = None,
    ) -> _Staged | list[EventRecord]:
        """The reads and folds of one attempt: its writes, or the events still pending if some were done.

        Without ``items`` (and ``opted_out``) the catalog is read in the same round trip as the
        markers, the erased flags and every state whose entity an event names by itself (users,
        items): only states keyed by catalog data (creators) that are not cached need a second
        one. On a busy Redis each round trip waits behind other consumers' scripts, so that wait
        was a good part of a batch's time.
        """
        keys = self.keys
        markers = self._markers(pending)
        user_ids = sorted({e.user_id for e in pending})
        routed: _Plan | None = None
        if items is None:
            wanted = self._keys_without_catalog(pending)
        else:
            # Routing needs no erased flags: erased users' events are routed, then dropped below.
            routed = self._plan(pending, items, set(), opted_out or set())
            wanted = [self._state_key(*entity) for entity in routed.groups]
        # Cached states are taken out of the cache: the folds update them in place, so they go
        # back only once the write succeeds. Any other outcome leaves them out, to be read again.
        held: dict[str, tuple[str, dict[str, State]]] = {}
        to_read = self._take_cached(wanted, held)
        with self.store.guard():
            reader = self.store.client.pipeline(transaction=False)
            decode_catalog = self._queue_catalog(reader, pending) if items is None else None
            for marker_set, ids in markers.items():
                reader.smismember(marker_set, ids)
            reader.smismember(keys.erased_users(), user_ids)
            if to_read:
                reader.mget(to_read)
            replies = reader.execute()
        if decode_catalog is not None:
            items, opted_out = decode_catalog(replies)
            replies = replies[2 if self._reads_opt_outs else 1 :]
        assert items is not None and opted_out is not None
        n_sets = len(markers)
        flags_by_set, erased_flags = replies[:n_sets], replies[n_sets]
        done = {
            event_id
            for ids, flags in zip(markers.values(), flags_by_set, strict=True)
            for event_id, flag in zip(ids, flags, strict=True)
            if flag
        }
        if done:
            # An event is done when any partition's marker exists (see features.partitions).
            return [e for e in pending if e.event_id not in done]
        raw_by_key: dict[str, str | None] = (
            dict(zip(to_read, replies[n_sets + 1], strict=True)) if to_read else {}
        )
        if routed is None:
            routed = self._plan(pending, items, set(), opted_out)
        state_keys = {entity: self._state_key(*entity) for entity in routed.groups}
        if decode_catalog is not None:
            # States keyed by catalog data, and those of entities the catalog turned out to
            # leave unrouted (opted-out users' behaviour views), which go back to the cache.
            routed_keys = set(state_keys.values())
            for key in [k for k in held if k not in routed_keys]:
                self._state_cache[key] = held.pop(key)
            late = [k for k in routed_keys if k not in held and k not in raw_by_key]
            more = self._take_cached(late, held)
            if more:
                with self.store.guard():
                    raw_by_key.update(self._read_states(more))
        erased_by_user = {u: bool(flag) for u, flag in zip(user_ids, erased_flags, strict=True)}
        erased = {u for u, flag in erased_by_user.items() if flag}
        plan = self._plan(pending, items, erased, opted_out) if erased else routed
        now = self._clock()
        stamp = _iso(now)

        # Only the states folded are checked and written: an erased user's state is left alone.
        writes = _Writes()
        written: list[tuple[str, dict[str, State]]] = []
        by_name, params = self._by_name, self.params
        for entity, by_view in plan.groups.items():
            entity_type, entity_id = entity
            key = state_keys[entity]
            hit = held.get(key)
            if hit is None:
                token, states = self._decode_state(entity_type, raw_by_key[key])
            else:
                token, states = hit
            for name, view_events in by_view.items():
                states[name] = by_name[name].update(states[name], view_events, items, params)
            writes.state(
                key,
                token,
                self._record_ttl_s(entity_type),
                states,
                self._record_key(entity_type, entity_id),
                self._record(entity_type, states, now, stamp),
            )
            written.append((key, states))
        if self._trending:
            for (scope, epoch), amounts in trending.increments(plan.events, items, params).items():
                writes.trending(scope, epoch, amounts, keys, params)
        if self._exclusions:
            for event in plan.events:
                if event.kind in _NEGATIVE_KINDS:
                    writes.sadd(keys.exclusions(event.user_id), event.item_id)
        result = ApplyResult(
            applied=len(plan.events),
            skipped=len(plan.erased),
            entities=len(plan.groups),
            applied_by_type=dict(Counter(e.kind for e in plan.events)),
        )
        return _Staged(markers, erased_by_user, writes, written, result)

    def _markers(self, events: Sequence[EventRecord]) -> dict[str, list[str]]:
        """Each processed-marker set some events belong in, with their ids, partition by partition."""
        buckets = [str(marker_bucket(event.ts_s)) for event in events]
        markers: dict[str, list[str]] = {}
        for prefix in self._marker_prefixes:
            for event, bucket in zip(events, buckets, strict=True):
                # Event ids are validated non-empty.
                markers.setdefault(prefix + bucket, []).append(event.event_id)
        return markers

    def _keys_without_catalog(self, events: Sequence[EventRecord]) -> list[str]:
        """State keys of the entities events name without the catalog (their user, their item).

        A view whose entity comes from catalog data (a creator) names none here; routing with
        the catalog then finds those, and only those, in addition.
        """
        found: dict[str, None] = {}
        for _name, entity_type, entity_key, _behaviour in self._routes:
            prefix = self._state_prefix[entity_type]
            for event in events:
                entity_id = entity_key(event, None)
                if entity_id:
                    found[prefix + entity_id] = None
        return list(found)

    def _take_cached(self, keys: Sequence[str], held: dict[str, tuple[str, dict[str, State]]]) -> list[str]:
        """Move the cached states of some keys into ``held``; returns the keys not cached."""
        cache = self._state_cache
        if not cache:
            return list(keys)
        missing: list[str] = []
        for key in keys:
            hit = cache.pop(key, None)
            if hit is None:
                missing.append(key)
            else:
                held[key] = hit
        return missing

    # -- the overlapped write path (see StagedApply) ---------------------------------------------

    @property
    def generation(self) -> int:
        """How many times :meth:`forget` ran: a batch staged under an older one must be staged again."""
        return self._generation

    def forget(self) -> None:
        """Drop every cached state, so the next batch reads what Redis holds."""
        self._state_cache.clear()
        self._generation += 1

    def stage_events(self, events: Sequence[EventRecord]) -> StagedApply:
        """Read and fold a batch without writing it; :meth:`send` then writes it.

        The states it folds are cached at once with the token they will be written with, so the
        next batch can be staged on top of them while this one's write runs in Redis. Nothing
        about that is trusted: the commit script checks those tokens as it checks any, so if this
        write fails, the next one fails its check too and is read and folded again; the failure
        also empties the cache (:meth:`forget`), and a batch staged before that must be staged again
        (see :attr:`generation`).

        Args:
            events: The batch, in any order.

        Returns:
            The staged batch.

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        generation = self._generation
        unique, duplicates = _unique_events(events)
        if not unique:
            return StagedApply(events, generation, ApplyResult(duplicates=duplicates), None)
        staged = self._stage(unique)
        if not isinstance(staged, _Staged):
            # Some were applied meanwhile by another consumer: the synchronous path sorts it out.
            return StagedApply(events, generation, None, None)
        self._remember(staged.writes.token, staged.written)
        staged.result = dataclasses.replace(staged.result, duplicates=duplicates)
        return StagedApply(events, generation, None, staged)

    def send(self, batch: StagedApply) -> InFlightApply:
        """Start writing a staged batch; :meth:`finish` collects the outcome.

        A batch staged before a :meth:`forget` is staged again first. A batch that needs no
        write, or must take the synchronous path, is applied here and now.

        Raises:
            StoreUnavailable: Redis could not be reached; the cache is forgotten.
            ApplyConflict: As :meth:`apply_events` raises.
        """
        if batch.generation != self._generation:
            batch = self.stage_events(batch.events)
        if batch.staged is None:
            result = batch.result if batch.result is not None else self.apply_events(batch.events)
            return InFlightApply(batch, None, result)
        staged = batch.staged
        n_keys, keys_and_args = staged.writes.command(
            staged.markers, self.processed_ttl_s, staged.erased_by_user, self.keys
        )
        try:
            with self.store.guard():
                reply = self.store.send_eval(APPLY_SCRIPT, n_keys, *keys_and_args)
        except BaseException:
            self.forget()
            raise
        return InFlightApply(batch, reply, None)

    def finish(self, flight: InFlightApply) -> ApplyResult:
        """Wait for a batch's write; when a check failed, apply it again synchronously.

        Raises:
            StoreUnavailable: Redis could not be reached; whether the batch was written is
                unknown (a redelivery is a no-op if it was), and the cache is forgotten.
            ApplyConflict: As :meth:`apply_events` raises.
        """
        if flight.reply is None:
            assert flight.result is not None
            return flight.result
        staged = flight.batch.staged
        assert staged is not None
        try:
            with self.store.guard():
                reply = flight.reply.result()
        except BaseException:
            self.forget()
            raise
        if int(reply[0]) == 1:
            return staged.result
        # Another writer got in first: the speculative states are wrong, and so is anything staged
        # on them. The synchronous path reads again and skips what turned out to be applied.
        self.forget()
        again = self.apply_events(flight.batch.events)
        return dataclasses.replace(again, retries=again.retries + 1)


_NEGATIVE_KINDS: Final = frozenset(t.value for t in NEGATIVE_FEEDBACK)


def _may_opt_out(raw: str) -> bool:
    # An opt-out is the JSON literal false, so a profile without that text anywhere keeps the
    # default; only the others are decoded (most profiles, every batch, in the users partition).
    return "false" in raw


def _personalized(user_record: Mapping[str, Any]) -> bool:
    # Only an explicit opt-out counts; a record without the flag keeps the default (personalised).
    return user_record.get("personalization") is not False
