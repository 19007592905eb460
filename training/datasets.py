"""From the lake to training and evaluation data, with Ray Data.

The steps, in order:

1. **Snapshot** the lake: the visible Parquet files of each table are listed once, and only those
   are read, so a run is reproducible from its manifest even while the lake keeps growing.
2. **Clean events** (Ray Data): read the event files, drop duplicate deliveries of one event
   (a hash shuffle on ``event_id``, then a per-block first-wins pass; measured faster than
   ``groupby("event_id").map_groups``, which calls Python once per event), drop every event of an
   erased user (latest ``users`` row with ``erased=True``), of a user who turned personalisation
   off (latest row with ``personalization=False``: no model learns from or about them until they
   turn it back on) and of a removed item (latest ``items`` row with ``status="removed"``).
3. **Split** for evaluation: evaluation positives go to the driver as integer-coded
   :class:`~training.evaluation.splits.Interactions` and are split by the chosen protocol.
4. **Two-tower positives** (Ray Data): events that pass :class:`PositiveRule` and are not held out
   by the split are grouped per user (``groupby("user_id").map_groups``); within a user, in time
   order, each positive becomes one row with the user's previous ``history_length`` positive items.
   Items are counted (``groupby("item_id").count()``) first: the counts give the item vocabulary
   (items with training positives get an id embedding) and the log-Q sampling probabilities.

The rows of step 4 are self-contained (user profile, history, item content and log-Q are columns),
so a training worker needs nothing but its shard.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from core.lake import Lake
from core.schema import EventType
from training.config import DatasetConfig
from training.encoding import (
    ItemFeatures,
    UserFeatures,
    Vocabularies,
    Vocabulary,
    stable_bucket,
)
from training.evaluation.splits import Interactions, PositiveRule, Split, published_split, temporal_split
from training.registry import DataSnapshot

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]

EVENT_COLUMNS: Final = (
    "event_id",
    "user_id",
    "item_id",
    "event_type",
    "ts",
    "surface",
    "device",
    "request_id",
    "position",
    "watch_time_s",
    "rating",
)
"""Event columns the offline pipeline reads (``region`` and ``context_json`` are not used)."""

SNAPSHOT_TABLES: Final = ("events", "impressions", "items", "users")
_PAIR_SEPARATOR: Final = "\x1f"


@dataclass(frozen=True)
class TrainingPositiveRule:
    """Which events are two-tower positives; evaluation has its own rule (:func:`evaluation_rule`).

    Attributes:
        event_types: Event types that are positive.
        min_watch_s: Seconds a ``watch`` event needs to count.
        min_rating: Rated events reaching this rating are positive whatever their type.
    """

    event_types: frozenset[str]
    min_watch_s: float
    min_rating: float | None = None

    @classmethod
    def from_config(cls, config: DatasetConfig) -> TrainingPositiveRule:
        """The rule a dataset config describes."""
        return cls(
            frozenset(t.value for t in config.positive_event_types),
            config.min_watch_s,
            config.train_min_rating,
        )

    def mask(self, events: pa.Table) -> npt.NDArray[np.bool_]:
        """Flag the positive rows of a batch of events."""
        kinds = events.column("event_type")
        positive = pc.is_in(kinds, value_set=pa.array(sorted(self.event_types), type=pa.string()))
        if EventType.WATCH.value in self.event_types:
            watched = pc.fill_null(pc.greater_equal(events.column("watch_time_s"), self.min_watch_s), False)
            is_watch = pc.equal(kinds, EventType.WATCH.value)
            positive = pc.and_(positive, pc.or_(pc.invert(is_watch), watched))
        if self.min_rating is not None:
            rated = pc.fill_null(pc.greater_equal(events.column("rating"), self.min_rating), False)
            positive = pc.or_(positive.fill_null(False), rated)
        return np.asarray(positive.fill_null(False).to_numpy(zero_copy_only=False), dtype=np.bool_)


def evaluation_rule(config: DatasetConfig) -> PositiveRule:
    """The evaluation positives: rated events by rating, others by the training event types."""
    return PositiveRule(
        min_rating=config.eval_min_rating,
        event_types=frozenset(t.value for t in config.positive_event_types),
    )


@dataclass(frozen=True)
class LakeSnapshot:
    """The visible files of the lake tables a run reads, listed once at its start.

    Attributes:
        files: Sorted file paths per table.
        row_counts: Rows per table, from the Parquet footers of those files.
    """

    files: dict[str, tuple[str, ...]]
    row_counts: dict[str, int]

    @classmethod
    def capture(cls, lake: Lake, tables: Sequence[str] = SNAPSHOT_TABLES) -> LakeSnapshot:
        """List the lake's tables now."""
        files = {table: tuple(lake.files(table)) for table in tables}
        counts = {table: lake.count(table) if files[table] else 0 for table in tables}
        return cls(files=files, row_counts=counts)

    @property
    def sha256(self) -> str:
        """Digest of every listed path, one per line, in table then path order."""
        digest = hashlib.sha256()
        for table in sorted(self.files):
            for path in self.files[table]:
                digest.update(f"{table}\t{path}\n".encode())
        return digest.hexdigest()

    def to_manifest(self, derived_counts: dict[str, int], description: str) -> DataSnapshot:
        """The registry's record of this snapshot, with row counts of derived sets added."""
        return DataSnapshot(
            lake_files_sha256=self.sha256,
            file_counts={table: len(paths) for table, paths in self.files.items()},
            row_counts={**self.row_counts, **derived_counts},
            description=description,
        )


