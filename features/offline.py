"""Offline features: the lake's events folded by the online definitions, with Ray Data.

The online store folds each stream batch into per-entity states (:mod:`features.online_store`).
This module folds each entity's whole history in one call, with the same
:class:`features.spec.FeatureView` values and the same :class:`features.params.FeatureParams`, and
serves the states as of one instant ``as_of``. Folding in one pass equals folding in batches (see
:mod:`features.spec`), so both paths reach the same states and serve the same values;
``tests/integration/test_feature_parity.py`` replays one stream both ways and compares every
feature of every entity.

Pipeline of :func:`materialize`:

1. Read the ``events`` files and hash-partition them by ``event_id``, so all copies of an event
   land in one block.
2. Per block, :func:`route_events`: keep one copy per ``event_id``, drop events stamped after
   ``as_of`` and events of erased users, join the catalog info the folds read (``item:*``
   columns) and emit one row per entity the event updates, found by ``view.entity_key``, the
   function the online store routes events with.
3. ``groupby(["view", "entity_id"]).map_groups(fold_group)``: per entity, ``view.update`` over
   its events, then ``view.serve(state, as_of)``; one row per entity (:func:`fold_entity`).
   All views share this one shuffle; :func:`unpack_view` then cuts one dataset per view.

Which events count, mirrored from :meth:`OnlineFeatureStore.apply_events
<features.online_store.OnlineFeatureStore.apply_events>`:

- an ``event_id`` seen several times counts once;
- events of erased users (latest ``users`` row ``erased=True``) count nowhere;
- events of users who opted out (latest ``users`` row ``personalization=False``) update no view
  of the ``user`` entity, but still count on items and creators;
- events on removed items count: the online store still reads a removed item's catalog record
  and folds its events (serving filters hide removed items, features do not);
- events on items missing from the catalog update no creator and add no category affinity.

Row schema of a view (:func:`feature_schema`), one row per entity:

============================  ====================  =================================================
column                        Arrow type            meaning
============================  ====================  =================================================
``entity_id``                 string                the user, item or creator id
``<view>:<feature>``          int64, float64,       one column per :class:`features.spec.FeatureSpec`
                              string                in declaration order; ``list[str]`` and
                                                    ``list[float]`` features hold JSON array text
``updated_at``                timestamp[us, UTC]    ``as_of``: the instant the values are served for
``state_json``                string                the view's state as compact JSON (what
                                                    :func:`load_online` writes to Redis)
============================  ====================  =================================================

:func:`write_features` stores such tables in the lake as ``lake/features/<view>/date=…/as-of-….parquet``
with the lake's atomic writes; :func:`read_features` reads one snapshot back.

What differs from the online path by design:

- Catalog info: each item's latest ``items`` row at or before ``as_of`` (its earliest row when
  it was first recorded after ``as_of``, as catalogs imported after their events are) applies to
  all its events. The online store uses the catalog as it is when each batch is processed, so an
  item that changed category or creator is attributed differently for events before the change.
- Erasure and opt-out: the latest ``users`` row decides for the whole history. Online, events
  processed before an erasure stay in their items' and creators' states (the user's own state is
  deleted); events processed while a user was opted in stay in the user's state.
- Time: offline drops events stamped after ``as_of`` and serves every entity as of ``as_of``.
  Online, an entity's serving record holds its values as of that entity's last update.
- Arrival order: when events reach the online store out of time order across batches, the
  decayed sums (category affinities, trending score) add the same terms in another order and
  may differ in the last bits; everything else stays equal.
- Duplicates: offline keeps the copy with the least ``(ts, user_id, item_id, event_type)``;
  online keeps the first delivered. Redelivered copies are identical, so this only matters when
  a client reuses an ``event_id`` for another event.
- Trending sorted sets and exclusion sets are online serving structures; they are not
  materialised here (``item_engagement:trending_score`` is).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.lake import Lake
from core.schema import EntityType
from core.tables import EVENTS, ITEMS, TS, USERS, TableSpec
from core.types import FeatureValue
from features.definitions import UPDATED_AT, VIEWS, views_of
from features.params import DEFAULT_PARAMS, FeatureParams
from features.records import EventRecord, ItemInfo
from features.spec import Dtype, FeatureSpec, FeatureView, State

if TYPE_CHECKING:
    import ray.data

    from features.online_store import OnlineFeatureStore

logger = logging.getLogger(__name__)

ENTITY_ID: Final = "entity_id"
"""Column of a feature row holding the entity id."""

VIEW: Final = "view"
"""Column of routed events and packed rows holding the view name."""

VALUES_JSON: Final = "values_json"
"""Column of a packed row holding its ``view:feature`` cells as one JSON object."""

STATE_JSON: Final = "state_json"
"""Column of a feature row holding the view's state as compact JSON."""

