"""Online/offline feature parity: one event stream through the stream path and through Ray Data.

A small synthetic world (a few dozen users, items and creators; a few thousand events of every
type over four days) is turned into API events. The same stream entries feed both paths:

- online: decoded and applied to the Redis feature store in batches, in stream order, as the
  stream processor does (:meth:`OnlineFeatureStore.apply_events`);
- offline: turned into lake rows as the lake writer does, appended to the lake, then
  materialised with Ray Data (:mod:`features.offline`) as of the same instant.

Every state and every served feature of every entity must be equal both ways, exactly. The
stream also holds what both paths must drop or treat alike: a redelivered event, an erased user,
a user who opted out, a removed item, an item the catalog does not know, and watch times that
float32 (the lake's type) cannot hold exactly.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from core.lake import Lake
from core.schema import EntityType, EventContext, EventType, UserEvent
from core.tables import EVENTS, ITEMS, USERS
from core.types import FeatureValue
from features import offline
from features.catalog import CatalogStore
from features.definitions import UPDATED_AT, USER_ACTIVITY, VIEWS
from features.lake_writer import event_rows
from features.online_store import OnlineFeatureStore
from features.params import DEFAULT_PARAMS
from features.records import EventRecord, ItemInfo
from features.redis_store import RedisStore
from features.spec import Dtype, FeatureView, State
from features.stream_codec import decode_event, encode_event
from training.synthetic import World, WorldConfig, build_truth

pytestmark = pytest.mark.integration

BATCH = 250
"""Stream entries per online batch, as the processor reads them."""

ERASED_USER = "u1"
OPTED_OUT_USER = "u2"
REMOVED_ITEM = "i3"
GHOST_ITEM = "ghost-item"


@dataclass(frozen=True)
class History:
    """One stream of events and the catalog around it, written to a lake."""

    lake: Lake
    now: datetime
    fields: list[dict[Any, Any]]
    """Stream entries in stream order (duplicates included)."""
    items: pa.Table
    users: pa.Table
    unique_events: int
    erased_events: int


def _start() -> datetime:
    # Fixed days before today, so every timestamp is in the past and the run is repeatable per day.
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=6)


def _world_tables(start: datetime) -> tuple[pa.Table, pa.Table, pa.Table]:
    config = WorldConfig.tiny(
        n_users=40,
        n_items=60,
        n_creators=8,
        n_categories=8,
        n_events=3_000,
        span_days=4,
        start=start,
        seed=3,
        chunk_rows=1_000,
    )
    tables: dict[str, list[pa.Table]] = {"users": [], "items": [], "events": []}
    for chunk in World(config, build_truth(config)).chunks():
        for name, table in chunk.items():
            if name in tables:
                tables[name].append(table)
    users, items, events = (pa.concat_tables(tables[n]) for n in ("users", "items", "events"))
    return users, items, events


def _user_event(row: Mapping[str, Any]) -> UserEvent:
    watch = row["watch_time_s"]
    return UserEvent(
        event_id=row["event_id"],
        user_id=row["user_id"],
        item_id=row["item_id"],
        event_type=EventType(row["event_type"]),
        timestamp=row["ts"],
        context=EventContext(
            surface=row["surface"],
            device=row["device"],
            region=row["region"],
            request_id=row["request_id"],
            position=row["position"],
            extra=json.loads(row["context_json"]),
        ),
        # A client sends decimals; most of them float32 (the lake's type) cannot hold exactly.
        watch_time_s=None if watch is None else round(float(watch) * 1.37, 2),
    )


def _change_rows(spec_rows: pa.Table, key: str, value: str, updates: Mapping[str, Any]) -> pa.Table:
    row = spec_rows.filter(pc.equal(spec_rows.column(key), value)).slice(0, 1).to_pylist()[0]
    return pa.Table.from_pylist([{**row, **updates}], schema=spec_rows.schema)


def build_history(home: Path) -> History:
    start = _start()
    users, items, events = _world_tables(start)
    changed = start + timedelta(minutes=1)
    users = pa.concat_tables(
        [
            users,
            _change_rows(users, "user_id", ERASED_USER, {"erased": True, "updated_at": changed}),
            _change_rows(users, "user_id", OPTED_OUT_USER, {"personalization": False, "updated_at": changed}),
        ]
    )
    items = pa.concat_tables(
        [items, _change_rows(items, "item_id", REMOVED_ITEM, {"status": "removed", "updated_at": changed})]
    )
    stream = [_user_event(row) for row in events.to_pylist()]
    last = stream[-1].timestamp
    # Events on an item the catalog does not know: no creator, no category.
    ghosts = [
        UserEvent(
            event_id=f"ghost-{i}",
            user_id=f"u{10 + i}",
            item_id=GHOST_ITEM,
            event_type=kind,
            timestamp=last - timedelta(minutes=40 - i),
            watch_time_s=95.5 if kind is EventType.WATCH else None,
        )
        for i, kind in enumerate(EventType)
    ]
    stream = sorted([*stream, *ghosts], key=lambda e: (e.timestamp, e.event_id))
    # A producer retry: the same event again, a few batches later.
    duplicate = stream[len(stream) // 2]
    stream.insert(len(stream) // 2 + 3 * BATCH, duplicate)
    fields = [encode_event(event) for event in stream]

    lake = Lake(str(home))
    lake.append(USERS, users)
    lake.append(ITEMS, items)
    # Micro-batches as the lake writer appends them; the duplicate lands in a later file.
    for lo in range(0, len(fields), 1_000):
        rows = [row for entry in fields[lo : lo + 1_000] for row in event_rows(entry)]
        lake.append(EVENTS, pa.Table.from_pylist(rows))

    unique = {e.event_id: e for e in stream}
    return History(
        lake=lake,
        now=last + timedelta(minutes=10),
        fields=fields,
        items=items,
        users=users,
        unique_events=len(unique),
        erased_events=sum(1 for e in unique.values() if e.user_id == ERASED_USER),
    )


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    return build_history(tmp_path_factory.mktemp("parity"))


@pytest.fixture(scope="module")
def materialized(history: History, ray_cluster: None) -> dict[str, pa.Table]:
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    return offline.materialize_tables(history.lake, as_of=history.now, num_partitions=2)


def _online(store: RedisStore, history: History) -> OnlineFeatureStore:
    catalog = CatalogStore(store)
    catalog.put_items(history.items)
    catalog.put_users(history.users)
    return OnlineFeatureStore(store, clock=lambda: history.now)


def _stored_entities(store: RedisStore, entity: EntityType) -> set[str]:
    prefix = store.keys.feature_state(entity, "x")[:-1]
    return {key[len(prefix) :] for key in store.client.scan_iter(match=f"{prefix}*", count=1_000)}


def _record_values(view: FeatureView, record: Mapping[str, Any]) -> dict[str, FeatureValue]:
    # JSON gives lists back; a FeatureMap (and the offline decoder) holds tuples.
    return {ref: tuple(record[ref]) if isinstance(record[ref], list) else record[ref] for ref in view.refs}


def assert_online_equals_offline(
    store: RedisStore, online: OnlineFeatureStore, tables: Mapping[str, pa.Table], now: datetime
) -> tuple[int, int]:
    """Every state and served value equal both ways; returns (entities, feature values) compared."""
    entities = values = 0
    stamp = now.isoformat().replace("+00:00", "Z")
    for view in VIEWS:
        table = tables[view.name]
        rows = table.to_pylist()
        ids = [row[offline.ENTITY_ID] for row in rows]
        assert _stored_entities(store, view.entity) == set(ids), view.name
        states = online.read_states(view, ids)
        records = online.get_serving(view.entity, ids)
        for row, state, record in zip(rows, states, records, strict=True):
            key = (view.name, row[offline.ENTITY_ID])
            assert state == json.loads(row[offline.STATE_JSON]), key
            assert record is not None, key
            assert record[UPDATED_AT] == stamp and row[UPDATED_AT] == now, key
            expected = offline.served_values(view, row)
            assert _record_values(view, record) == expected, key
            entities += 1
            values += len(expected)
    return entities, values


def replay(online: OnlineFeatureStore, fields: Sequence[Mapping[Any, Any]]) -> tuple[int, int, int]:
    applied = duplicates = skipped = 0
    for lo in range(0, len(fields), BATCH):
        # What StreamProcessor.process does with each batch it reads.
        batch = [EventRecord.from_event(decode_event(entry)) for entry in fields[lo : lo + BATCH]]
        result = online.apply_events(batch)
        applied += result.applied
        duplicates += result.duplicates
        skipped += result.skipped
    return applied, duplicates, skipped


def test_the_stream_holds_every_case_parity_needs(history: History) -> None:
    events = [decode_event(entry) for entry in history.fields]
    assert {e.event_type for e in events} == set(EventType)
    assert len(events) - history.unique_events == 1
    assert history.erased_events > 0
    assert any(e.user_id == OPTED_OUT_USER for e in events)
    assert any(e.item_id == REMOVED_ITEM for e in events)
    assert any(e.item_id == GHOST_ITEM for e in events)
    watches = [e.watch_time_s for e in events if e.watch_time_s is not None]
    assert any(float(np.float32(w)) != w for w in watches), "float32 rounding must matter somewhere"
    assert len({e.user_id for e in events}) >= 30 and len({e.item_id for e in events}) >= 50
    days = {e.timestamp.date() for e in events}
    assert len(days) >= 4


def test_online_replay_and_ray_data_materialisation_agree_on_every_feature(
    store: RedisStore, history: History, materialized: dict[str, pa.Table]
) -> None:
    online = _online(store, history)
    applied, duplicates, skipped = replay(online, history.fields)
    assert duplicates == 1
    assert skipped == history.erased_events
    assert applied == history.unique_events - history.erased_events

    entities, values = assert_online_equals_offline(store, online, materialized, history.now)
    assert entities == sum(materialized[v.name].num_rows for v in VIEWS) > 100
    assert values == sum(materialized[v.name].num_rows * len(v.specs) for v in VIEWS)

    users = set(materialized[USER_ACTIVITY.name].column(offline.ENTITY_ID).to_pylist())
    assert ERASED_USER not in users and OPTED_OUT_USER not in users
    items = materialized["item_engagement"]
    assert REMOVED_ITEM in items.column(offline.ENTITY_ID).to_pylist()
    # The erased user's events count nowhere, and the redelivered one counts once.
    total = pc.sum(items.column("item_engagement:event_count_total")).as_py()
    assert total == history.unique_events - history.erased_events
    creators = materialized["creator_quality"]
    ghost_events = len(EventType)
    assert pc.sum(creators.column("creator_quality:event_count")).as_py() == total - ghost_events


def test_late_arrivals_change_decayed_sums_in_the_last_bits_only(
    store: RedisStore, history: History, materialized: dict[str, pa.Table]
) -> None:
    # Some entries reach the processor a few batches late: the online fold then adds an old event
    # to a decayed sum already moved past it, which rounds differently from folding in time order.
    rng = random.Random(1)
    fields = list(history.fields)
    for _ in range(30):
        at = rng.randrange(len(fields) - 2 * BATCH)
        fields.insert(at + rng.randint(BATCH, 2 * BATCH), fields.pop(at))
    online = _online(store, history)
    replay(online, fields)

    inexact = 0
    for view in VIEWS:
        rows = materialized[view.name].to_pylist()
        records = online.get_serving(view.entity, [row[offline.ENTITY_ID] for row in rows])
        for row, record in zip(rows, records, strict=True):
            assert record is not None
            got, expected = _record_values(view, record), offline.served_values(view, row)
            for spec in view.specs:
                if spec.dtype in (Dtype.FLOAT, Dtype.FLOATS):
                    assert got[spec.ref] == pytest.approx(expected[spec.ref], rel=1e-12, abs=1e-12), spec.ref
                    inexact += got[spec.ref] != expected[spec.ref]
                else:
                    assert got[spec.ref] == expected[spec.ref], (spec.ref, row[offline.ENTITY_ID])
    assert inexact > 0, "the late entries should have reached some decayed sum"


def test_offline_states_seed_a_fresh_online_store(
    store: RedisStore, history: History, materialized: dict[str, pa.Table]
) -> None:
    online = _online(store, history)
    late_eraser = materialized[USER_ACTIVITY.name].column(offline.ENTITY_ID)[0].as_py()
    CatalogStore(store).erase_user(late_eraser)
    written = {
        view.name: offline.load_online(online, view, materialized[view.name], now=history.now)
        for view in VIEWS
    }
    assert written[USER_ACTIVITY.name] == materialized[USER_ACTIVITY.name].num_rows - 1
    assert online.read_states(USER_ACTIVITY, [late_eraser]) == [None]

    kept = {
        name: table.filter(pc.not_equal(table.column(offline.ENTITY_ID), late_eraser))
        for name, table in materialized.items()
    }
    assert_online_equals_offline(store, online, kept, history.now)

    # The stream then continues from the seeded states.
    user = kept[USER_ACTIVITY.name].column(offline.ENTITY_ID)[0].as_py()
    later = EventRecord.from_event(
        UserEvent(user_id=user, item_id="i0", event_type=EventType.LIKE, timestamp=history.now)
    )
    assert online.apply_events([later]).applied == 1
    before: State = json.loads(kept[USER_ACTIVITY.name].column(offline.STATE_JSON)[0].as_py())
    info = ItemInfo.from_row(
        history.items.filter(pc.equal(history.items.column("item_id"), "i0")).to_pylist()[0]
    )
    expected = USER_ACTIVITY.update(before, [later], {"i0": info}, DEFAULT_PARAMS)
    assert online.read_states(USER_ACTIVITY, [user]) == [expected]


def test_point_in_time_features_see_no_later_event(
    history: History, materialized: dict[str, pa.Table]
) -> None:
    as_of = history.now - timedelta(days=2)
    users = materialized[USER_ACTIVITY.name].column(offline.ENTITY_ID).to_pylist()[:6]
    asked = [*users, "nobody", users[0]]
    table = offline.features_as_of(history.lake, asked, as_of, entity_type=EntityType.USER, num_partitions=2)
    assert table.column(offline.ENTITY_ID).to_pylist() == asked

    lake_events = [EventRecord.from_row(r) for r in history.lake.read_deduped(EVENTS).to_pylist()]
    infos = {r["item_id"]: ItemInfo.from_row(r) for r in history.lake.read_latest(ITEMS).to_pylist()}
    for row in table.to_pylist():
        mine = [e for e in lake_events if e.user_id == row[offline.ENTITY_ID] and e.ts <= as_of]
        expected = USER_ACTIVITY.serve_refs(
            USER_ACTIVITY.update({}, mine, infos, DEFAULT_PARAMS), as_of, DEFAULT_PARAMS
        )
        assert offline.served_values(USER_ACTIVITY, row) == {
            ref: tuple(v) if isinstance(v, list) else v for ref, v in expected.items()
        }, row[offline.ENTITY_ID]
        assert row[UPDATED_AT] == as_of
    assert table.column("user_activity:event_count").to_pylist()[len(users)] == 0


def test_snapshots_round_trip_through_the_lake(history: History, materialized: dict[str, pa.Table]) -> None:
    for view in VIEWS:
        table = materialized[view.name]
        first = offline.write_features(history.lake, view, table)
        again = offline.write_features(history.lake, view, table)
        assert first == again and len(first) == 1
        assert first[0].endswith(
            f"/features/{view.name}/date={history.now.date()}/{offline.snapshot_name(history.now)}.parquet"
        )
        assert offline.snapshots(history.lake, view) == [history.now]
        assert offline.read_features(history.lake, view).equals(table)