# -- step 2: clean events ---------------------------------------------------------------------


def _first_per_event(batch: pa.Table) -> pa.Table:
    """Keep the first row of each ``event_id`` in a block (all its copies are in this block)."""
    if batch.num_rows == 0:
        return batch
    positions = pa.array(np.arange(batch.num_rows, dtype=np.int64))
    firsts = (
        batch.select(["event_id"])
        .append_column("__row", positions)
        .group_by("event_id", use_threads=False)
        .aggregate([("__row", "min")])
        .column("__row_min")
    )
    return batch.take(np.sort(np.asarray(firsts.to_numpy(), dtype=np.int64)))


def _drop_erased_and_removed(batch: pa.Table, erased_users: pa.Array, removed_items: pa.Array) -> pa.Table:
    keep = pc.and_(
        pc.invert(pc.is_in(batch.column("user_id"), value_set=erased_users)),
        pc.invert(pc.is_in(batch.column("item_id"), value_set=removed_items)),
    )
    return batch.filter(keep)


def read_clean_events(
    lake: Lake,
    files: Sequence[str],
    config: DatasetConfig,
    *,
    erased_users: Sequence[str],
    removed_items: Sequence[str],
) -> ray.data.Dataset:
    """Events de-duplicated by ``event_id``, without erased users and removed items (lazy).

    Args:
        lake: The lake (for its filesystem).
        files: Event files to read (from a :class:`LakeSnapshot`).
        config: Read parallelism and shuffle partitions.
        erased_users: Ids of users whose events must not be used.
        removed_items: Ids of items whose events must not be used.

    Returns:
        A Ray dataset with :data:`EVENT_COLUMNS`.
    """
    assert files, "no event files to read: the lake's events table is empty"
    events = lake.ray_dataset(files, EVENT_COLUMNS, blocks=config.read_blocks)
    clean = functools.partial(
        _clean_block,
        erased_users=pa.array(sorted(erased_users), type=pa.string()),
        removed_items=pa.array(sorted(removed_items), type=pa.string()),
    )
    # batch_size=None hands each hash partition over whole, so every copy of an event is in one call.
    return events.repartition(config.dedupe_partitions, keys=["event_id"]).map_batches(
        clean, batch_format="pyarrow", batch_size=None
    )