ITEM_PREFIX: Final = "item:"
"""Prefix of the catalog columns :func:`route_events` joins onto events (``item:category`` …)."""

ITEM_INFO_SCHEMA: Final = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("creator_id", pa.string(), nullable=False),
        pa.field("item_type", pa.string()),
        pa.field("created_at", TS),
        pa.field("region", pa.string()),
    ]
)
"""One :class:`features.records.ItemInfo` per row: the catalog as the folds see it."""

_INFO_FIELDS: Final = tuple(ITEM_INFO_SCHEMA.names[1:])
_ITEM_COLUMNS: Final = tuple(f"{ITEM_PREFIX}{name}" for name in _INFO_FIELDS)
_SNAPSHOT_NAME_RE: Final = re.compile(r"^as-of-(\d{8}T\d{12}Z)$")
_SNAPSHOT_STAMP: Final = "%Y%m%dT%H%M%S%fZ"
_DEDUPE_ORDER: Final = ("event_id", "ts", "user_id", "item_id", "event_type")

_ARROW_TYPES: Final[dict[Dtype, pa.DataType]] = {
    Dtype.INT: pa.int64(),
    Dtype.FLOAT: pa.float64(),
    Dtype.STR: pa.string(),
    # Lists travel as JSON text so every feature is one scalar cell, whatever reads the files.
    Dtype.STRINGS: pa.string(),
    Dtype.FLOATS: pa.string(),
}

# NaN or infinity in a state or value is a bug in a fold; refuse it, as the online store does.
_dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


# -- schemas -----------------------------------------------------------------------------------


def feature_schema(view: FeatureView) -> pa.Schema:
    """The Arrow schema of a view's feature rows (see the module docstring).

    Args:
        view: The view.

    Returns:
        ``entity_id``, one column per feature reference, ``updated_at``, ``state_json``.
    """
    return pa.schema(
        [
            pa.field(ENTITY_ID, pa.string(), nullable=False),
            *(pa.field(spec.ref, _ARROW_TYPES[spec.dtype], nullable=False) for spec in view.specs),
            pa.field(UPDATED_AT, TS, nullable=False),
            pa.field(STATE_JSON, pa.string(), nullable=False),
        ]
    )


def feature_table(view: FeatureView) -> TableSpec:
    """The lake table of a view's feature snapshots: ``lake/features/<view>/``, dated by ``updated_at``."""
    return TableSpec(name=f"features/{view.name}", schema=feature_schema(view), time_column=UPDATED_AT)


def encode_value(spec: FeatureSpec, value: FeatureValue) -> int | float | str:
    """A served value as stored in its feature column.

    Args:
        spec: The feature.
        value: Its value, as ``serve`` returns it.

    Returns:
        The int, float or string; lists as compact JSON arrays.
    """
    if spec.dtype in (Dtype.STRINGS, Dtype.FLOATS):
        assert isinstance(value, tuple | list), f"{spec.ref} must be a sequence, not {value!r}"
        return _dumps(list(value))
    if spec.dtype is Dtype.INT:
        return int(value)  # type: ignore[arg-type]
    if spec.dtype is Dtype.FLOAT:
        return float(value)  # type: ignore[arg-type]
    return str(value)


def decode_value(spec: FeatureSpec, cell: Any) -> FeatureValue:
    """A feature column's cell as the served value (lists become tuples, as in a ``FeatureMap``).

    Args:
        spec: The feature.
        cell: The stored cell.

    Returns:
        The value.
    """
    if spec.dtype is Dtype.STRINGS:
        return tuple(str(v) for v in json.loads(cell))
    if spec.dtype is Dtype.FLOATS:
        return tuple(float(v) for v in json.loads(cell))
    if spec.dtype is Dtype.INT:
        return int(cell)
    if spec.dtype is Dtype.FLOAT:
        return float(cell)
    return str(cell)


