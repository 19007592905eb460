"""The offline feature functions on plain Arrow tables, without Ray: the code ``map_groups`` runs."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from core.lake import Lake
from core.schema import EventType
from core.tables import EVENTS, ITEMS, USERS
from features import offline
from features.definitions import CREATOR_QUALITY, ITEM_ENGAGEMENT, UPDATED_AT, USER_ACTIVITY, VIEWS
from features.params import DEFAULT_PARAMS
from features.records import EventRecord, ItemInfo
from features.spec import Dtype, FeatureView

T0 = datetime(2025, 6, 2, 9, 0, tzinfo=UTC)
AS_OF = T0 + timedelta(days=3)
P = DEFAULT_PARAMS
INFOS = {
    "i1": ItemInfo("i1", "music", "c1", item_type="video", created_at=T0 - timedelta(days=30)),
    "i2": ItemInfo("i2", "news", "c1", item_type="article", created_at=T0 - timedelta(days=30), region="eu"),
    "i3": ItemInfo("i3", "sports", "c2", item_type="video", created_at=T0 - timedelta(days=30)),
}


def ev(
    n: int, user: str, item: str, kind: EventType, at: datetime, watch_s: float | None = None
) -> EventRecord:
    return EventRecord(
        event_id=f"e{n:05d}", user_id=user, item_id=item, event_type=kind, ts=at, watch_time_s=watch_s
    )


def events_table(records: Sequence[EventRecord]) -> pa.Table:
    return pa.Table.from_pylist([r.to_row() for r in records], schema=EVENTS.schema)


def catalog(
    infos: dict[str, ItemInfo] = INFOS, erased: Sequence[str] = (), opted_out: Sequence[str] = ()
) -> offline.CatalogSnapshot:
    items = pa.Table.from_pylist(
        [
            {
                "item_id": i.item_id,
                "category": i.category,
                "creator_id": i.creator_id,
                "item_type": i.item_type,
                "created_at": i.created_at,
                "region": i.region,
            }
            for i in infos.values()
        ],
        schema=offline.ITEM_INFO_SCHEMA,
    )
    return offline.CatalogSnapshot(
        items=items,
        erased_users=pa.array(list(erased), type=pa.string()),
        opted_out_users=pa.array(list(opted_out), type=pa.string()),
    )


def stream(n: int, seed: int = 0) -> list[EventRecord]:
    rng = random.Random(seed)
    t = T0
    out = []
    for i in range(n):
        t += timedelta(seconds=rng.choice([1.0, 40.0, 700.0, 2_500.0, 9_000.0]))
        kind = rng.choice(list(EventType))
        out.append(
            ev(
                i,
                rng.choice(["u1", "u2", "u3"]),
                rng.choice([*INFOS, "unknown"]),
                kind,
                t,
                watch_s=rng.uniform(1, 900) if kind is EventType.WATCH else None,
            )
        )
    return out


def routed(records: Sequence[EventRecord], **kwargs: Any) -> pa.Table:
    options: dict[str, Any] = {"as_of": AS_OF, "catalog": catalog(), "views": VIEWS, **kwargs}
    return offline.route_events(events_table(records), **options)


def columns(table: pa.Table, first: str, second: str) -> list[tuple[Any, Any]]:
    return list(zip(table.column(first).to_pylist(), table.column(second).to_pylist(), strict=True))


def groups(table: pa.Table) -> dict[tuple[str, str], pa.Table]:
    """What groupby(["view", "entity_id"]) hands map_groups, one table per group."""
    keys = columns(table, offline.VIEW, offline.ENTITY_ID)
    rows: dict[tuple[str, str], list[int]] = defaultdict(list)
    for at, key in enumerate(keys):
        rows[key].append(at)
    return {key: table.take(pa.array(at)) for key, at in rows.items()}


def in_process(view: FeatureView, records: Sequence[EventRecord]) -> dict[str, dict[str, Any]]:
    """Entity to served values by the definitions alone: the reference both paths must match."""
    by_entity: dict[str, list[EventRecord]] = defaultdict(list)
    for record in (r for r in records if r.ts <= AS_OF):
        key = view.entity_key(record, INFOS.get(record.item_id))
        if key is not None:
            by_entity[key].append(record)
    return {
        key: dict(view.serve_refs(view.update({}, evs, INFOS, P), AS_OF, P)) for key, evs in by_entity.items()
    }


def as_served(view: FeatureView, row: dict[str, Any]) -> dict[str, Any]:
    return dict(offline.served_values(view, row))


# -- fold_entity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("view", VIEWS, ids=lambda v: v.name)
def test_fold_entity_serves_what_the_definitions_serve(view: FeatureView) -> None:
    records = stream(300)
    expected = in_process(view, records)
    found = {}
    for (name, entity), group in groups(routed(records)).items():
        if name != view.name:
            continue
        table = offline.fold_entity(group, view=view, as_of=AS_OF, params=P)
        assert table.schema.equals(offline.feature_schema(view))
        (row,) = table.to_pylist()
        assert row[offline.ENTITY_ID] == entity and row[UPDATED_AT] == AS_OF
        found[entity] = as_served(view, row)
        ids = set(group.column("event_id").to_pylist())
        folded = view.update({}, [r for r in records if r.event_id in ids], INFOS, P)
        assert json.loads(row[offline.STATE_JSON]) == folded
    assert found == expected


def test_fold_entity_ignores_row_order_and_counts_a_repeated_event_once() -> None:
    records = [r for r in stream(120, seed=4) if r.user_id == "u1" and r.ts <= AS_OF]
    table = routed(records, views=(USER_ACTIVITY,))
    shuffled = table.take(pa.array(random.Random(2).sample(range(table.num_rows), table.num_rows)))
    doubled = pa.concat_tables([shuffled, shuffled.slice(0, 5)])
    once = offline.fold_entity(table, view=USER_ACTIVITY, as_of=AS_OF, params=P)
    assert offline.fold_entity(doubled, view=USER_ACTIVITY, as_of=AS_OF, params=P).equals(once)
    assert once.column("user_activity:event_count").to_pylist() == [len(records)]


def test_fold_entity_refuses_a_group_of_several_entities_and_passes_an_empty_one() -> None:
    table = routed([ev(1, "u1", "i1", EventType.CLICK, T0), ev(2, "u2", "i1", EventType.CLICK, T0)])
    users = table.filter(pc.equal(table.column(offline.VIEW), USER_ACTIVITY.name))
    with pytest.raises(ValueError, match="one entity"):
        offline.fold_entity(users, view=USER_ACTIVITY, as_of=AS_OF, params=P)
    empty = offline.fold_entity(users.slice(0, 0), view=USER_ACTIVITY, as_of=AS_OF, params=P)
    assert empty.num_rows == 0 and empty.schema.equals(offline.feature_schema(USER_ACTIVITY))


def test_watch_times_are_weighed_as_the_lake_stores_them() -> None:
    # The record of an API event and the record read back from the lake's float32 column are equal.
    api = ev(1, "u1", "i1", EventType.WATCH, T0, watch_s=613.37)
    assert api.watch_time_s != 613.37
    table = events_table([api])
    assert table.column("watch_time_s").to_pylist() == [api.watch_time_s]
    assert EventRecord.from_row(table.to_pylist()[0]) == api


# -- route_events --------------------------------------------------------------------------------


def test_route_events_keeps_one_copy_per_event_id_whatever_the_block_order() -> None:
    first = ev(1, "u1", "i1", EventType.CLICK, T0)
    conflicting = EventRecord(
        event_id=first.event_id, user_id="u2", item_id="i2", event_type=EventType.LIKE, ts=T0 + timedelta(1)
    )
    for order in ([first, conflicting, first], [conflicting, first, first]):
        table = routed(order)
        assert set(table.column("event_id").to_pylist()) == {first.event_id}
        assert set(table.column("user_id").to_pylist()) == {"u1"}  # the earlier copy, on every run
        assert table.num_rows == len(VIEWS)


def test_route_events_drops_late_and_erased_and_keeps_removed_items() -> None:
    records = [
        ev(1, "u1", "i1", EventType.CLICK, T0),
        ev(2, "gone", "i1", EventType.CLICK, T0),
        ev(3, "u1", "i3", EventType.LIKE, AS_OF),
        ev(4, "u1", "i3", EventType.LIKE, AS_OF + timedelta(microseconds=1)),
    ]
    table = routed(records, catalog=catalog(erased=["gone"]))
    assert sorted(set(table.column("event_id").to_pylist())) == ["e00001", "e00003"]


def test_route_events_sends_opted_out_users_and_unknown_items_where_online_does() -> None:
    records = [ev(1, "quiet", "i2", EventType.LIKE, T0), ev(2, "u1", "unknown", EventType.CLICK, T0)]
    table = routed(records, catalog=catalog(opted_out=["quiet"]))
    pairs = set(columns(table, offline.VIEW, offline.ENTITY_ID))
    assert pairs == {
        (ITEM_ENGAGEMENT.name, "i2"),
        (CREATOR_QUALITY.name, "c1"),
        (USER_ACTIVITY.name, "u1"),
        (ITEM_ENGAGEMENT.name, "unknown"),
    }
    unknown = table.filter(pc.equal(table.column("item_id"), "unknown"))
    assert unknown.column("item:category").null_count == unknown.num_rows
    known = table.filter(pc.equal(table.column("item_id"), "i2")).to_pylist()[0]
    assert (known["item:category"], known["item:creator_id"], known["item:region"]) == ("news", "c1", "eu")


def test_route_events_can_keep_only_some_entities() -> None:
    table = routed(stream(100), entity_ids=pa.array(["u2", "c2"]))
    assert set(table.column(offline.ENTITY_ID).to_pylist()) == {"u2", "c2"}


def test_route_events_on_an_empty_block() -> None:
    assert routed([]).schema.equals(offline.routed_schema())


# -- fold_group and unpack_view: the packed rows of the shared shuffle --------------------------


def test_fold_group_then_unpack_view_equals_fold_entity() -> None:
    records = stream(200, seed=7)
    packed = []
    direct: dict[str, list[pa.Table]] = defaultdict(list)
    for (name, _), group in groups(routed(records)).items():
        packed.append(offline.fold_group(group, views=VIEWS, as_of=AS_OF, params=P))
        view = next(v for v in VIEWS if v.name == name)
        direct[name].append(offline.fold_entity(group, view=view, as_of=AS_OF, params=P))
    batch = pa.concat_tables(packed)
    assert batch.schema.equals(offline.PACKED_SCHEMA)
    for view in VIEWS:
        unpacked = offline.unpack_view(batch, view=view)
        expected = pa.concat_tables(direct[view.name])
        assert unpacked.schema.equals(offline.feature_schema(view))
        assert unpacked.sort_by(offline.ENTITY_ID).equals(expected.sort_by(offline.ENTITY_ID))


def test_fold_group_refuses_a_group_of_two_views() -> None:
    table = routed([ev(1, "u1", "i1", EventType.CLICK, T0)])
    with pytest.raises(ValueError, match="one of the views"):
        offline.fold_group(table, views=VIEWS, as_of=AS_OF, params=P)


def test_the_pipeline_without_ray_equals_the_definitions() -> None:
    records = stream(400, seed=11)
    # Two blocks, as two hash partitions would hand them over; ids are distinct across them.
    tables = [routed(records[:150]), routed(records[150:])]
    packed = pa.concat_tables(
        [
            offline.fold_group(group, views=VIEWS, as_of=AS_OF, params=P)
            for group in groups(pa.concat_tables(tables)).values()
        ]
    )
    for view in VIEWS:
        rows = offline.unpack_view(packed, view=view).to_pylist()
        assert {r[offline.ENTITY_ID]: as_served(view, r) for r in rows} == in_process(view, records)


# -- values and schemas --------------------------------------------------------------------------


@pytest.mark.parametrize("view", VIEWS, ids=lambda v: v.name)
def test_every_default_survives_encoding(view: FeatureView) -> None:
    schema = offline.feature_schema(view)
    assert schema.names == [offline.ENTITY_ID, *view.refs, UPDATED_AT, offline.STATE_JSON]
    for spec in view.specs:
        cell = offline.encode_value(spec, spec.default)
        assert offline.decode_value(spec, cell) == spec.default
        if spec.dtype in (Dtype.STRINGS, Dtype.FLOATS):
            assert isinstance(cell, str) and isinstance(json.loads(cell), list)


def test_float_lists_keep_every_digit() -> None:
    spec = USER_ACTIVITY.specs[[s.name for s in USER_ACTIVITY.specs].index("top_category_affinities")]
    value = (0.1 + 0.2, 1 / 3, 1e-300)
    assert offline.decode_value(spec, offline.encode_value(spec, value)) == value


# -- the catalog as of an instant ----------------------------------------------------------------


def _item_row(item_id: str, category: str, updated_at: datetime, status: str = "active") -> dict[str, Any]:
    return {
        "item_id": item_id,
        "item_type": "video",
        "title": item_id,
        "category": category,
        "tags": [],
        "creator_id": "c1",
        "status": status,
        "created_at": T0 - timedelta(days=9),
        "metadata_json": '{"region":"eu"}',
        "updated_at": updated_at,
    }


def _user_row(user_id: str, updated_at: datetime, **flags: bool) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "personalization": flags.get("personalization", True),
        "erased": flags.get("erased", False),
        "created_at": T0 - timedelta(days=9),
        "updated_at": updated_at,
    }


def test_catalog_snapshot_reads_items_as_of_and_privacy_flags_as_of_now(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    lake.append(
        ITEMS,
        pa.Table.from_pylist(
            [
                _item_row("i1", "music", T0),
                _item_row("i1", "news", AS_OF + timedelta(days=1)),  # after as_of: not seen yet
                _item_row("i2", "art", AS_OF + timedelta(days=2)),  # recorded later: its first row
                _item_row("i2", "food", AS_OF + timedelta(days=3)),
                _item_row("i3", "cars", T0, status="removed"),
            ]
        ),
    )
    lake.append(ITEMS, pa.Table.from_pylist([_item_row("i1", "pets", T0)]))  # same time, later file
    lake.append(
        USERS,
        pa.Table.from_pylist(
            [
                _user_row("u1", T0),
                _user_row("u1", AS_OF + timedelta(days=5), erased=True),
                _user_row("u2", T0, personalization=False),
                _user_row("u2", T0 + timedelta(hours=1)),
                _user_row("u3", AS_OF + timedelta(days=5), personalization=False),
            ]
        ),
    )
    snapshot = offline.CatalogSnapshot.read(lake, AS_OF)
    categories = dict(columns(snapshot.items, "item_id", "category"))
    assert categories == {"i1": "pets", "i2": "art", "i3": "cars"}
    assert set(snapshot.items.column("region").to_pylist()) == {"eu"}
    assert snapshot.erased_users.to_pylist() == ["u1"]
    assert snapshot.opted_out_users.to_pylist() == ["u3"]


def test_catalog_snapshot_of_an_empty_lake(tmp_path: Path) -> None:
    snapshot = offline.CatalogSnapshot.read(Lake(str(tmp_path)), AS_OF)
    assert snapshot.items.num_rows == 0 and len(snapshot.erased_users) == 0


# -- snapshots in the lake -----------------------------------------------------------------------


def test_feature_snapshots_are_written_once_per_instant_and_read_back(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    records = stream(60, seed=3)
    rows = {}
    for as_of in (AS_OF, AS_OF + timedelta(hours=6)):
        by_item = groups(routed(records, views=(ITEM_ENGAGEMENT,))).values()
        folded = [offline.fold_entity(g, view=ITEM_ENGAGEMENT, as_of=as_of, params=P) for g in by_item]
        rows[as_of] = pa.concat_tables(folded).sort_by(offline.ENTITY_ID)
        written = offline.write_features(lake, ITEM_ENGAGEMENT, rows[as_of])
        assert offline.write_features(lake, ITEM_ENGAGEMENT, rows[as_of]) == written
    assert offline.snapshots(lake, ITEM_ENGAGEMENT) == sorted(rows)
    assert offline.read_features(lake, ITEM_ENGAGEMENT).equals(rows[AS_OF + timedelta(hours=6)])
    assert offline.read_features(lake, ITEM_ENGAGEMENT, AS_OF).equals(rows[AS_OF])
    assert offline.read_features(lake, USER_ACTIVITY).num_rows == 0