def _clean_block(batch: pa.Table, erased_users: pa.Array, removed_items: pa.Array) -> pa.Table:
    return _drop_erased_and_removed(_first_per_event(batch), erased_users, removed_items)


def to_arrow(dataset: ray.data.Dataset, columns: Sequence[str] | None = None) -> pa.Table:
    """Collect a (small) Ray dataset on the driver as one Arrow table."""
    import ray

    selected = dataset.select_columns(list(columns)) if columns is not None else dataset
    tables = [t for t in ray.get(selected.to_arrow_refs()) if t.num_rows]
    if not tables:
        empty: pa.Table = selected.schema().base_schema.empty_table()
        return empty
    return pa.concat_tables(tables).combine_chunks()


# -- step 3: evaluation split -----------------------------------------------------------------


def evaluation_events(events: pa.Table, config: DatasetConfig) -> pa.Table:
    """Events that may be evaluation positives: short watches are dropped, as in training."""
    if EventType.WATCH.value not in {t.value for t in config.positive_event_types}:
        return events
    short_watch = pc.and_(
        pc.equal(events.column("event_type"), EventType.WATCH.value),
        pc.fill_null(pc.less(events.column("watch_time_s"), config.min_watch_s), True),
    )
    return events.filter(pc.invert(short_watch))


def make_split(events: pa.Table, config: DatasetConfig) -> Split:
    """Evaluation positives of the cleaned events, split by the configured protocol.

    Args:
        events: Cleaned events on the driver (``user_id``, ``item_id``, ``event_type``, ``ts``,
            ``rating``, ``watch_time_s``).
        config: Positive rule and protocol.

    Returns:
        The split.
    """
    interactions = Interactions.from_events(evaluation_events(events, config), evaluation_rule(config))
    if config.protocol == "published":
        return published_split(interactions, seed=config.split_seed)
    return temporal_split(interactions)


def held_out_pairs(split: Split) -> pa.Array:
    """``user<US>item`` keys of the validation and test pairs, which training must not see."""
    keys: list[str] = []
    for part in (split.valid, split.test):
        users = part.user_ids[part.user_index]
        items = part.item_ids[part.item_index]
        keys.extend(np.char.add(np.char.add(users, _PAIR_SEPARATOR), items).tolist())
    return pa.array(sorted(set(keys)), type=pa.string())


def training_cutoff_us(split: Split) -> int | None:
    """First instant training must not see: validation start of a temporal split, else none."""
    cutoffs = split.metadata["cutoffs"]
    if split.metadata["protocol"] == "temporal" and cutoffs is not None:
        return int(cutoffs["valid_start_us"])
    return None


# -- step 4: two-tower positives ----------------------------------------------------------------


def _train_positive_block(
    batch: pa.Table, rule: TrainingPositiveRule, held_out: pa.Array, cutoff_us: int | None
) -> pa.Table:
    keep = pa.array(rule.mask(batch))
    pairs = pc.binary_join_element_wise(batch.column("user_id"), batch.column("item_id"), _PAIR_SEPARATOR)
    keep = pc.and_(keep, pc.invert(pc.is_in(pairs, value_set=held_out)))
    if cutoff_us is not None:
        ts_us = pc.cast(batch.column("ts"), pa.int64())
        keep = pc.and_(keep, pc.less(ts_us, cutoff_us))
    return batch.filter(keep).select(["event_id", "user_id", "item_id", "ts", "surface", "device"])


def train_positive_events(events: ray.data.Dataset, config: DatasetConfig, split: Split) -> ray.data.Dataset:
    """Training positives (lazy).

    The rule's events, without held-out pairs and, for a temporal split, without anything at or
    after the validation start.
    """
    select = functools.partial(
        _train_positive_block,
        rule=TrainingPositiveRule.from_config(config),
        held_out=held_out_pairs(split),
        cutoff_us=training_cutoff_us(split),
    )
    return events.map_batches(select, batch_format="pyarrow", batch_size=None)


