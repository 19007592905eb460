"""The online store's check-and-write: what another writer did between a batch's read and its write."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

import pytest

from core.schema import EntityType, utcnow
from features.definitions import ITEM_ENGAGEMENT
from features.online_store import TOKEN_LEN, OnlineFeatureStore, marker_bucket
from features.records import EventRecord
from features.redis_store import RedisStore
from tests.integration.test_stream_processing import assert_exactly_once, make_events, put_items

pytestmark = pytest.mark.integration


def _interrupting_clock(action: Callable[[], object]) -> Callable[[], datetime]:
    """A clock that runs ``action`` the first time it is read: after the batch's reads, before its write."""
    calls: list[int] = []

    def clock() -> datetime:
        calls.append(1)
        if len(calls) == 1:
            action()
        return utcnow()

    return clock


def test_events_applied_by_another_consumer_meanwhile_count_as_duplicates(store: RedisStore) -> None:
    items = put_items(store, 3)
    events = make_events(10, items, users=2)
    records = [EventRecord.from_event(e) for e in events]
    clock = _interrupting_clock(lambda: OnlineFeatureStore(store).apply_events([records[3]]))
    result = OnlineFeatureStore(store, clock=clock).apply_events(records)
    assert (result.applied, result.duplicates) == (9, 1)
    assert_exactly_once(store, events)


def test_a_state_changed_meanwhile_is_read_and_folded_again(store: RedisStore) -> None:
    items = put_items(store, 3)
    first, later = make_events(6, items, users=2), make_events(1, items, users=2, seed=9)
    clock = _interrupting_clock(
        lambda: OnlineFeatureStore(store).apply_events([EventRecord.from_event(later[0])])
    )
    result = OnlineFeatureStore(store, clock=clock).apply_events([EventRecord.from_event(e) for e in first])
    assert result.applied == 6 and result.retries >= 1
    assert_exactly_once(store, first + later)


def test_every_state_write_replaces_the_version_token(store: RedisStore) -> None:
    items = put_items(store, 1)
    online = OnlineFeatureStore(store)
    key = store.keys.feature_state("item", items[0])
    online.apply_events([EventRecord.from_event(e) for e in make_events(2, items, users=1)])
    token = store.client.getrange(key, 0, TOKEN_LEN - 1)
    assert len(token) == TOKEN_LEN
    online.apply_events([EventRecord.from_event(e) for e in make_events(2, items, users=1, seed=3)])
    assert store.client.getrange(key, 0, TOKEN_LEN - 1) not in ("", token)


def _event_count(store: RedisStore, entity: EntityType, entity_id: str, feature: str) -> int:
    record = OnlineFeatureStore(store).get_serving(entity, [entity_id])[0]
    assert record is not None
    return int(record[feature])


def test_cached_states_are_used_only_while_no_other_writer_changed_them(store: RedisStore) -> None:
    items = put_items(store, 1)
    cached = OnlineFeatureStore(store, state_cache_size=100)
    first, second, third = (make_events(4, items, users=1, seed=s) for s in (1, 2, 3))
    assert cached.apply_events([EventRecord.from_event(e) for e in first]).applied == 4
    assert len(cached._state_cache) == 3  # the user, the item and the creator
    # Another writer folds events into the same states: the cached copies are now stale.
    OnlineFeatureStore(store).apply_events([EventRecord.from_event(e) for e in second])
    result = cached.apply_events([EventRecord.from_event(e) for e in third])
    assert result.applied == 4 and result.retries == 1  # the stale copies were read again
    assert_exactly_once(store, first + second + third)
    # Unchanged since, the cache serves the next batch without a conflict.
    fourth = make_events(4, items, users=1, seed=4)
    assert cached.apply_events([EventRecord.from_event(e) for e in fourth]).retries == 0
    assert_exactly_once(store, first + second + third + fourth)


def test_a_backfill_replaces_cached_states(store: RedisStore) -> None:
    items = put_items(store, 1)
    cached = OnlineFeatureStore(store, state_cache_size=100)
    cached.apply_events([EventRecord.from_event(e) for e in make_events(3, items, users=1)])
    OnlineFeatureStore(store).write_states(ITEM_ENGAGEMENT, {items[0]: {}})
    later = make_events(2, items, users=1, seed=7)
    assert cached.apply_events([EventRecord.from_event(e) for e in later]).retries == 1
    # The item's count starts again from the backfilled (empty) state, not the cached one.
    assert _event_count(store, EntityType.ITEM, items[0], "item_engagement:event_count_total") == 2


def test_the_cache_keeps_the_most_recently_written_states(store: RedisStore) -> None:
    items = put_items(store, 6)
    cached = OnlineFeatureStore(store, state_cache_size=4)
    cached.apply_events([EventRecord.from_event(e) for e in make_events(12, items, users=6)])
    assert len(cached._state_cache) == 4
    assert_exactly_once(store, make_events(12, items, users=6))


def test_a_marker_past_the_first_chunk_is_found(store: RedisStore) -> None:
    # The script checks a marker set a thousand ids per command; one in a later chunk must count
    # too. All in one minute, so all in one set.
    items = put_items(store, 5)
    events = make_events(2500, items, users=40)
    events = [e.model_copy(update={"timestamp": events[0].timestamp}) for e in events]
    records = [EventRecord.from_event(e) for e in events]
    assert len({marker_bucket(r.ts_s) for r in records}) == 1
    clock = _interrupting_clock(lambda: OnlineFeatureStore(store).apply_events([records[2100]]))
    result = OnlineFeatureStore(store, clock=clock).apply_events(records)
    assert (result.applied, result.duplicates) == (2499, 1)
    assert_exactly_once(store, events)


def test_a_user_erased_meanwhile_is_skipped_on_the_retry(store: RedisStore) -> None:
    items = put_items(store, 3)
    events = make_events(6, items, users=2)
    erased = events[0].user_id
    clock = _interrupting_clock(lambda: store.client.sadd(store.keys.erased_users(), erased))
    result = OnlineFeatureStore(store, clock=clock).apply_events([EventRecord.from_event(e) for e in events])
    assert result.retries >= 1
    assert result.skipped == sum(e.user_id == erased for e in events)
    assert result.applied == len(events) - result.skipped


def test_markers_go_to_the_set_of_their_minute_of_event_time_and_expire(store: RedisStore) -> None:
    items = put_items(store, 3)
    events = make_events(6, items, users=2)
    # Two minutes apart, and one from two years ago (an import's history is marked the same way).
    times = [events[0].timestamp + timedelta(minutes=2 * (i % 2)) for i in range(5)]
    times.append(events[0].timestamp - timedelta(days=730))
    events = [e.model_copy(update={"timestamp": t}) for e, t in zip(events, times, strict=True)]
    records = [EventRecord.from_event(e) for e in events]
    online = OnlineFeatureStore(store, processed_ttl_s=600)
    assert online.apply_events(records[:4]).applied == 4
    result = online.apply_events(records)
    assert (result.applied, result.duplicates) == (2, 4)
    assert_exactly_once(store, events)
    for partition in online.partitions:
        members: dict[int, set[str]] = {}
        for record in records:
            members.setdefault(marker_bucket(record.ts_s), set()).add(record.event_id)
        assert len(members) == 3
        for bucket, ids in members.items():
            marker_set = store.keys.processed_events(partition.name, bucket)
            assert store.client.smembers(marker_set) == ids
            assert 0 < store.client.ttl(marker_set) <= 600
