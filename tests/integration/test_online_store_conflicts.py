"""The online store's check-and-write: what another writer did between a batch's read and its write."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import pytest

from core.schema import utcnow
from features.online_store import VERSION_FIELD, OnlineFeatureStore
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
    token = store.client.hget(key, VERSION_FIELD)
    assert token
    online.apply_events([EventRecord.from_event(e) for e in make_events(2, items, users=1, seed=3)])
    assert store.client.hget(key, VERSION_FIELD) not in (None, token)
