"""The write path against the real Redis: stream processor, online store, lake writer, trimming.

Ray is started only for the actor test (session fixture below, two CPUs, no dashboard).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from core.lake import Lake
from core.schema import (
    EntityType,
    EventContext,
    EventType,
    RecommendationLogEntry,
    ServedItem,
    UserEvent,
    utcnow,
)
from core.settings import Settings
from core.tables import EVENTS, IMPRESSIONS
from features import trending
from features.definitions import ITEM_ENGAGEMENT, USER_ACTIVITY
from features.lake_writer import LakeWriter
from features.metrics import StreamMetrics
from features.online_store import OnlineFeatureStore, marker_bucket
from features.partitions import ITEMS, PARTITIONS, USERS
from features.records import EventRecord
from features.redis_store import RedisStore
from features.stream_codec import FEATURES_GROUP, LAKE_GROUP, decode_event, encode_event, encode_log_entry
from features.stream_consumer import StreamConsumer
from features.stream_processor import StreamProcessor
from features.stream_trim import trim_acknowledged
from features.trending import TrendingScope

pytestmark = pytest.mark.integration

CATEGORIES = ("music", "sports", "news", "food")


def put_items(store: RedisStore, n: int) -> list[str]:
    """Catalog records the way the catalog writes them (snake_case packed JSON)."""
    ids = [f"item-{i}" for i in range(n)]
    store.mset_json(
        {
            store.keys.item(item_id): {
                "item_id": item_id,
                "item_type": "video",
                "title": item_id,
                "category": CATEGORIES[i % len(CATEGORIES)],
                "creator_id": f"creator-{i % 3}",
                "status": "active",
                "created_at": "2025-01-01T00:00:00Z",
                "metadata": {},
                "tags": [],
            }
            for i, item_id in enumerate(ids)
        }
    )
    return ids


def make_events(n: int, items: Sequence[str], users: int = 50, seed: int = 0) -> list[UserEvent]:
    kinds = [EventType.VIEW, EventType.CLICK, EventType.LIKE, EventType.SHARE, EventType.SKIP]
    start = utcnow() - timedelta(minutes=30)
    return [
        UserEvent(
            event_id=f"ev-{seed}-{i:06d}",
            user_id=f"user-{(i * 7 + seed) % users}",
            item_id=items[(i * 13 + seed) % len(items)],
            event_type=kinds[i % len(kinds)],
            timestamp=start + timedelta(milliseconds=i * 500),
            context=EventContext(region=("eu", "us")[i % 2], surface="home"),
        )
        for i in range(n)
    ]


def xadd_events(store: RedisStore, events: Sequence[UserEvent]) -> list[str]:
    pipe = store.client.pipeline(transaction=False)
    for event in events:
        pipe.xadd(store.keys.stream_events(), encode_event(event))
    return [str(entry_id) for entry_id in pipe.execute()]


def stream_ids(store: RedisStore, stream: str) -> list[str]:
    return [str(entry_id) for entry_id, _ in store.client.xrange(stream) or []]


def pending(store: RedisStore, stream: str, group: str) -> int:
    return int(store.client.xpending(stream, group)["pending"])


def served(store: RedisStore, entity: EntityType, ids: Sequence[str]) -> list[dict[str, Any]]:
    records = OnlineFeatureStore(store).get_serving(entity, ids)
    assert all(r is not None for r in records), "every entity should have a serving record"
    return [r for r in records if r is not None]


def assert_exactly_once(store: RedisStore, events: Sequence[UserEvent]) -> None:
    """Every event is reflected once: per-item and per-user totals equal the events sent."""
    by_item = Counter(e.item_id for e in events)
    by_user = Counter(e.user_id for e in events)
    item_records = served(store, EntityType.ITEM, list(by_item))
    assert {
        i: r["item_engagement:event_count_total"] for i, r in zip(by_item, item_records, strict=True)
    } == by_item
    user_records = served(store, EntityType.USER, list(by_user))
    assert {u: r["user_activity:event_count"] for u, r in zip(by_user, user_records, strict=True)} == by_user
    by_creator = Counter(f"creator-{int(e.item_id.rsplit('-', 1)[1]) % 3}" for e in events)
    creator_records = served(store, EntityType.CREATOR, list(by_creator))
    assert {
        c: r["creator_quality:event_count"] for c, r in zip(by_creator, creator_records, strict=True)
    } == by_creator


@pytest.fixture
def metrics() -> StreamMetrics:
    return StreamMetrics()


@pytest.fixture(scope="session")
def ray_local() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    started = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Workers inherit the driver's sys.path, so they import this checkout's packages.
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        started = True
    yield ray
    if started:
        ray.shutdown()


# -- the processor in-process --------------------------------------------------------------------


def test_a_like_through_the_stream_updates_user_item_creator_and_trending(
    store: RedisStore, metrics: StreamMetrics
) -> None:
    items = put_items(store, 4)
    like = UserEvent(
        user_id="u1",
        item_id=items[1],
        event_type=EventType.LIKE,
        context=EventContext(region="eu"),
    )
    xadd_events(store, [like])
    processor = StreamProcessor(store, "p1", metrics=metrics)
    assert processor.consumer.lag_s() == 0.0  # group not there yet
    assert processor.drain() == 1

    user, item = served(store, EntityType.USER, ["u1"])[0], served(store, EntityType.ITEM, [items[1]])[0]
    assert user["user_activity:top_categories"] == ["sports"]
    assert user["user_activity:top_category_affinities"][0] == pytest.approx(3.0, rel=1e-3)
    assert user["user_activity:recent_item_ids"] == [items[1]]
    assert user["user_activity:recent_event_types"] == ["like"]
    assert user["user_activity:session_item_ids"] == [items[1]]
    assert user["user_activity:like_count"] == 1
    assert item["item_engagement:like_count_1h"] == 1
    assert item["item_engagement:like_count_7d"] == 1
    assert item["item_engagement:event_count_total"] == 1
    assert item["updated_at"].endswith("Z")
    creator = served(store, EntityType.CREATOR, ["creator-1"])[0]
    assert creator["creator_quality:event_count"] == 1

    online = OnlineFeatureStore(store)
    for scope in (TrendingScope.everywhere(), TrendingScope.region("eu"), TrendingScope.category("sports")):
        top = online.top_trending(scope, 10)
        assert [item_id for item_id, _ in top] == [items[1]]
        assert top[0][1] == pytest.approx(3.0, rel=1e-3)
    assert online.top_trending(TrendingScope.region("us"), 10) == []
    features = online.get_features(EntityType.USER, ["u1", "nobody"])
    assert features[0].get_strings("user_activity:recent_item_ids", ()) == (items[1],)
    assert len(features[1]) == 0

    assert pending(store, store.keys.stream_events(), FEATURES_GROUP) == 0
    assert processor.consumer.lag_s() == 0.0
    applied = metrics.registry.get_sample_value(
        "rayrec_stream_entries_processed_total", {"group": "features", "outcome": "applied"}
    )
    assert applied == 1.0


def _trend(online: OnlineFeatureStore, at_s: float) -> dict[str, float]:
    now = datetime.fromtimestamp(at_s, UTC)
    return dict(online.top_trending(TrendingScope.everywhere(), 10, now))


def _like(item_id: str, at_s: float, n: int) -> EventRecord:
    return EventRecord(
        event_id=f"trend-{n}",
        user_id=f"user-{n}",
        item_id=item_id,
        event_type=EventType.LIKE,
        ts=datetime.fromtimestamp(at_s, UTC),
    )


def test_a_new_trending_epoch_starts_from_the_last_and_late_events_reach_both(store: RedisStore) -> None:
    items = put_items(store, 3)
    online = OnlineFeatureStore(store)
    params = online.params
    # The current epoch and the next: a set expires a day after its epoch is over.
    epoch = trending.epoch_of(utcnow().timestamp(), params)
    start = trending.landmark_s(epoch + 1, params)  # the boundary between epoch and epoch + 1
    hour = 3600.0
    online.apply_events([_like(items[0], start - 2 * hour, 0)])
    # A new epoch without an event yet: readers take the last epoch's set.
    assert not store.client.exists(TrendingScope.everywhere().key(store.keys, epoch + 1))
    assert _trend(online, start + hour) == pytest.approx({items[0]: 3.0 / 2**0.5}, rel=1e-9)
    # Its first event carries the last epoch over, rescaled to the new landmark.
    online.apply_events([_like(items[1], start + hour, 1)])
    assert _trend(online, start + hour) == pytest.approx({items[0]: 3.0 / 2**0.5, items[1]: 3.0}, rel=1e-9)
    # A late event of the last epoch counts in both sets.
    online.apply_events([_like(items[2], start - hour, 2)])
    expected = {items[0]: 3.0 / 2**0.5, items[1]: 3.0, items[2]: 3.0 / 2 ** (1 / 3)}
    assert _trend(online, start + hour) == pytest.approx(expected, rel=1e-9)
    late = dict(online.top_trending(TrendingScope.everywhere(), 10, datetime.fromtimestamp(start - 1, UTC)))
    assert set(late) == {items[0], items[2]}
    # Several scopes read at once answer as each read alone, the fallback to the last epoch
    # included: the region's set of the new epoch is empty, the category's never existed.
    region, category = TrendingScope.region("nowhere"), TrendingScope.category("no-such-category")
    store.client.zadd(region.key(store.keys, epoch), {items[1]: 1.0})
    wanted = [(TrendingScope.everywhere(), 2), (region, 10), (category, 10), (TrendingScope.everywhere(), 10)]
    now = datetime.fromtimestamp(start + hour, UTC)

    async def both() -> tuple[list[list[tuple[str, float]]], list[list[tuple[str, float]]]]:
        try:
            many = await online.atop_trending_many(wanted, now)
            return many, [await online.atop_trending(scope, n, now) for scope, n in wanted]
        finally:
            await store.aclient.aclose()
            await store.apool.disconnect()

    many, one_by_one = asyncio.run(both())
    assert many == one_by_one
    assert [len(rows) for rows in many] == [2, 1, 0, 3]
    for key in (epoch, epoch + 1):
        assert store.client.ttl(TrendingScope.everywhere().key(store.keys, key)) > 0


def test_a_trending_set_written_before_carries_nothing_over_again(store: RedisStore) -> None:
    # Sets that earlier versions filled by writing every event to its epoch and the next already
    # hold the last epoch: their first write now must not add it a second time.
    items = put_items(store, 2)
    online = OnlineFeatureStore(store)
    params = online.params
    # The current epoch and the next: a set expires a day after its epoch is over.
    epoch = trending.epoch_of(utcnow().timestamp(), params)
    start = trending.landmark_s(epoch + 1, params)
    online.apply_events([_like(items[0], start - 3600.0, 0)])
    old = TrendingScope.everywhere().key(store.keys, epoch)
    new = TrendingScope.everywhere().key(store.keys, epoch + 1)
    store.client.zunionstore(new, {old: trending.carry_factor(params)})
    online.apply_events([_like(items[1], start + 3600.0, 1)])
    expected = {items[0]: 3.0 / 2 ** (1 / 3), items[1]: 3.0}
    assert _trend(online, start + 3600.0) == pytest.approx(expected, rel=1e-9)


def test_a_changed_catalog_record_reaches_the_next_batch(store: RedisStore, metrics: StreamMetrics) -> None:
    # The processor keeps decoded catalog records keyed by their JSON: a moved item must count
    # toward its new category and creator from the next batch on.
    items = put_items(store, 1)
    processor = StreamProcessor(store, "p1", metrics=metrics)
    first = UserEvent(user_id="u1", item_id=items[0], event_type=EventType.LIKE)
    xadd_events(store, [first])
    assert processor.drain() == 1
    record = store.mget_json([store.keys.item(items[0])])[0]
    assert record is not None
    store.mset_json({store.keys.item(items[0]): {**record, "category": "news", "creator_id": "creator-2"}})
    xadd_events(store, [UserEvent(user_id="u2", item_id=items[0], event_type=EventType.LIKE)])
    assert processor.drain() == 1
    assert served(store, EntityType.USER, ["u2"])[0]["user_activity:top_categories"] == ["news"]
    assert served(store, EntityType.CREATOR, ["creator-2"])[0]["creator_quality:event_count"] == 1


def test_async_reads_match_sync_reads(store: RedisStore) -> None:
    items = put_items(store, 2)
    online = OnlineFeatureStore(store)
    online.apply_events([EventRecord.from_event(e) for e in make_events(10, items, users=2)])

    async def read() -> tuple[Any, ...]:
        try:
            return (
                await online.aget_serving(EntityType.ITEM, items),
                await online.atop_trending(TrendingScope.everywhere(), 5),
                await online.arecord_exclusion("user-0", items[0]),
            )
        finally:
            await store.aclient.aclose()

    records, top, excluded = asyncio.run(read())
    assert records == online.get_serving(EntityType.ITEM, items)
    assert [i for i, _ in top] == [i for i, _ in online.top_trending(TrendingScope.everywhere(), 5)]
    assert excluded is True


def test_redelivery_of_the_same_event_counts_once(store: RedisStore, metrics: StreamMetrics) -> None:
    items = put_items(store, 3)
    events = make_events(40, items, users=5)
    online = OnlineFeatureStore(store)
    records = [EventRecord.from_event(e) for e in events]
    first = online.apply_events(records)
    assert (first.applied, first.duplicates) == (40, 0)
    again = online.apply_events(records[::-1] + records[:3])
    assert (again.applied, again.duplicates, again.entities) == (0, 43, 0)
    assert_exactly_once(store, events)

    # The same event added to the stream twice (a producer retry) is also applied once.
    extra = make_events(1, items, users=5, seed=99)
    xadd_events(store, extra * 3)
    processor = StreamProcessor(store, "p1", metrics=metrics)
    assert processor.drain() == 3
    assert (processor.stats.applied, processor.stats.duplicates) == (1, 2)
    assert_exactly_once(store, [*events, *extra])


def test_negative_feedback_lands_in_the_exclusion_set(store: RedisStore, metrics: StreamMetrics) -> None:
    items = put_items(store, 2)
    online = OnlineFeatureStore(store)
    assert online.record_exclusion("u1", items[0]) is True
    assert online.record_exclusion("u1", items[0]) is False
    hide = UserEvent(user_id="u1", item_id=items[1], event_type=EventType.NOT_INTERESTED)
    xadd_events(store, [hide])
    StreamProcessor(store, "p1", metrics=metrics).drain()
    assert store.client.smembers(store.keys.exclusions("u1")) == set(items)


def test_erased_and_opted_out_users_keep_no_behaviour_features(store: RedisStore) -> None:
    items = put_items(store, 2)
    store.mset_json({store.keys.user("quiet"): {"user_id": "quiet", "personalization": False}})
    # Written by other code, with the standard library's spacing: still an opt-out.
    store.client.set(store.keys.user("spaced"), json.dumps({"user_id": "spaced", "personalization": False}))
    store.client.set(store.keys.user("kept"), json.dumps({"user_id": "kept", "personalization": True}))
    store.client.sadd(store.keys.erased_users(), "gone")
    online = OnlineFeatureStore(store)
    users = ("quiet", "spaced", "gone", "kept", "normal")
    events = [
        EventRecord.from_event(UserEvent(user_id=u, item_id=items[0], event_type=EventType.CLICK))
        for u in users
    ]
    result = online.apply_events(events)
    assert (result.applied, result.skipped) == (4, 1)
    records = online.get_serving(EntityType.USER, list(users))
    assert records[:3] == [None, None, None] and None not in records[3:]
    assert served(store, EntityType.ITEM, [items[0]])[0]["item_engagement:click_count_1h"] == 4
    assert online.apply_events(events).duplicates == 5


def test_offline_states_load_into_the_online_store(store: RedisStore) -> None:
    items = put_items(store, 2)
    records = [EventRecord.from_event(e) for e in make_events(20, items, users=2)]
    online = OnlineFeatureStore(store)
    offline = {
        item_id: ITEM_ENGAGEMENT.update({}, [r for r in records if r.item_id == item_id], {}, online.params)
        for item_id in items
    }
    assert online.write_states(ITEM_ENGAGEMENT, offline) == 2
    assert online.read_states(ITEM_ENGAGEMENT, [*items, "none"]) == [
        offline[items[0]],
        offline[items[1]],
        None,
    ]
    loaded = served(store, EntityType.ITEM, items)
    assert sum(r["item_engagement:event_count_total"] for r in loaded) == 20
    # The stream then continues from the loaded state.
    later = EventRecord.from_event(make_events(1, items, users=2, seed=5)[0])
    online.apply_events([later])
    state = online.read_states(ITEM_ENGAGEMENT, [later.item_id])[0]
    assert state is not None
    assert sum(state["totals"].values()) == sum(offline[later.item_id]["totals"].values()) + 1


def test_undecodable_entries_go_to_dead_letters_and_do_not_stall(
    store: RedisStore, metrics: StreamMetrics
) -> None:
    items = put_items(store, 1)
    stream = store.keys.stream_events()
    bad: list[dict[Any, Any]] = [{"e": "{not json"}, {"other": "field"}]
    for fields in bad:
        store.client.xadd(stream, fields)
    xadd_events(store, make_events(3, items, users=1))
    processor = StreamProcessor(store, "p1", metrics=metrics)
    assert processor.drain() == 5
    assert (processor.stats.applied, processor.stats.invalid) == (3, 2)
    assert store.client.xlen(store.keys.stream_dead_letters()) == 2
    assert pending(store, stream, FEATURES_GROUP) == 0


def test_a_crashed_consumers_entries_are_claimed_and_applied_exactly_once(
    store: RedisStore, metrics: StreamMetrics
) -> None:
    items = put_items(store, 20)
    events = make_events(2_000, items)
    xadd_events(store, events)
    stream = store.keys.stream_events()

    first = StreamProcessor(store, "p1", metrics=metrics)
    assert first.run_once(300, 0) == 300
    assert first.run_once(300, 0) == 300
    # Crash 1: a batch read and never applied.
    assert len(first.consumer.next_batch(300, 0)) == 300
    # Crash 2: a batch applied but never acknowledged.
    applied_unacked = first.consumer.next_batch(300, 0)
    first.online.apply_events([EventRecord.from_event(decode_event(e.fields)) for e in applied_unacked])
    assert pending(store, stream, FEATURES_GROUP) == 600

    time.sleep(0.3)
    second = StreamProcessor(store, "p2", claim_idle_ms=200, metrics=metrics)
    assert second.consumer.lag_s() > 0.2  # the oldest pending entry waits since before the sleep
    assert second.drain(count=250) == 2_000 - 600  # the 600 pending ones and the 800 never read
    assert second.stats.duplicates == 300
    assert second.stats.applied == 2_000 - 600 - 300
    assert pending(store, stream, FEATURES_GROUP) == 0
    assert_exactly_once(store, events)


def test_concurrent_consumers_on_hot_entities_lose_no_update(
    store: RedisStore, metrics: StreamMetrics
) -> None:
    items = put_items(store, 2)
    events = make_events(600, items, users=3)
    xadd_events(store, events)
    processors = [StreamProcessor(store, f"p{i}", metrics=metrics) for i in range(2)]
    threads = [threading.Thread(target=p.drain, kwargs={"count": 20}) for p in processors]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sum(p.stats.entries for p in processors) == 600
    assert_exactly_once(store, events)


# -- overlapped batches (the actor's mode) ----------------------------------------------------------


def _overlapped(store: RedisStore, metrics: StreamMetrics, **online: Any) -> StreamProcessor:
    store_ = OnlineFeatureStore(store, state_cache_size=1_000, **online)
    return StreamProcessor(store, "p1", online=store_, metrics=metrics, overlap=True)


def test_overlapped_batches_apply_every_event_exactly_once(store: RedisStore, metrics: StreamMetrics) -> None:
    items = put_items(store, 20)
    events = make_events(2_000, items)
    xadd_events(store, events)
    processor = _overlapped(store, metrics)
    assert processor.run_once(250, 0) == 250
    # The first batch's write is in flight until the next call takes on the second batch, whose
    # entries were read ahead as the write went out.
    assert pending(store, store.keys.stream_events(), FEATURES_GROUP) == 500
    assert processor.drain(count=250) == 2_000 - 250
    assert processor.stats.entries == processor.stats.applied == 2_000
    assert pending(store, store.keys.stream_events(), FEATURES_GROUP) == 0
    assert_exactly_once(store, events)


def test_a_read_ahead_hands_out_the_next_entries_and_a_rewind_loses_none(store: RedisStore) -> None:
    stream = store.keys.stream_events()
    ids = xadd_events(store, make_events(30, put_items(store, 2)))
    consumer = StreamConsumer(store.client, stream, FEATURES_GROUP, "c1")
    first = consumer.next_batch(10, 0)
    assert [e.entry_id for e in first] == ids[:10]
    assert consumer.prefetch(10)
    assert not consumer.prefetch(10)  # one read ahead at a time
    ahead = consumer.next_batch(10, 0)
    assert [e.entry_id for e in ahead] == ids[10:20]
    assert ahead[0].fields is not None and decode_event(ahead[0].fields).event_id
    # Read ahead, then a failure: the rewind drops the read, and its entries come back as this
    # consumer's own pending ones, in order, after those it had already.
    assert consumer.prefetch(10)
    consumer.rewind()
    again = consumer.next_batch(100, 0)
    assert [e.entry_id for e in again][:20] == ids[:20]
    # Whether the dropped read ran or not, the rest follows, each entry once.
    rest = consumer.next_batch(100, 0)
    assert [e.entry_id for e in again + rest] == ids
    consumer.close()


def test_a_batch_staged_on_a_write_that_failed_is_folded_again(
    store: RedisStore, metrics: StreamMetrics
) -> None:
    items = put_items(store, 3)
    events, other = make_events(600, items, users=5), make_events(1, items, users=5, seed=7)
    xadd_events(store, events)
    calls: list[int] = []

    def clock() -> datetime:
        # Between the first batch's reads and its write, another writer changes a state it
        # folds; the second batch is staged on the first's states before its write fails.
        calls.append(1)
        if len(calls) == 1:
            OnlineFeatureStore(store).apply_events([EventRecord.from_event(other[0])])
        return utcnow()

    processor = _overlapped(store, metrics, clock=clock)
    assert processor.drain(count=200) == 600
    assert processor.stats.retries >= 1
    assert processor.stats.applied == 600
    assert_exactly_once(store, [*events, *other])


def test_an_event_repeated_in_the_next_batch_counts_once(store: RedisStore, metrics: StreamMetrics) -> None:
    # The second batch reads its markers before the first batch's write lands.
    items = put_items(store, 5)
    events = make_events(100, items)
    xadd_events(store, [*events[:50], events[10], *events[50:]])
    processor = _overlapped(store, metrics)
    assert processor.drain(count=50) == 101
    assert (processor.stats.applied, processor.stats.duplicates) == (100, 1)
    assert_exactly_once(store, events)


# -- feature partitions: one processor per partition (the deployment's layout) ------------------


def test_each_partition_folds_only_its_share_and_together_every_event_once(
    store: RedisStore, metrics: StreamMetrics
) -> None:
    items = put_items(store, 12)
    events = make_events(900, items, users=20)
    hide = UserEvent(user_id="user-1", item_id=items[5], event_type=EventType.HIDE)
    xadd_events(store, [*events, hide])
    users = StreamProcessor(store, "u-0", partition=USERS, metrics=metrics)
    assert users.drain(count=200) == 901
    assert users.online.views == (USER_ACTIVITY,)
    online = OnlineFeatureStore(store)
    assert all(r is not None for r in online.get_serving(EntityType.USER, ["user-1", "user-2"]))
    assert store.client.smembers(store.keys.exclusions("user-1")) == {items[5]}
    # Nothing of the items partition yet: no item or creator record, no trending.
    assert online.get_serving(EntityType.ITEM, items) == [None] * len(items)
    assert online.get_serving(EntityType.CREATOR, ["creator-0"]) == [None]
    assert online.top_trending(TrendingScope.everywhere(), 10) == []

    item_side = StreamProcessor(store, "i-0", partition=ITEMS, metrics=metrics, overlap=True)
    assert item_side.drain(count=200) == 901
    assert (users.stats.applied, item_side.stats.applied) == (901, 901)
    assert_exactly_once(store, [*events, hide])
    assert len(online.top_trending(TrendingScope.everywhere(), 10)) == 10
    for partition in PARTITIONS:
        assert pending(store, store.keys.stream_events(), partition.group) == 0
    # A replay of the same events through a store covering both partitions finds them applied.
    replayed = online.apply_events([EventRecord.from_event(e) for e in events[:100]])
    assert (replayed.applied, replayed.duplicates) == (0, 100)
    assert_exactly_once(store, [*events, hide])


def test_events_a_replay_applied_are_not_applied_again_by_the_partitions(
    store: RedisStore, metrics: StreamMetrics
) -> None:
    items = put_items(store, 6)
    events = make_events(300, items, users=10)
    OnlineFeatureStore(store).apply_events([EventRecord.from_event(e) for e in events[:120]])
    xadd_events(store, events)
    for partition in PARTITIONS:
        processor = StreamProcessor(store, f"p-{partition.name}", partition=partition, metrics=metrics)
        assert processor.drain(count=100) == 300
        assert (processor.stats.applied, processor.stats.duplicates) == (180, 120)
    assert_exactly_once(store, events)


def test_partition_groups_take_over_where_the_single_processors_group_stood(
    store: RedisStore, metrics: StreamMetrics
) -> None:
    items = put_items(store, 10)
    events = make_events(1_000, items, users=30)
    xadd_events(store, events)
    stream = store.keys.stream_events()
    single = StreamProcessor(store, "all-0", metrics=metrics)
    assert single.drain(count=200, max_batches=2) == 400
    # Read, applied and never acknowledged: it stops in the middle of a batch.
    unacked = single.consumer.next_batch(100, 0)
    single.online.apply_events([EventRecord.from_event(decode_event(e.fields)) for e in unacked])
    assert pending(store, stream, FEATURES_GROUP) == 100

    users = StreamProcessor(store, "u-0", partition=USERS, claim_idle_ms=500, metrics=metrics)
    items_side = StreamProcessor(store, "i-0", partition=ITEMS, claim_idle_ms=500, metrics=metrics)
    # The single processor's consumer was active a moment ago: the partitions wait.
    assert users.run_once(100, 50) == 0
    assert {str(g["name"]) for g in store.client.xinfo_groups(stream)} == {FEATURES_GROUP}
    time.sleep(0.6)
    # Both start at its oldest pending entry; the events it applied are skipped by their markers.
    assert users.drain(count=250) == 600
    assert {str(g["name"]) for g in store.client.xinfo_groups(stream)} == {FEATURES_GROUP, USERS.group}
    assert items_side.drain(count=250) == 600
    assert {str(g["name"]) for g in store.client.xinfo_groups(stream)} == {USERS.group, ITEMS.group}
    assert (users.stats.applied, users.stats.duplicates) == (500, 100)
    assert (items_side.stats.applied, items_side.stats.duplicates) == (500, 100)
    assert_exactly_once(store, events)


def test_trimming_needs_every_partition_group_or_the_single_one(
    store: RedisStore, metrics: StreamMetrics
) -> None:
    items = put_items(store, 2)
    xadd_events(store, make_events(50, items, users=2))
    stream = store.keys.stream_events()
    store.client.xgroup_create(stream, LAKE_GROUP, id="$")  # as if the lake writer had it all
    users = StreamProcessor(store, "u-0", partition=USERS, metrics=metrics)
    assert users.drain() == 50
    assert trim_acknowledged(store, metrics=metrics) == 0  # the items group does not exist yet
    assert StreamProcessor(store, "i-0", partition=ITEMS, metrics=metrics).drain() == 50
    assert trim_acknowledged(store, metrics=metrics) == 49  # up to the last entry, which stays


# -- the processor as a Ray actor ------------------------------------------------------------------


@pytest.mark.slow
def test_the_actor_is_killed_mid_burst_and_resumes_exactly_once(
    store: RedisStore, redis_settings: Settings, ray_local: Any
) -> None:
    from features.stream_processor import StreamProcessorActor

    ray = ray_local
    items = put_items(store, 20)
    events = make_events(2_000, items)
    xadd_events(store, events)
    stream = store.keys.stream_events()
    # One actor per partition, as the stream workers deployment runs them.
    actors = {
        p.group: StreamProcessorActor.options(name=f"processor-{redis_settings.namespace}-{p.name}").remote(  # type: ignore[attr-defined]
            redis_settings,
            f"actor-{p.name}",
            partition=p.name,
            batch_size=25,
            block_ms=100,
            claim_idle_ms=1_000,
        )
        for p in PARTITIONS
    }
    try:
        deadline = time.monotonic() + 60
        for actor in actors.values():
            while ray.get(actor.stats.remote())["entries"] < 200:
                assert time.monotonic() < deadline, "the actor never started processing"
                time.sleep(0.01)
            ray.kill(actor, no_restart=False)

        def finished(group: str) -> bool:
            info = next(g for g in store.client.xinfo_groups(stream) if g["name"] == group)
            return int(info["pending"]) == 0 and int(info["lag"] or 0) == 0

        for group in actors:
            while not finished(group):
                assert time.monotonic() < deadline, "the restarted actor did not drain the stream"
                time.sleep(0.2)
        for actor in actors.values():
            stats = ray.get(actor.stats.remote())
            assert stats["running"] and stats["errors"] == 0
        assert_exactly_once(store, events)
        for p in PARTITIONS:
            marker_set = store.keys.processed_events(p.name, marker_bucket(events[0].timestamp.timestamp()))
            assert store.client.sismember(marker_set, events[0].event_id)
            ttl = store.client.ttl(marker_set)
            assert 0 < ttl <= redis_settings.processed_ttl_s
        for actor in actors.values():
            ray.get(actor.stop.remote())
    finally:
        for actor in actors.values():
            ray.kill(actor, no_restart=True)


# -- the lake writer -------------------------------------------------------------------------------


def _log_entries(n: int) -> list[RecommendationLogEntry]:
    return [
        RecommendationLogEntry(
            request_id=f"req-{i}",
            user_id=f"user-{i}",
            surface="home",
            items=[ServedItem(item_id=f"item-{j}", position=j, score=1.0 / (j + 1)) for j in range(3)],
            model_version="v1",
        )
        for i in range(n)
    ]


def test_the_lake_writer_writes_every_event_once_after_dedupe_even_when_killed(
    store: RedisStore, tmp_path: Path, metrics: StreamMetrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = put_items(store, 5)
    events = make_events(500, items)
    xadd_events(store, events)
    logs = _log_entries(40)
    for entry in logs:
        store.client.xadd(store.keys.stream_impressions(), encode_log_entry(entry))
    lake = Lake(str(tmp_path))

    class Killed(Exception):
        pass

    def crash_on_ack(*_: Any) -> int:
        raise Killed("between write and ack")

    # Killed between write and ack: its first file is in place, nothing is acknowledged.
    first = LakeWriter(store, lake, "w1", flush_entries=100, metrics=metrics)
    for source in first._sources:
        monkeypatch.setattr(source.consumer, "ack", crash_on_ack)
    with pytest.raises(Killed):
        first.run_once(100, 0)
    assert lake.count(EVENTS) == 100
    # Killed with a buffer that was never written.
    buffering = LakeWriter(store, lake, "w2", flush_entries=1_000, metrics=metrics)
    assert buffering.run_once(100, 0) == 100  # the impressions all went to w1
    assert buffering.buffered == 100

    # The same writer back under its name rewrites its own batch under the same file name ...
    again = LakeWriter(store, lake, "w1", flush_entries=100, metrics=metrics)
    again.run_once(100, 0)
    assert lake.count(EVENTS) == 100
    # ... and another one takes over what the dead buffering writer held.
    time.sleep(0.4)
    other = LakeWriter(
        store, lake, "w3", flush_entries=100, flush_interval_s=0.2, claim_idle_ms=300, metrics=metrics
    )
    other.drain(count=100)

    deduped = lake.read_deduped(EVENTS)
    assert deduped.num_rows == 500
    assert sorted(deduped.column("event_id").to_pylist()) == sorted(e.event_id for e in events)
    assert lake.count(EVENTS) >= 500
    impressions = lake.read(IMPRESSIONS).to_pylist()
    assert {(r["request_id"], r["position"]) for r in impressions} == {
        (e.request_id, j) for e in logs for j in range(3)
    }
    for stream in (store.keys.stream_events(), store.keys.stream_impressions()):
        assert pending(store, stream, LAKE_GROUP) == 0
    row = next(r for r in deduped.to_pylist() if r["event_id"] == events[7].event_id)
    assert row["region"] == events[7].context.region
    assert row["ts"] == events[7].timestamp


def test_the_lake_writer_flushes_on_size_and_on_age(
    store: RedisStore, tmp_path: Path, metrics: StreamMetrics
) -> None:
    items = put_items(store, 2)
    xadd_events(store, make_events(30, items))
    now = [0.0]
    lake = Lake(str(tmp_path))
    writer = LakeWriter(
        store,
        lake,
        "w1",
        flush_entries=20,
        flush_interval_s=5.0,
        claim_idle_ms=60_000,
        metrics=metrics,
        clock=lambda: now[0],
    )
    assert writer.run_once(25, 0) == 25
    assert (lake.count(EVENTS), writer.buffered) == (25, 0)  # flushed on size
    assert writer.run_once(25, 0) == 5
    assert (lake.count(EVENTS), writer.buffered) == (25, 5)
    now[0] += 6.0
    assert writer.run_once(25, 0) == 0
    assert (lake.count(EVENTS), writer.buffered) == (30, 0)  # flushed on age


# -- trimming --------------------------------------------------------------------------------------


def test_trim_never_removes_entries_a_group_has_not_acknowledged(
    store: RedisStore, tmp_path: Path, metrics: StreamMetrics
) -> None:
    items = put_items(store, 3)
    ids = xadd_events(store, make_events(100, items))
    stream = store.keys.stream_events()

    processor = StreamProcessor(store, "p1", metrics=metrics)
    processor.consumer.ensure_group()
    assert trim_acknowledged(store, metrics=metrics) == 0  # the lake group does not exist yet
    assert processor.run_once(60, 0) == 60

    writer = LakeWriter(store, Lake(str(tmp_path)), "w1", flush_entries=1_000, metrics=metrics)
    writer.run_once(100, 0)
    assert writer.buffered == 100
    assert trim_acknowledged(store, metrics=metrics) == 0  # everything is pending in "lake"

    writer.flush(force=True)
    assert trim_acknowledged(store, metrics=metrics) == 59  # up to the features group's position
    remaining = stream_ids(store, stream)
    assert remaining == ids[59:]

    half = processor.consumer.next_batch(20, 0)  # delivered to "features", not acknowledged
    assert trim_acknowledged(store, metrics=metrics) == 1  # only the entry before the pending ones
    assert stream_ids(store, stream) == ids[60:]
    assert half[0].entry_id == ids[60]
    processor.process(half)
    assert processor.drain() == 20
    assert trim_acknowledged(store, metrics=metrics) == 39
    assert stream_ids(store, stream) == ids[-1:]
    assert (
        metrics.registry.get_sample_value("rayrec_stream_trimmed_entries_total", {"stream": "events"}) == 99
    )


# -- Redis losing the stream (restart without persistence, namespace reset) ---------------------


def test_processor_recovers_when_the_stream_and_group_vanish(store: RedisStore) -> None:
    items = put_items(store, 4)
    processor = StreamProcessor(store, "recover-0")
    first = make_events(20, items, seed=1)
    xadd_events(store, first)
    processor.drain()
    assert_exactly_once(store, first)

    # Everything the stream held is gone, group included, as after a Redis restart.
    store.client.delete(store.keys.stream_events())
    second = make_events(30, items, seed=2)
    processor.run_once(100, 0)  # meets NOGROUP, recreates the group on the next call
    xadd_events(store, second)
    processor.drain()
    assert_exactly_once(store, [*first, *second])