def served_values(view: FeatureView, row: Mapping[str, Any]) -> dict[str, FeatureValue]:
    """The ``view:feature`` values of one feature row, decoded.

    Args:
        view: The view the row belongs to.
        row: A row of :func:`feature_schema` (a dict from ``to_pylist``).

    Returns:
        Reference to value for every feature of the view.
    """
    return {spec.ref: decode_value(spec, row[spec.ref]) for spec in view.specs}


# -- the catalog the folds see -----------------------------------------------------------------


def _utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _first_per_key(table: pa.Table, key: str, sort_keys: list[tuple[str, str]]) -> pa.Table:
    """The first row of each ``key`` when rows are taken in ``sort_keys`` order."""
    if table.num_rows == 0:
        return table
    ranked = table.take(pc.sort_indices(table, sort_keys=sort_keys))
    ranked = ranked.append_column("__rank", pa.array(np.arange(ranked.num_rows, dtype=np.int64)))
    firsts = ranked.group_by(key, use_threads=False).aggregate([("__rank", "min")]).column("__rank_min")
    return ranked.take(firsts).drop_columns(["__rank"])


@dataclass(frozen=True)
class CatalogSnapshot:
    """What routing and the folds need from the catalog change-logs at one instant.

    Attributes:
        items: Catalog info per item (:data:`ITEM_INFO_SCHEMA`), as of the instant.
        erased_users: Ids of erased users (latest ``users`` row).
        opted_out_users: Ids of users who turned personalisation off (latest ``users`` row).
    """

    items: pa.Table
    erased_users: pa.Array
    opted_out_users: pa.Array

    @classmethod
    def read(cls, lake: Lake, as_of: datetime) -> CatalogSnapshot:
        """The catalog as of ``as_of`` (items) and as of now (privacy flags).

        Each item's info comes from its latest ``items`` row at or before ``as_of``; an item first
        recorded after ``as_of`` takes its earliest row, since catalogs are often imported after
        the events that refer to them. Erasure and opt-out always come from the latest ``users``
        row: a user's privacy choice applies to their whole history.

        Args:
            lake: The lake.
            as_of: The instant, timezone-aware (naive is taken as UTC).

        Returns:
            The snapshot.
        """
        at = pa.scalar(_utc(as_of), type=TS)
        rows = lake.read(ITEMS)
        rows = rows.append_column("__row", pa.array(np.arange(rows.num_rows, dtype=np.int64)))
        known = pc.less_equal(rows.column("updated_at"), at)
        # Latest wins: greatest updated_at, then the later file and row, as Lake.read_latest does.
        before = _first_per_key(
            rows.filter(known), "item_id", [("updated_at", "descending"), ("__row", "descending")]
        )
        after = _first_per_key(
            rows.filter(pc.invert(known)), "item_id", [("updated_at", "ascending"), ("__row", "ascending")]
        )
        seen = before.column("item_id").combine_chunks()
        after = after.filter(pc.invert(pc.is_in(after.column("item_id"), value_set=seen)))
        chosen = pa.concat_tables([before, after])
        infos = [ItemInfo.from_row(row) for row in chosen.to_pylist()]
        items = pa.Table.from_pylist(
            [{"item_id": i.item_id, **{name: getattr(i, name) for name in _INFO_FIELDS}} for i in infos],
            schema=ITEM_INFO_SCHEMA,
        )
        users = lake.read_latest(USERS, columns=["user_id", "personalization", "erased"])
        erased = users.filter(users.column("erased")).column("user_id")
        opted_out = users.filter(pc.invert(users.column("personalization"))).column("user_id")
        return cls(
            items=items,
            erased_users=erased.combine_chunks().cast(pa.string()),
            opted_out_users=opted_out.combine_chunks().cast(pa.string()),
        )


def _item_infos(table: pa.Table) -> dict[str, ItemInfo]:
    """Item id to info from ``item_id`` and the ``item:*`` columns (null category: unknown item)."""
    columns = {name: table.column(f"{ITEM_PREFIX}{name}").to_pylist() for name in _INFO_FIELDS}
    infos: dict[str, ItemInfo] = {}
    for at, item_id in enumerate(table.column("item_id").to_pylist()):
        if item_id in infos or columns["category"][at] is None:
            continue
        infos[item_id] = ItemInfo(item_id, **{name: values[at] for name, values in columns.items()})
    return infos


# -- per block: clean, join, route -------------------------------------------------------------