@dataclass(frozen=True, eq=False)
class HistoryEncoder:
    """Turns one user's positive events into two-tower rows (the ``map_groups`` function).

    Attributes:
        vocabularies: Encoding of ids and content.
        items: Encoded catalog, to look up each positive item's content.
        users: Encoded profiles of known users.
        log_q: Log sampling probability per item vocabulary index (index 0 unused).
    """

    vocabularies: Vocabularies
    items: ItemFeatures
    users: UserFeatures
    log_q: FloatArray
    _item_rows: pa.Array = field(init=False, repr=False)
    _user_rows: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_item_rows", pa.array(self.items.item_ids.tolist(), type=pa.string()))
        object.__setattr__(self, "_user_rows", {u: i for i, u in enumerate(self.users.user_ids.tolist())})

    def __call__(self, group: pa.Table) -> dict[str, npt.NDArray[Any]]:
        """Encode one user's positives, in time order, each with the items before it.

        Args:
            group: The user's positive events (``event_id``, ``user_id``, ``item_id``, ``ts``,
                ``surface``, ``device``).

        Returns:
            Numpy columns: ``user_id``, ``user_index``, profile columns, ``history`` (rows by
            ``history_length``, most recent first, 0-padded), item columns, ``log_q``, ``ts_us``,
            and the context of the event (``surface``, ``device``).
        """
        ordered = group.sort_by([("ts", "ascending"), ("event_id", "ascending")])
        item_ids = np.asarray(ordered.column("item_id").to_pylist(), dtype=np.str_)
        # A repeat positive on the same item adds nothing and would let the item predict itself.
        _, first = np.unique(item_ids, return_index=True)
        rows = np.sort(first)
        item_ids = item_ids[rows]
        ts_us = np.asarray(ordered.column("ts").cast(pa.int64()).to_numpy(), dtype=np.int64)[rows]
        surface = self.vocabularies.surface.lookup(ordered.column("surface").take(pa.array(rows)))
        device = self.vocabularies.device.lookup(ordered.column("device").take(pa.array(rows)))
        n_rows = len(rows)
        item_index = self.vocabularies.item.lookup(item_ids)

        width = self.vocabularies.history_length
        padded = np.concatenate([np.zeros(width, dtype=np.int64), item_index])
        # Row j's history is items j-1, j-2, … (most recent first): a reversed sliding window.
        windows = np.lib.stride_tricks.sliding_window_view(padded, width)[:n_rows]
        history = np.ascontiguousarray(windows[:, ::-1])

        user_id = str(ordered.column("user_id")[0].as_py())
        user_row = self._user_rows.get(user_id)
        profile = self._profile(user_id, user_row)

        catalog_rows = pc.index_in(pa.array(item_ids.tolist(), type=pa.string()), value_set=self._item_rows)
        positions = np.asarray(catalog_rows.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)
        known = positions >= 0
        safe = np.where(known, positions, 0)
        content = {
            name: np.where(known if values.ndim == 1 else known[:, None], values[safe], 0)
            for name, values in (
                ("item_type", self.items.item_type),
                ("category", self.items.category),
                ("tags", self.items.tags),
                ("creator", self.items.creator),
            )
        }
        floor = float(self.log_q[1:].min()) if len(self.log_q) > 1 else 0.0
        log_q = np.where(item_index > 0, self.log_q[item_index], floor).astype(np.float32)
        return {
            "user_id": np.full(n_rows, user_id),
            "user_index": np.full(n_rows, self.vocabularies.user.index(user_id), dtype=np.int64),
            **{name: np.full(n_rows, value, dtype=np.int64) for name, value in profile.items()},
            "history": history,
            "item_index": item_index,
            **content,
            "log_q": log_q,
            "ts_us": ts_us,
            "surface": surface,
            "device": device,
        }

    def _profile(self, user_id: str, row: int | None) -> dict[str, int]:
        if row is None:
            return {
                "user_bucket": int(stable_bucket([user_id], self.vocabularies.user_buckets)[0]),
                "age_group": 0,
                "region": 0,
                "language": 0,
            }
        return {name: int(values[row]) for name, values in self.users.arrays().items()}