def routed_schema() -> pa.Schema:
    """The schema :func:`route_events` returns: event columns, ``item:*`` columns, ``view``, ``entity_id``."""
    item_fields = [
        pa.field(f"{ITEM_PREFIX}{f.name}", f.type) for f in ITEM_INFO_SCHEMA if f.name != "item_id"
    ]
    return pa.schema(
        [
            *EVENTS.schema,
            *item_fields,
            pa.field(VIEW, pa.string(), nullable=False),
            pa.field(ENTITY_ID, pa.string(), nullable=False),
        ]
    )


def route_events(
    batch: pa.Table,
    *,
    as_of: datetime,
    catalog: CatalogSnapshot,
    views: Sequence[FeatureView],
    entity_ids: pa.Array | None = None,
) -> pa.Table:
    """Clean a block of events, join their catalog info and route them to the entities they update.

    Every copy of an ``event_id`` must be in the block (the caller hash-partitions by it).

    Args:
        batch: Rows of the ``events`` table.
        as_of: Events stamped after this instant are dropped.
        catalog: Items, erased and opted-out users.
        views: The views to route to.
        entity_ids: Route only to these entities; to all when ``None``.

    Returns:
        One row per kept event and entity it updates, in :func:`routed_schema`: the event, its
        item's catalog info (null when the catalog does not know the item), the view and the
        entity id (``view.entity_key``, as the online store routes).
    """
    schema = routed_schema()
    events = batch.select(EVENTS.schema.names).cast(EVENTS.schema).combine_chunks()
    if events.num_rows == 0:
        return schema.empty_table()
    # One copy per event_id; the order makes the pick the same on every run.
    events = events.take(pc.sort_indices(events, sort_keys=[(c, "ascending") for c in _DEDUPE_ORDER]))
    ids = events.column("event_id")
    first = pc.not_equal(ids.slice(1), ids.slice(0, events.num_rows - 1))
    events = events.filter(pa.concat_arrays([pa.array([True]), first.combine_chunks()]))
    keep = pc.and_(
        pc.less_equal(events.column("ts"), pa.scalar(_utc(as_of), type=TS)),
        pc.invert(pc.is_in(events.column("user_id"), value_set=catalog.erased_users)),
    )
    events = events.filter(keep)
    if events.num_rows == 0:
        return schema.empty_table()

    position = pc.index_in(events.column("item_id"), value_set=catalog.items.column("item_id"))
    for name, column in zip(_ITEM_COLUMNS, _INFO_FIELDS, strict=True):
        events = events.append_column(name, catalog.items.column(column).take(position))
    infos = _item_infos(events)
    opted_out = set(catalog.opted_out_users.to_pylist())
    records = [EventRecord.from_row(row) for row in events.select(EVENTS.schema.names).to_pylist()]
    parts: list[pa.Table] = []
    for view in views:
        # Users who opted out keep no behaviour features; their events still count elsewhere.
        silent = opted_out if view.entity is EntityType.USER else set()
        keys = [None if r.user_id in silent else view.entity_key(r, infos.get(r.item_id)) for r in records]
        key = pa.array(keys, type=pa.string())
        mask = pc.is_valid(key)
        if entity_ids is not None:
            mask = pc.and_(mask, pc.is_in(key, value_set=entity_ids))
        routed = events.filter(mask)
        parts.append(
            routed.append_column(
                VIEW, pa.array([view.name] * routed.num_rows, type=pa.string())
            ).append_column(ENTITY_ID, key.filter(mask))
        )
    return pa.concat_tables([part.cast(schema) for part in parts])


# -- per entity: the fold ----------------------------------------------------------------------


def fold_entity(group: pa.Table, *, view: FeatureView, as_of: datetime, params: FeatureParams) -> pa.Table:
    """Fold one entity's events with ``view.update`` and serve the state as of ``as_of``.

    Args:
        group: The entity's events in :func:`routed_schema` (or any table with the event
            columns, the ``item:*`` columns and ``entity_id``), all with the same ``entity_id``,
            in any order; repeats of an ``event_id`` count once.
        view: The view.
        as_of: The serving instant.
        params: Fold constants; must equal the online store's.

    Returns:
        One row of :func:`feature_schema` (none for an empty group).

    Raises:
        ValueError: The group holds several entities.
    """
    schema = feature_schema(view)
    if group.num_rows == 0:
        return schema.empty_table()
    entity_ids = set(group.column(ENTITY_ID).to_pylist())
    if len(entity_ids) != 1:
        raise ValueError(f"{view.name}: a group must hold one entity, got {sorted(entity_ids)[:5]}")
    first_seen: dict[str, EventRecord] = {}
    for event in group.select(EVENTS.schema.names).to_pylist():
        record = EventRecord.from_row(event)
        first_seen.setdefault(record.event_id, record)
    infos = _item_infos(group)
    state: State = view.update({}, list(first_seen.values()), infos, params)
    at = _utc(as_of)
    values = view.serve(state, at, params)
    row: dict[str, Any] = {ENTITY_ID: entity_ids.pop()}
    for spec in view.specs:
        row[spec.ref] = encode_value(spec, values[spec.name])
    row[UPDATED_AT] = at
    row[STATE_JSON] = _dumps(state)
    return pa.Table.from_pylist([row], schema=schema)