def encode_user_positives(group: pa.Table, encoder: HistoryEncoder) -> dict[str, npt.NDArray[Any]]:
    """The ``map_groups`` function: one user's positives through ``encoder``."""
    return encoder(group)


def item_log_q(counts: IntArray) -> FloatArray:
    """Log in-batch sampling probability of each item, from its count of training positives.

    A batch is a uniform sample of positives, so an item appears as a negative in proportion to its
    count. Index 0 (unknown) gets the rarest item's value rather than ``-inf``.

    Args:
        counts: Positives per item vocabulary index (index 0 = unknown).

    Returns:
        ``log(count / total)`` per index, float32.
    """
    total = max(int(counts.sum()), 1)
    floor = max(int(counts[1:].min()) if len(counts) > 1 else 1, 1)
    return np.log(np.maximum(counts, floor) / total).astype(np.float32)


@dataclass
class TrainingData:
    """Everything the trainers and the evaluation read, produced by :func:`build_training_data`.

    Attributes:
        snapshot: The lake files read.
        vocabularies: Encodings the models are trained with.
        items: Encoded catalog of active items (what serving embeds and ranks).
        users: Encoded profiles of active users.
        user_table: Latest rows of the active users (raw profile strings), for request-time encoding.
        events: Cleaned events (materialised Ray dataset), for the ranker.
        event_table: The columns of the cleaned events the driver needs (evaluation, ranker labels
            and item statistics), in no particular order.
        positives: Two-tower rows (materialised Ray dataset).
        item_counts: Training positives per item vocabulary index.
        split: Evaluation split (its own integer coding; map through ids).
        user_history: ``(len(vocabularies.user), history_length)`` most recent training positives
            of every user, most recent first: the history a request for that user would carry.
        row_counts: Sizes of derived sets, for the manifest.
    """

    snapshot: LakeSnapshot
    vocabularies: Vocabularies
    items: ItemFeatures
    users: UserFeatures
    user_table: pa.Table
    events: ray.data.Dataset
    event_table: pa.Table
    positives: ray.data.Dataset
    item_counts: IntArray
    split: Split
    user_history: IntArray
    row_counts: dict[str, int]

    def data_snapshot(self, description: str) -> DataSnapshot:
        """The registry's record of the data."""
        return self.snapshot.to_manifest(self.row_counts, description)

    def profiles(self, user_ids: Sequence[str]) -> list[dict[str, str | None]]:
        """Raw profile fields (``age_group``, ``region``, ``language``) of users; empty when unknown."""
        columns = ("age_group", "region", "language")
        rows = self.user_table.select(["user_id", *columns]).to_pylist()
        by_id = {row["user_id"]: {name: row[name] for name in columns} for row in rows}
        return [by_id.get(user_id, {}) for user_id in user_ids]

    def history_ids(self, user_ids: Sequence[str]) -> list[list[str]]:
        """Each user's training-time history as item ids, most recent first."""
        values = np.asarray(("", *self.vocabularies.item.values), dtype=np.str_)
        matrix = self.user_history[self.vocabularies.user.lookup(list(user_ids))]
        return [[str(values[i]) for i in row if i > 0] for row in matrix]

    def _user_positions(self, user_ids: Sequence[str]) -> IntArray:
        """Row of each user in :attr:`users`, -1 for users it does not hold."""
        rows = {u: i for i, u in enumerate(self.users.user_ids.tolist())}
        return np.asarray([rows.get(u, -1) for u in user_ids], dtype=np.int64)

    def user_interests(self, user_ids: Sequence[str]) -> IntArray:
        """Each user's onboarding interests as ``category`` indices, 0-padded (zeros when unknown)."""
        positions = self._user_positions(user_ids)
        out = np.zeros((len(positions), self.users.interests.shape[1]), dtype=np.int64)
        known = positions >= 0
        out[known] = self.users.interests[positions[known]]
        return out

    def interests_by_index(self) -> IntArray:
        """:meth:`user_interests` of every ``user`` vocabulary index (row 0, unknown, has none)."""
        values = list(self.vocabularies.user.values)
        table = np.zeros((len(values) + 1, self.users.interests.shape[1]), dtype=np.int64)
        table[1:] = self.user_interests(values)
        return table

    def user_inputs(self, user_ids: Sequence[str]) -> dict[str, IntArray]:
        """The user tower's inputs for known or unknown users, with their training-time history.

        Args:
            user_ids: User ids.

        Returns:
            Columns ``user_bucket``, ``history``, ``age_group``, ``region``, ``language``.
        """
        positions = self._user_positions(user_ids)
        known = positions >= 0
        safe = np.where(known, positions, 0)
        profile = {
            name: np.where(known, values[safe], 0) if len(values) else np.zeros(len(user_ids), np.int64)
            for name, values in self.users.arrays().items()
            if name != "user_bucket"
        }
        return {
            "user_bucket": stable_bucket(user_ids, self.vocabularies.user_buckets),
            "history": self.user_history[self.vocabularies.user.lookup(list(user_ids))],
            **profile,
        }