PACKED_SCHEMA: Final = pa.schema(
    [
        pa.field(VIEW, pa.string(), nullable=False),
        pa.field(ENTITY_ID, pa.string(), nullable=False),
        pa.field(UPDATED_AT, TS, nullable=False),
        pa.field(STATE_JSON, pa.string(), nullable=False),
        pa.field(VALUES_JSON, pa.string(), nullable=False),
    ]
)
"""What :func:`fold_group` returns for any view: the feature columns packed into one JSON object.

Every view goes through one shuffle, and the blocks of one dataset need one schema, so the
per-view columns are packed here and unpacked per view by :func:`unpack_view`."""


def fold_group(
    group: pa.Table, *, views: Sequence[FeatureView], as_of: datetime, params: FeatureParams
) -> pa.Table:
    """The ``map_groups`` function: :func:`fold_entity` for the group's view, packed.

    Args:
        group: Rows of :func:`routed_schema` of one ``(view, entity_id)``.
        views: The views that may appear.
        as_of: The serving instant.
        params: Fold constants.

    Returns:
        One row of :data:`PACKED_SCHEMA`.

    Raises:
        ValueError: The group holds several views or an unknown one.
    """
    if group.num_rows == 0:
        return PACKED_SCHEMA.empty_table()
    names = set(group.column(VIEW).to_pylist())
    by_name = {v.name: v for v in views}
    if len(names) != 1 or not names <= by_name.keys():
        raise ValueError(f"a group must hold one of the views {sorted(by_name)}, got {sorted(names)}")
    view = by_name[names.pop()]
    row = fold_entity(group, view=view, as_of=as_of, params=params).to_pylist()[0]
    packed = {
        VIEW: view.name,
        ENTITY_ID: row[ENTITY_ID],
        UPDATED_AT: row[UPDATED_AT],
        STATE_JSON: row[STATE_JSON],
        VALUES_JSON: _dumps({ref: row[ref] for ref in view.refs}),
    }
    return pa.Table.from_pylist([packed], schema=PACKED_SCHEMA)


def unpack_view(batch: pa.Table, *, view: FeatureView) -> pa.Table:
    """The rows of one view in a batch of :data:`PACKED_SCHEMA`, as :func:`feature_schema` rows."""
    schema = feature_schema(view)
    rows = batch.filter(pc.equal(batch.column(VIEW), view.name))
    values = [json.loads(raw) for raw in rows.column(VALUES_JSON).to_pylist()]
    columns: list[pa.Array | pa.ChunkedArray] = [rows.column(ENTITY_ID)]
    for spec in view.specs:
        columns.append(pa.array([v[spec.ref] for v in values], type=_ARROW_TYPES[spec.dtype]))
    columns.extend([rows.column(UPDATED_AT), rows.column(STATE_JSON)])
    return pa.Table.from_arrays(columns, schema=schema)


# -- the Ray Data job --------------------------------------------------------------------------