def _vocabularies(
    config: DatasetConfig,
    items: pa.Table,
    users: pa.Table,
    events: pa.Table,
    item_counts: dict[str, int],
) -> Vocabularies:
    tags = pc.list_flatten(items.column("tags")) if items.num_rows else pa.array([], pa.string())
    user_ids = set(users.column("user_id").to_pylist()) | set(events.column("user_id").to_pylist())
    return Vocabularies(
        item=Vocabulary("item", tuple(sorted(item_counts))),
        user=Vocabulary("user", tuple(sorted(user_ids))),
        item_type=Vocabulary.build("item_type", items.column("item_type").to_pylist()),
        category=Vocabulary.build("category", items.column("category").to_pylist()),
        tag=Vocabulary.build("tag", tags.to_pylist()),
        creator=Vocabulary.build("creator", items.column("creator_id").to_pylist()),
        age_group=Vocabulary.build("age_group", users.column("age_group").to_pylist()),
        region=Vocabulary.build("region", users.column("region").to_pylist()),
        language=Vocabulary.build("language", users.column("language").to_pylist()),
        surface=Vocabulary.build("surface", events.column("surface").to_pylist()),
        device=Vocabulary.build("device", events.column("device").to_pylist()),
        user_buckets=config.user_buckets,
        max_tags=config.max_tags,
        history_length=config.history_length,
    )


def final_histories(positives: pa.Table, n_users: int, width: int) -> IntArray:
    """The most recent ``width`` positive items of every user vocabulary index.

    Args:
        positives: Two-tower rows with ``user_index``, ``item_index`` and ``ts_us``.
        n_users: Size of the user vocabulary.
        width: History length.

    Returns:
        ``(n_users, width)`` item indices, most recent first, 0-padded.
    """
    histories = np.zeros((n_users, width), dtype=np.int64)
    if positives.num_rows == 0:
        return histories
    users = np.asarray(positives.column("user_index").to_numpy(), dtype=np.int64)
    items = np.asarray(positives.column("item_index").to_numpy(), dtype=np.int64)
    ts_us = np.asarray(positives.column("ts_us").to_numpy(), dtype=np.int64)
    order = np.lexsort((-ts_us, users))
    users, items = users[order], items[order]
    starts = np.searchsorted(users, users, side="left")
    rank = np.arange(len(users)) - starts
    keep = rank < width
    histories[users[keep], rank[keep]] = items[keep]
    return histories