def materialize(
    lake: Lake,
    *,
    as_of: datetime,
    views: Sequence[FeatureView] = VIEWS,
    params: FeatureParams = DEFAULT_PARAMS,
    num_partitions: int = 8,
    entity_ids: Sequence[str] | None = None,
) -> dict[str, ray.data.Dataset]:
    """Compute every entity's features as of ``as_of`` from the lake, with Ray Data.

    The folds run (and their output is materialised in the object store) before this returns,
    since every view's dataset is cut from the same output; unpacking per view stays lazy.

    Args:
        lake: The lake to read ``events``, ``items`` and ``users`` from.
        as_of: The instant features are computed for (timezone-aware; naive is taken as UTC).
            Events stamped after it are ignored.
        views: The views to compute.
        params: Fold constants; must equal the online store's for the values to match.
        num_partitions: Hash partitions of the ``event_id`` and entity shuffles.
        entity_ids: Compute only these entities (of every view given); all when ``None``.

    Returns:
        View name to a dataset of :func:`feature_schema` rows, one per entity, in no order.
    """
    import ray.data

    at = _utc(as_of)
    files = lake.files(EVENTS)
    if not files:
        return {v.name: ray.data.from_arrow(feature_schema(v).empty_table()) for v in views}
    wanted = None if entity_ids is None else pa.array(sorted(set(entity_ids)), type=pa.string())
    route = functools.partial(
        route_events, as_of=at, catalog=CatalogSnapshot.read(lake, at), views=tuple(views), entity_ids=wanted
    )
    folded = (
        lake.ray_dataset(files, EVENTS.schema.names)
        .repartition(num_partitions, keys=["event_id"])
        # batch_size=None hands each hash partition over whole, so all copies of an event meet;
        # fold_entity drops repeats again per entity, which covers identical copies regardless.
        .map_batches(route, batch_format="pyarrow", batch_size=None)
        # One shuffle for every view: the group key names the view as well as the entity.
        .groupby([VIEW, ENTITY_ID], num_partitions=num_partitions)
        .map_groups(
            functools.partial(fold_group, views=tuple(views), as_of=at, params=params),
            batch_format="pyarrow",
        )
        .materialize()
    )
    return {
        view.name: folded.map_batches(functools.partial(unpack_view, view=view), batch_format="pyarrow")
        for view in views
    }


def collect(view: FeatureView, dataset: ray.data.Dataset) -> pa.Table:
    """Bring a view's feature dataset to the driver as one table, sorted by ``entity_id``.

    Args:
        view: The view the dataset was computed for.
        dataset: Its rows (from :func:`materialize`).

    Returns:
        The rows in :func:`feature_schema`.
    """
    import ray

    schema = feature_schema(view)
    tables = [t for t in ray.get(dataset.to_arrow_refs()) if t.num_rows]
    if not tables:
        return schema.empty_table()
    table = pa.concat_tables([t.select(schema.names).cast(schema) for t in tables]).combine_chunks()
    return table.take(pc.sort_indices(table, sort_keys=[(ENTITY_ID, "ascending")]))


def materialize_tables(
    lake: Lake,
    *,
    as_of: datetime,
    views: Sequence[FeatureView] = VIEWS,
    params: FeatureParams = DEFAULT_PARAMS,
    num_partitions: int = 8,
) -> dict[str, pa.Table]:
    """:func:`materialize`, collected: view name to its feature rows sorted by ``entity_id``."""
    datasets = materialize(lake, as_of=as_of, views=views, params=params, num_partitions=num_partitions)
    return {view.name: collect(view, datasets[view.name]) for view in views}


def features_as_of(
    lake: Lake,
    entity_ids: Sequence[str],
    as_of: datetime,
    *,
    entity_type: EntityType = EntityType.USER,
    params: FeatureParams = DEFAULT_PARAMS,
    num_partitions: int = 8,
) -> pa.Table:
    """Point-in-time features of some entities: only events up to ``as_of`` count.

    For training sets: the features a model would have been served at ``as_of``, with no event
    from after it leaking in.

    Args:
        lake: The lake.
        entity_ids: The entities, all of ``entity_type``; repeats allowed.
        as_of: The instant.
        entity_type: Their type; every view of the type is computed.
        params: Fold constants.
        num_partitions: Hash partitions of the shuffles.

    Returns:
        One row per requested id, in order: ``entity_id``, every feature column of the type's
        views (encoded as in :func:`feature_schema`; the spec's default for an entity without
        events) and ``updated_at`` (``as_of``).
    """
    views = views_of(entity_type)
    at = _utc(as_of)
    datasets = materialize(
        lake, as_of=at, views=views, params=params, num_partitions=num_partitions, entity_ids=entity_ids
    )
    requested = pa.array(list(entity_ids), type=pa.string())
    columns: dict[str, pa.Array] = {ENTITY_ID: requested}
    for view in views:
        table = collect(view, datasets[view.name])
        position = pc.index_in(requested, value_set=table.column(ENTITY_ID))
        for spec in view.specs:
            default = pa.scalar(encode_value(spec, spec.default), type=_ARROW_TYPES[spec.dtype])
            taken = table.column(spec.ref).combine_chunks().take(position)
            columns[spec.ref] = pc.fill_null(taken, default)
    columns[UPDATED_AT] = pa.array([at] * len(requested), type=TS)
    return pa.table(columns)


# -- the lake's feature snapshots --------------------------------------------------------------


def snapshot_name(as_of: datetime) -> str:
    """The file name (without ``.parquet``) of the snapshot of one instant: ``as-of-<UTC stamp>``."""
    return f"as-of-{_utc(as_of).strftime(_SNAPSHOT_STAMP)}"


def write_features(lake: Lake, view: FeatureView, rows: pa.Table) -> list[str]:
    """Store a view's feature rows in ``lake/features/<view>/``, atomically per file.

    Rows are grouped into one file per ``updated_at`` instant named by :func:`snapshot_name`, so
    writing the same snapshot again replaces it instead of adding a copy.

    Args:
        lake: The lake.
        view: The view.
        rows: Rows of :func:`feature_schema` (e.g. from :func:`collect`).

    Returns:
        The files written.
    """
    written: list[str] = []
    spec = feature_table(view)
    stamps = pc.unique(rows.column(UPDATED_AT)).to_pylist()
    for stamp in stamps:
        part = rows.filter(pc.equal(rows.column(UPDATED_AT), pa.scalar(stamp, type=TS)))
        written.extend(lake.append(spec, part, name=snapshot_name(stamp)))
    return written


def snapshots(lake: Lake, view: FeatureView) -> list[datetime]:
    """The ``as_of`` instants of a view's stored snapshots, oldest first."""
    found: set[datetime] = set()
    for path in lake.files(feature_table(view)):
        stem = path.rsplit("/", 1)[-1].removesuffix(".parquet")
        match = _SNAPSHOT_NAME_RE.match(stem)
        if match:
            found.add(datetime.strptime(match.group(1), _SNAPSHOT_STAMP).replace(tzinfo=UTC))
    return sorted(found)


def read_features(lake: Lake, view: FeatureView, as_of: datetime | None = None) -> pa.Table:
    """One stored snapshot of a view.

    Args:
        lake: The lake.
        view: The view.
        as_of: Which snapshot; the latest when omitted.

    Returns:
        Its rows sorted by ``entity_id`` (empty when there is none).
    """
    spec = feature_table(view)
    if as_of is None:
        stored = snapshots(lake, view)
        if not stored:
            return spec.schema.empty_table()
        as_of = stored[-1]
    rows = lake.read(spec, filter=pc.field(UPDATED_AT) == pa.scalar(_utc(as_of), type=TS))
    return rows.take(pc.sort_indices(rows, sort_keys=[(ENTITY_ID, "ascending")]))


# -- into the online store ---------------------------------------------------------------------


def _chunks(rows: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def load_online(
    online: OnlineFeatureStore,
    view: FeatureView,
    rows: pa.Table,
    *,
    now: datetime | None = None,
    chunk_size: int = 500,
) -> int:
    """Write offline states into the online store, so a fresh store starts from history.

    Each entity's state replaces the stored one and its serving record is refreshed
    (:meth:`OnlineFeatureStore.write_states`). Users erased online meanwhile are skipped, so a
    backfill never brings an erased user's features back. Run it before the stream processor
    applies events after the snapshot's ``as_of``: states written here overwrite what it applied,
    and no processed-event markers are written for the events the states already hold.

    Args:
        online: The online store.
        view: The view the rows belong to.
        rows: Rows of :func:`feature_schema`.
        now: Instant the serving records are computed for; the store's clock when omitted.
        chunk_size: States per transaction.

    Returns:
        How many states were written.
    """
    ids: list[str] = rows.column(ENTITY_ID).to_pylist()
    states: list[str] = rows.column(STATE_JSON).to_pylist()
    erased: set[str] = set()
    if view.entity is EntityType.USER and ids:
        store = online.store
        with store.guard():
            flags = store.client.smismember(store.keys.erased_users(), ids)
        erased = {uid for uid, flag in zip(ids, flags, strict=True) if flag}
    pairs = [(eid, raw) for eid, raw in zip(ids, states, strict=True) if eid not in erased]
    written = 0
    for part in _chunks(pairs, chunk_size):
        loaded: dict[str, State] = {eid: json.loads(raw) for eid, raw in part}
        written += online.write_states(view, loaded, now)
    if erased:
        logger.info("%s: skipped %d erased users", view.name, len(erased))
    return written