def build_training_data(lake: Lake, config: DatasetConfig) -> TrainingData:
    """Run steps 1-4 of the module docstring.

    Args:
        lake: The lake to read.
        config: Positive rules, split protocol and encoding sizes.

    Returns:
        The training data, with both Ray datasets materialised.

    Raises:
        ValueError: The lake holds no events, or no training positives survive cleaning.
    """
    snapshot = LakeSnapshot.capture(lake)
    if not snapshot.files["events"]:
        raise ValueError(f"the lake at {lake.root} holds no events; import or generate data first")
    items_latest = lake.read_latest("items")
    users_latest = lake.read_latest("users")
    removed = pc.equal(items_latest.column("status"), "removed")
    # An opted-out user is left out like an erased one: training on their events would build the
    # very profile of them that they asked not to have.
    excluded = pc.or_(users_latest.column("erased"), pc.invert(users_latest.column("personalization")))
    removed_items = items_latest.filter(removed).column("item_id").to_pylist()
    excluded_users = users_latest.filter(excluded).column("user_id").to_pylist()
    catalog = items_latest.filter(pc.invert(removed))
    active_users = users_latest.filter(pc.invert(excluded))

    events = read_clean_events(
        lake, snapshot.files["events"], config, erased_users=excluded_users, removed_items=removed_items
    ).materialize()
    driver_events = to_arrow(
        events, ["user_id", "item_id", "event_type", "ts", "rating", "watch_time_s", "surface", "device"]
    )
    split = make_split(driver_events, config)

    train_events = train_positive_events(events, config, split).materialize()
    counts_table = to_arrow(train_events.groupby("item_id", num_partitions=config.dedupe_partitions).count())
    if counts_table.num_rows == 0:
        raise ValueError("no training positives: check DatasetConfig.positive_event_types against the events")
    counted_ids = counts_table.column("item_id").to_pylist()
    item_counts = dict(zip(counted_ids, counts_table.column("count()").to_pylist(), strict=True))
    vocabularies = _vocabularies(config, catalog, active_users, driver_events, item_counts)
    counts = np.zeros(len(vocabularies.item), dtype=np.int64)
    counts[vocabularies.item.lookup(list(item_counts))] = list(item_counts.values())
    items = ItemFeatures.from_table(catalog, vocabularies)
    users = UserFeatures.from_table(active_users, vocabularies)

    encoder = HistoryEncoder(vocabularies=vocabularies, items=items, users=users, log_q=item_log_q(counts))
    positives = (
        train_events.groupby("user_id", num_partitions=config.dedupe_partitions)
        .map_groups(functools.partial(encode_user_positives, encoder=encoder), batch_format="pyarrow")
        # Rows leave map_groups grouped by user; batches of one user's rows would make that user's
        # items each other's negatives, so the order is randomised once here.
        .random_shuffle(seed=config.split_seed)
        .materialize()
    )
    history_columns = to_arrow(positives, ["user_index", "item_index", "ts_us"])
    user_history = final_histories(history_columns, len(vocabularies.user), config.history_length)
    row_counts = {
        "clean_events": int(driver_events.num_rows),
        "train_positive_events": int(train_events.count()),
        "two_tower_rows": int(history_columns.num_rows),
        "catalog_items": len(items),
        "active_users": len(users),
        "item_vocabulary": len(vocabularies.item) - 1,
        **{f"split_{k}": int(v) for k, v in split.metadata["sizes"].items()},
    }
    logger.info("training data: %s", row_counts)
    return TrainingData(
        snapshot=snapshot,
        vocabularies=vocabularies,
        items=items,
        users=users,
        user_table=active_users,
        events=events,
        event_table=driver_events,
        positives=positives,
        item_counts=counts,
        split=split,
        user_history=user_history,
        row_counts=row_counts,
    )
