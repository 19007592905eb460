"""Training the multi-task ranker: examples from the lake, a Ray Train loop, AUC per head.

Examples come from one of two sources:

* **Logged impressions** (when the lake has any): each served item is an example; its labels are
  the events of that user on that item within ``impression_window_s`` after it was served. The
  user's history is taken as of the serving time, so no example sees its own future.
* **Positives and sampled negatives** (otherwise): each two-tower positive is an example, with
  ``negatives_per_positive`` items sharing its user, history and context, drawn in proportion to
  popularity^0.75 and, for a ``hard_negative_share`` of them, from the user's two-tower top-K.
  Labels of every (user, item) pair come from the pair's training events, so a sampled
  "negative" the user did engage with keeps its true labels.

Either way, examples of held-out evaluation pairs are dropped, and examples are built on the driver
with numpy (the heavy lifting, embedding and features, is batched), then handed to Ray Train as a
Ray dataset. A fixed 10 % of users is kept out for validation: the AUC of each head is computed on
their examples.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import torch
from torch import Tensor

from core.lake import Lake
from core.schema import EventType
from training.config import RankerConfig
from training.datasets import TrainingData, held_out_pairs
from training.encoding import UNKNOWN
from training.evaluation.metrics import auc
from training.ranker import (
    BINARY_HEADS,
    DENSE_FEATURES,
    LABELS,
    RANKER_INPUTS,
    ItemStats,
    ListwiseTask,
    MultiTaskRanker,
    MultiTaskTask,
    RankerFeatureBuilder,
    RankerSizes,
    hour_of_day,
)
from training.two_tower import TwoTowerServing

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]

CLICK_EVENTS: Final = frozenset(
    {EventType.CLICK.value, EventType.LIKE.value, EventType.SHARE.value, EventType.PURCHASE.value}
)
"""Events that imply the item was clicked (a like or purchase is only possible after opening it)."""

CHECKPOINT_FILE: Final = "ranker.pt"
VALIDATION_SHARE: Final = 0.1
_EMBED_BATCH = 8192


@dataclass(frozen=True, eq=False)
class RankerExamples:
    """Ranker training examples as numpy columns.

    Attributes:
        inputs: Columns named as :data:`~training.ranker.RANKER_INPUTS`.
        labels: Columns named as :data:`~training.ranker.LABELS`.
        user_index: User vocabulary index of each example (for the user-level validation split).
        source: ``impressions``, ``sampled`` or ``lists`` (out-of-fold candidate lists).
        list_size: For ``lists``: rows come in consecutive lists of this many (padding rows
            have ``labels["mask"] == 0``), and every list belongs to one user.
    """

    inputs: dict[str, npt.NDArray[Any]]
    labels: dict[str, npt.NDArray[Any]]
    user_index: IntArray
    source: Literal["impressions", "sampled", "lists"]
    list_size: int | None = None

    def __len__(self) -> int:
        return len(self.user_index)

    def take(self, rows: IntArray | npt.NDArray[np.bool_]) -> RankerExamples:
        """The given rows."""
        return RankerExamples(
            inputs={k: v[rows] for k, v in self.inputs.items()},
            labels={k: v[rows] for k, v in self.labels.items()},
            user_index=self.user_index[rows],
            source=self.source,
            list_size=self.list_size,
        )

    def split_by_user(
        self, share: float = VALIDATION_SHARE, seed: int = 0
    ) -> tuple[RankerExamples, RankerExamples]:
        """``(train, validation)``: every example of a user goes to the same side."""
        users = np.unique(self.user_index)
        rng = np.random.default_rng(seed)
        held = (
            rng.choice(users, max(1, round(share * len(users))), replace=False)
            if len(users) > 1
            else users[:0]
        )
        mask = np.isin(self.user_index, held)
        return self.take(~mask), self.take(mask)

    def positive_rates(self) -> dict[str, float]:
        """Share of positive labels per binary head."""
        real = self.labels["mask"] > 0 if "mask" in self.labels else np.ones(len(self), dtype=bool)
        return {name: float(np.mean(self.labels[name][real])) if real.any() else 0.0 for name in BINARY_HEADS}

    def real(self) -> RankerExamples:
        """The rows that are not list padding, as plain examples."""
        if "mask" not in self.labels:
            return self
        keep = self.labels["mask"] > 0
        return RankerExamples(
            inputs={k: v[keep] for k, v in self.inputs.items()},
            labels={k: v[keep] for k, v in self.labels.items() if k != "mask"},
            user_index=self.user_index[keep],
            source=self.source,
        )

    def to_dataset(self, rows_per_block: int = 65_536) -> ray.data.Dataset:
        """A Ray dataset with one column per input and label (2-D columns as tensor columns)."""
        import ray.data
        from ray.data.extensions import ArrowTensorArray

        columns = {**self.inputs, **self.labels}
        if self.list_size is not None:
            # One dataset row per list, so shuffling and sharding never split a list.
            size = self.list_size
            columns = {name: v.reshape(len(v) // size, size, *v.shape[1:]) for name, v in columns.items()}
            rows_per_block = max(1, rows_per_block // size)
        n_rows = len(next(iter(columns.values())))
        tables = []
        for start in range(0, max(n_rows, 1), rows_per_block):
            chunk = {}
            for name, values in columns.items():
                part = values[start : start + rows_per_block]
                chunk[name] = ArrowTensorArray.from_numpy(part) if part.ndim > 1 else pa.array(part)
            tables.append(pa.table(chunk))
        return ray.data.from_arrow(tables)


# -- labels and item statistics ----------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PairLabels:
    """Labels of every (user, catalog item) pair with training events, for vectorised lookups.

    Attributes:
        n_items: Catalog rows (the key is ``user_index * n_items + row``).
        keys: Sorted pair keys.
        labels: Label columns aligned with ``keys``.
    """

    n_items: int
    keys: IntArray
    labels: dict[str, npt.NDArray[Any]]

    def lookup(self, user_index: IntArray, rows: IntArray) -> dict[str, npt.NDArray[Any]]:
        """Labels of the given pairs (zeros for pairs without events)."""
        out = {name: np.zeros(len(user_index), dtype=values.dtype) for name, values in self.labels.items()}
        if len(self.keys) == 0:
            return out
        wanted = user_index * self.n_items + rows
        at = np.minimum(np.searchsorted(self.keys, wanted), len(self.keys) - 1)
        found = self.keys[at] == wanted
        for name, values in self.labels.items():
            out[name][found] = values[at[found]]
        return out


def _event_keys(data: TrainingData, events: pa.Table) -> tuple[IntArray, IntArray, IntArray]:
    users = data.vocabularies.user.lookup(events.column("user_id"))
    rows = data.items.positions(events.column("item_id").combine_chunks())
    return users, rows, users * len(data.items) + rows


def pair_labels(data: TrainingData, *, min_watch_s: float) -> PairLabels:
    """Aggregate each (user, item) pair's training events into ranker labels.

    Held-out evaluation pairs are left out, so their events never become labels.

    Args:
        data: Training data (cleaned events, vocabularies, split).
        min_watch_s: Watches shorter than this do not count as a click.

    Returns:
        Pair labels: ``click`` (clicked, liked, shared, bought, or watched long enough), ``like``,
        ``purchase`` (0/1 floats) and ``watch_log1p`` (``log1p`` of the seconds watched in all).
    """
    events = data.event_table
    pairs = pc.binary_join_element_wise(events.column("user_id"), events.column("item_id"), "\x1f")
    events = events.filter(pc.invert(pc.is_in(pairs, value_set=held_out_pairs(data.split))))
    users, rows, keys = _event_keys(data, events)
    kinds = np.asarray(events.column("event_type").to_pylist(), dtype=np.str_)
    watch = np.nan_to_num(
        np.asarray(events.column("watch_time_s").to_numpy(zero_copy_only=False), dtype=np.float64)
    )
    valid = (users > 0) & (rows >= 0)
    keys, kinds, watch = keys[valid], kinds[valid], watch[valid]
    unique, inverse = np.unique(keys, return_inverse=True)

    def any_of(flags: npt.NDArray[np.bool_]) -> FloatArray:
        return (np.bincount(inverse, weights=flags.astype(np.float64), minlength=len(unique)) > 0).astype(
            np.float32
        )

    is_watch = kinds == EventType.WATCH.value
    clicked = np.isin(kinds, sorted(CLICK_EVENTS)) | (is_watch & (watch >= min_watch_s))
    seconds = np.bincount(inverse, weights=np.where(is_watch, watch, 0.0), minlength=len(unique))
    return PairLabels(
        n_items=len(data.items),
        keys=unique.astype(np.int64),
        labels={
            "click": any_of(clicked),
            "like": any_of(kinds == EventType.LIKE.value),
            "purchase": any_of(kinds == EventType.PURCHASE.value),
            "watch_log1p": np.log1p(seconds).astype(np.float32),
        },
    )


def item_statistics(data: TrainingData, exclude_keys: IntArray | None = None) -> ItemStats:
    """Popularity, CTR and like rate of every catalog item from the training events.

    Events of held-out evaluation pairs (validation and test) never count: a rate that saw them
    would carry the answers into the ranker's features. Exposures are ``view`` events, or clicks
    where an item has more clicks than views (sources that log no views), so a rate never exceeds
    one.

    Args:
        data: Training data.
        exclude_keys: Further ``user_index * catalog_size + row`` pairs whose events do not count
            (the held-out fold of the listwise lists), sorted.

    Returns:
        The statistics, aligned with the catalog rows.
    """
    events = data.event_table
    pairs = pc.binary_join_element_wise(events.column("user_id"), events.column("item_id"), "\x1f")
    events = events.filter(pc.invert(pc.is_in(pairs, value_set=held_out_pairs(data.split))))
    rows = data.items.positions(events.column("item_id").combine_chunks())
    kinds = np.asarray(events.column("event_type").to_pylist(), dtype=np.str_)
    n_items = len(data.items)
    known = rows >= 0

    def count(kind: str) -> IntArray:
        mask = known & (kinds == kind)
        return np.bincount(rows[mask], minlength=n_items).astype(np.int64)

    if exclude_keys is not None and len(exclude_keys):
        users = data.vocabularies.user.lookup(events.column("user_id"))
        keys = users * n_items + rows
        at = np.minimum(np.searchsorted(exclude_keys, keys), len(exclude_keys) - 1)
        known &= exclude_keys[at] != keys

    clicks = count(EventType.CLICK.value)
    views = np.maximum(count(EventType.VIEW.value), clicks)
    positives = np.zeros(n_items, dtype=np.int64)
    with_id = data.items.id_index > 0
    positives[with_id] = data.item_counts[data.items.id_index[with_id]]
    if exclude_keys is not None and len(exclude_keys):
        positives = np.maximum(positives - np.bincount(exclude_keys % n_items, minlength=n_items), 0)
    creator = data.items.creator
    n_creators = int(creator.max(initial=0)) + 1

    def per_creator(counts: IntArray) -> IntArray:
        # An item whose creator is unknown pools with nobody: its creator rate is its own.
        pooled = np.bincount(creator, weights=counts, minlength=n_creators).astype(np.int64)[creator]
        return np.where(creator > UNKNOWN, pooled, counts)

    return ItemStats.from_counts(
        data.items.item_ids,
        positives,
        views,
        clicks,
        count(EventType.LIKE.value),
        per_creator(views),
        per_creator(clicks),
    )


def counts_before(event_rows: IntArray, event_ts: IntArray, rows: IntArray, ts_us: IntArray) -> IntArray:
    """How many of the events fall on each queried catalog row strictly before each queried time.

    Args:
        event_rows: Catalog row of each event.
        event_ts: Time of each event.
        rows: Queried rows.
        ts_us: Queried times.

    Returns:
        One count per query.
    """
    order = np.lexsort((event_ts, event_rows))
    event_rows, event_ts = event_rows[order], event_ts[order]
    # Ranks of all timestamps in one ordering let (row, time) pairs be compared as one integer.
    all_times = np.unique(np.concatenate([event_ts, ts_us]))
    scale = len(all_times) + 1
    combined = event_rows * scale + np.searchsorted(all_times, event_ts)
    query = rows * scale + np.searchsorted(all_times, ts_us)
    start = np.searchsorted(event_rows, rows, side="left")
    return (np.searchsorted(combined, query, side="left") - start).astype(np.int64)


def item_statistics_at(
    data: TrainingData,
    positives: Mapping[str, IntArray],
    rows: IntArray,
    ts_us: IntArray,
) -> ItemStats:
    """The statistics of :func:`item_statistics` as they stood when each impression was served.

    An impression's own outcome, and everything after it, must not reach its features: computed
    from all training events, an item's CTR and popularity contain the very clicks the ranker is
    asked to predict, so training finds them far more telling than they are for a fresh request,
    where they hold only the past.

    Args:
        data: Training data.
        positives: Two-tower rows as numpy columns (``item_index``, ``ts_us``).
        rows: Catalog row of each impression.
        ts_us: When each impression was served.

    Returns:
        One entry per impression (not per catalog row), in the order given.
    """
    events = data.event_table
    pairs = pc.binary_join_element_wise(events.column("user_id"), events.column("item_id"), "\x1f")
    events = events.filter(pc.invert(pc.is_in(pairs, value_set=held_out_pairs(data.split))))
    event_rows = data.items.positions(events.column("item_id").combine_chunks())
    event_ts = np.asarray(events.column("ts").cast(pa.int64()).to_numpy(), dtype=np.int64)
    kinds = np.asarray(events.column("event_type").to_pylist(), dtype=np.str_)
    known = event_rows >= 0
    # Creators are counted like items: the same ordering, keyed by the creator's index.
    event_creators = data.items.creator[np.maximum(event_rows, 0)]
    creators = data.items.creator[rows]

    def count(kind: str) -> IntArray:
        mask = known & (kinds == kind)
        return counts_before(event_rows[mask], event_ts[mask], rows, ts_us)

    def count_creator(kind: str, own: IntArray) -> IntArray:
        mask = known & (kinds == kind)
        pooled = counts_before(event_creators[mask], event_ts[mask], creators, ts_us)
        # An item whose creator is unknown pools with nobody (as in item_statistics): its own count.
        return np.where(creators > UNKNOWN, pooled, own)

    positive_rows = data.items.rows_of_id_index(len(data.vocabularies.item))[positives["item_index"]]
    in_catalog = positive_rows >= 0
    clicks = count(EventType.CLICK.value)
    item_views = count(EventType.VIEW.value)
    creator_clicks = count_creator(EventType.CLICK.value, clicks)
    views = np.maximum(item_views, clicks)
    creator_views = np.maximum(count_creator(EventType.VIEW.value, item_views), creator_clicks)
    return ItemStats.from_counts(
        data.items.item_ids[rows],
        counts_before(positive_rows[in_catalog], positives["ts_us"][in_catalog], rows, ts_us),
        views,
        clicks,
        count(EventType.LIKE.value),
        creator_views,
        creator_clicks,
    )


# -- histories and embeddings ------------------------------------------------------------------


def histories_at(
    positives: Mapping[str, IntArray], user_index: IntArray, ts_us: IntArray, width: int
) -> IntArray:
    """Each user's most recent positives strictly before a time, most recent first.

    Args:
        positives: ``user_index``, ``item_index`` and ``ts_us`` of the two-tower positives.
        user_index: Query users.
        ts_us: Query times.
        width: History length.

    Returns:
        ``(len(user_index), width)`` item indices, 0-padded.
    """
    order = np.lexsort((positives["ts_us"], positives["user_index"]))
    users = positives["user_index"][order]
    items = positives["item_index"][order]
    times = positives["ts_us"][order]
    # Ranks of all timestamps in one ordering let (user, time) pairs be compared as one integer.
    all_times = np.unique(np.concatenate([times, ts_us]))
    scale = len(all_times) + 1
    combined = users * scale + np.searchsorted(all_times, times)
    query = user_index * scale + np.searchsorted(all_times, ts_us)
    end = np.searchsorted(combined, query, side="left")
    start = np.searchsorted(users, user_index, side="left")
    offsets = end[:, None] - 1 - np.arange(width)[None, :]
    valid = offsets >= start[:, None]
    history = np.zeros((len(user_index), width), dtype=np.int64)
    history[valid] = items[offsets[valid]]
    return history


def _user_embeddings(serving: TwoTowerServing, columns: Mapping[str, IntArray]) -> FloatArray:
    n_rows = len(columns["history"])
    out = np.zeros((n_rows, serving.dim), dtype=np.float32)
    for start in range(0, n_rows, _EMBED_BATCH):
        chunk = {name: values[start : start + _EMBED_BATCH] for name, values in columns.items()}
        out[start : start + _EMBED_BATCH] = serving.user_embeddings_encoded(chunk)
    return out


_USER_COLUMNS: Final = ("user_bucket", "history", "age_group", "region", "language")


# -- examples ----------------------------------------------------------------------------------


def held_out_keys(data: TrainingData) -> IntArray:
    """Sorted ``user_index * catalog_size + row`` keys of the validation and test pairs."""
    keys: list[IntArray] = []
    for part in (data.split.valid, data.split.test):
        users = data.vocabularies.user.lookup(part.user_ids[part.user_index].tolist())
        rows = data.items.positions(part.item_ids[part.item_index].tolist())
        keys.append((users * len(data.items) + rows)[(users > 0) & (rows >= 0)])
    return np.unique(np.concatenate(keys)) if keys else np.zeros(0, dtype=np.int64)


def _hard_negatives(
    builder: RankerFeatureBuilder,
    user_embeddings: FloatArray,
    example_user: IntArray,
    count: int,
    pool: int,
    rng: np.random.Generator,
) -> IntArray:
    """``count`` items per example drawn from its user's two-tower top ``pool`` (latest embedding)."""
    users, last = np.unique(example_user[::-1], return_index=True)
    latest = len(example_user) - 1 - last
    depth = min(pool, len(builder.items))
    top = np.zeros((len(users), depth), dtype=np.int64)
    for start in range(0, len(users), 1024):
        scores = user_embeddings[latest[start : start + 1024]] @ builder.item_embeddings.T
        top[start : start + 1024] = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
    slot = np.searchsorted(users, example_user)
    return top[slot[:, None], rng.integers(0, depth, size=(len(example_user), count))]


def sampled_examples(
    data: TrainingData,
    positives: Mapping[str, npt.NDArray[Any]],
    builder: RankerFeatureBuilder,
    serving: TwoTowerServing,
    labels: PairLabels,
    config: RankerConfig,
) -> RankerExamples:
    """Positives plus negatives sharing each positive's user and context.

    Negatives are drawn in proportion to popularity^0.75, and a ``hard_negative_share`` of them from
    the user's two-tower top ``hard_negative_pool``. The sampler never reads the held-out pairs
    (a held-out item drawn as a negative stays a negative, as it would be in production).

    Args:
        data: Training data.
        positives: Two-tower rows as numpy columns (user inputs, ``item_index``, ``ts_us``,
            ``surface``, ``device``, ``user_index``).
        builder: Ranker feature builder.
        serving: Two-tower serving module (user embeddings).
        labels: Pair labels.
        config: Negatives per positive, example cap, seed.

    Returns:
        The examples.
    """
    rng = np.random.default_rng(config.seed)
    rows = builder.rows_of_indices(positives["item_index"])
    keep = np.flatnonzero(rows >= 0)
    cap = max(1, config.max_examples // (1 + config.negatives_per_positive))
    if len(keep) > cap:
        # The most recent positives are the closest to what the ranker will face.
        keep = keep[np.argsort(positives["ts_us"][keep])[-cap:]]
    n_pos = len(keep)
    user_columns = {name: positives[name][keep] for name in _USER_COLUMNS}
    user_embeddings = _user_embeddings(serving, user_columns)
    positive_user = positives["user_index"][keep]

    n_hard = round(config.hard_negative_share * config.negatives_per_positive)
    n_popular = config.negatives_per_positive - n_hard
    popularity = np.exp(builder.stats.log_popularity.astype(np.float64)) - 1.0
    weights = (popularity + 1.0) ** 0.75
    negatives = [rng.choice(len(builder.items), size=(n_pos, n_popular), p=weights / weights.sum())]
    if n_hard:
        negatives.append(
            _hard_negatives(builder, user_embeddings, positive_user, n_hard, config.hard_negative_pool, rng)
        )
    repeat = 1 + config.negatives_per_positive
    candidate_rows = np.concatenate([rows[keep][:, None], *negatives], axis=1).reshape(-1)
    example_of = np.repeat(np.arange(n_pos), repeat)
    user_index = positive_user[example_of]
    is_positive = np.zeros(len(candidate_rows), dtype=bool)
    is_positive[::repeat] = True
    # Negatives are drawn without looking at the held-out pairs: a sampler that skipped them would
    # know the answers, which serving never does, and inflate every offline figure.
    inputs = builder.build(
        user_embeddings[example_of],
        user_columns["history"][example_of],
        candidate_rows,
        positives["surface"][keep][example_of],
        positives["device"][keep][example_of],
        hour_of_day(positives["ts_us"][keep])[example_of],
        interests=data.interests_by_index()[user_index],
        region=user_columns["region"][example_of],
        language=user_columns["language"][example_of],
    )
    example_labels = labels.lookup(user_index, candidate_rows)
    # A training positive is at least a click even when the only event was, say, a long watch.
    example_labels["click"] = np.maximum(example_labels["click"], is_positive.astype(np.float32))
    return RankerExamples(inputs=inputs, labels=example_labels, user_index=user_index, source="sampled")


def impression_examples(
    lake: Lake,
    data: TrainingData,
    positives: Mapping[str, npt.NDArray[Any]],
    builder: RankerFeatureBuilder,
    serving: TwoTowerServing,
    config: RankerConfig,
    *,
    min_watch_s: float,
) -> RankerExamples:
    """Logged impressions joined with the events that followed them.

    Args:
        lake: The lake (for its filesystem).
        data: Training data (its snapshot lists the impression files).
        positives: Two-tower rows as numpy columns (for histories as of serving time).
        builder: Ranker feature builder.
        serving: Two-tower serving module.
        config: Outcome window, example cap.
        min_watch_s: Watches shorter than this do not count as a click.

    Returns:
        The examples (empty when no impression survives cleaning).
    """
    files = list(data.snapshot.files["impressions"])
    impressions = pads.dataset(files, format="parquet", filesystem=lake.filesystem).to_table(
        columns=["user_id", "item_id", "surface", "position", "served_at"]
    )
    pairs = pc.binary_join_element_wise(impressions.column("user_id"), impressions.column("item_id"), "\x1f")
    impressions = impressions.filter(pc.invert(pc.is_in(pairs, value_set=held_out_pairs(data.split))))
    users = data.vocabularies.user.lookup(impressions.column("user_id"))
    rows = data.items.positions(impressions.column("item_id").combine_chunks())
    served = np.asarray(impressions.column("served_at").cast(pa.int64()).to_numpy(), dtype=np.int64)
    keep = np.flatnonzero((users > 0) & (rows >= 0))
    if len(keep) > config.max_examples:
        keep = keep[np.argsort(served[keep])[-config.max_examples :]]
    users, rows, served = users[keep], rows[keep], served[keep]
    surface = data.vocabularies.surface.lookup(impressions.column("surface").take(pa.array(keep)))
    position = np.asarray(impressions.column("position").take(pa.array(keep)).to_numpy(), dtype=np.int64)

    labels = _outcomes(data, users, rows, served, config.impression_window_s, min_watch_s)
    user_ids = np.asarray(data.vocabularies.user.values, dtype=np.str_)[users - 1]
    profile = data.user_inputs(user_ids.tolist())
    profile["history"] = histories_at(positives, users, served, data.vocabularies.history_length)
    inputs = builder.build(
        _user_embeddings(serving, profile),
        profile["history"],
        rows,
        surface,
        np.zeros(len(rows), dtype=np.int64),
        hour_of_day(served),
        interests=data.interests_by_index()[users],
        region=profile["region"],
        language=profile["language"],
    )
    inputs["position"] = position
    stats = item_statistics_at(data, positives, rows, served)
    dense = inputs["dense"]
    for name in ("log_popularity", "ctr", "like_rate", "creator_ctr"):
        dense[:, DENSE_FEATURES.index(name)] = getattr(stats, name)
    # Whether an item has an id embedding, and the item-item table, come from every training
    # positive, the impression's own click included: an item nobody clicked would have neither,
    # and the ranker would learn the labels from them. As they stood at serving time: an id once
    # the item had a positive; the table is left out (held constant, so the model ignores it).
    dense[:, DENSE_FEATURES.index("has_item_id")] = stats.log_popularity > 0
    dense[:, DENSE_FEATURES.index("item_item_max")] = 0.0
    dense[:, DENSE_FEATURES.index("item_item_mean")] = 0.0
    return RankerExamples(inputs=inputs, labels=labels, user_index=users, source="impressions")


def _outcomes(
    data: TrainingData, users: IntArray, rows: IntArray, served: IntArray, window_s: float, min_watch_s: float
) -> dict[str, npt.NDArray[Any]]:
    """Labels of each impression from the same user's events on the item within the window after it."""
    events = data.event_table
    e_users, e_rows, e_keys = _event_keys(data, events)
    e_ts = np.asarray(events.column("ts").cast(pa.int64()).to_numpy(), dtype=np.int64)
    kinds = np.asarray(events.column("event_type").to_pylist(), dtype=np.str_)
    watch = np.nan_to_num(
        np.asarray(events.column("watch_time_s").to_numpy(zero_copy_only=False), dtype=np.float64)
    )
    valid = (e_users > 0) & (e_rows >= 0)
    order = np.lexsort((e_ts[valid], e_keys[valid]))
    e_keys, e_ts, kinds, watch = (
        e_keys[valid][order],
        e_ts[valid][order],
        kinds[valid][order],
        watch[valid][order],
    )
    keys = users * len(data.items) + rows
    first = np.searchsorted(e_keys, keys, side="left")
    last = np.searchsorted(e_keys, keys, side="right")
    window_us = int(window_s * 1e6)
    out = {name: np.zeros(len(keys), dtype=np.float32) for name in LABELS}
    seconds = np.zeros(len(keys))
    for i in np.flatnonzero(last > first):
        span = slice(first[i], last[i])
        inside = (e_ts[span] >= served[i]) & (e_ts[span] <= served[i] + window_us)
        if not inside.any():
            continue
        got, secs = kinds[span][inside], watch[span][inside]
        is_watch = got == EventType.WATCH.value
        out["click"][i] = float(
            np.isin(got, sorted(CLICK_EVENTS)).any() or (is_watch & (secs >= min_watch_s)).any()
        )
        out["like"][i] = float((got == EventType.LIKE.value).any())
        out["purchase"][i] = float((got == EventType.PURCHASE.value).any())
        seconds[i] = float(secs[is_watch].sum())
    out["watch_log1p"] = np.log1p(seconds).astype(np.float32)
    return out


def build_ranker_examples(
    lake: Lake,
    data: TrainingData,
    positives: Mapping[str, npt.NDArray[Any]],
    builder: RankerFeatureBuilder,
    serving: TwoTowerServing,
    config: RankerConfig,
    *,
    min_watch_s: float,
) -> RankerExamples:
    """Impression examples when the lake has impressions, else positives with sampled negatives."""
    if data.snapshot.row_counts["impressions"] > 0:
        examples = impression_examples(
            lake, data, positives, builder, serving, config, min_watch_s=min_watch_s
        )
        if len(examples):
            return examples
        logger.warning("no impression survived cleaning; falling back to sampled negatives")
    labels = pair_labels(data, min_watch_s=min_watch_s)
    return sampled_examples(data, positives, builder, serving, labels, config)


# -- training ----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RankerJob:
    """Everything a ranker training worker needs besides its data shard.

    Attributes:
        config: Model shape and training settings.
        sizes: Input sizes.
        dense: A sample of the training dense features, to fix their standardisation.
        validation: Held-out examples for AUC per head (rank 0 only), or ``None``.
        list_size: Candidates per list when the examples are lists (listwise objective).
        watch_weight: Weight of the watch-time loss of the pointwise task (see
            :func:`watch_loss_weight`).
    """

    config: RankerConfig
    sizes: RankerSizes
    dense: FloatArray
    validation: RankerExamples | None = None
    list_size: int | None = None
    watch_weight: float = 1.0


def _model(job: RankerJob) -> MultiTaskRanker:
    torch.manual_seed(job.config.seed)
    model = MultiTaskRanker(job.config, job.sizes)
    model.set_dense_statistics(job.dense)
    return model


@torch.no_grad()
def head_metrics(
    model: MultiTaskRanker, examples: RankerExamples, *, batch_size: int = 8192
) -> dict[str, float]:
    """AUC of each binary head and RMSE of the watch-time head on a set of examples.

    A head whose labels are all equal has no AUC; it is reported as NaN.
    """
    was_training = model.training
    model.eval()
    outputs: dict[str, list[FloatArray]] = {name: [] for name in (*BINARY_HEADS, "watch_time")}
    try:
        for start in range(0, len(examples), batch_size):
            chunk = {k: v[start : start + batch_size] for k, v in examples.inputs.items()}
            raw = model(_to_tensors(chunk))
            for name in outputs:
                outputs[name].append(raw[name].numpy())
    finally:
        model.train(was_training)
    metrics: dict[str, float] = {}
    for name in BINARY_HEADS:
        labels = examples.labels[name]
        scores = np.concatenate(outputs[name]) if outputs[name] else np.zeros(0, dtype=np.float32)
        metrics[f"auc_{name}"] = auc(labels, scores) if 0 < labels.sum() < len(labels) else math.nan
    predicted = np.concatenate(outputs["watch_time"]) if outputs["watch_time"] else np.zeros(0)
    error = predicted - examples.labels["watch_log1p"]
    metrics["rmse_watch_log1p"] = float(np.sqrt(np.mean(error**2))) if len(error) else math.nan
    return metrics


def _to_tensors(arrays: Mapping[str, npt.NDArray[Any]]) -> dict[str, Tensor]:
    out = {}
    for name, values in arrays.items():
        dtype = torch.int64 if np.issubdtype(values.dtype, np.integer) else torch.float32
        out[name] = torch.as_tensor(np.asarray(values), dtype=dtype)
    return out


def ranker_epoch(
    model: torch.nn.Module,
    task: MultiTaskTask | ListwiseTask,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Mapping[str, Tensor]],
) -> tuple[float, int, int, float]:
    """One pass over ``batches``; returns ``(loss_sum, steps, rows, seconds)``."""
    model.train()
    loss_sum, steps, rows = 0.0, 0, 0
    started = time.perf_counter()
    for batch in batches:
        if "mask" in batch:
            # Lists arrive as (lists, size, ...): scored flat, judged per list.
            shape = batch["mask"].shape
            flat = {name: batch[name].flatten(0, 1) for name in RANKER_INPUTS}
            outputs = {name: value.view(shape) for name, value in model(flat).items()}
            loss, _ = task(outputs, {name: batch[name] for name in (*LABELS, "mask")})
        else:
            outputs = model({name: batch[name] for name in RANKER_INPUTS})
            loss, _ = task(outputs, {name: batch[name] for name in LABELS})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item()
        steps += 1
        rows += int(batch["mask"].sum().item()) if "mask" in batch else len(batch["dense"])
    return loss_sum, steps, rows, time.perf_counter() - started


def watch_loss_weight(watch_log1p: FloatArray) -> float:
    """One over the variance of the watch-time labels (1.0 when they hardly vary).

    The squared error of always predicting the mean is then 1, about a cross-entropy's size.
    """
    variance = float(np.var(watch_log1p)) if len(watch_log1p) else 0.0
    return 1.0 / variance if variance > 1e-3 else 1.0


class _BestEpoch:
    """Early stopping: the epoch with the best validation click AUC and a copy of its weights."""

    def __init__(self, patience: int | None) -> None:
        self.patience = patience
        self.epoch: int | None = None
        self.value = -math.inf
        self.state: dict[str, Tensor] | None = None

    def update(self, epoch: int, value: float, model: torch.nn.Module) -> None:
        """Keep ``model``'s weights when ``value`` beats the best so far (only with a patience)."""
        if self.patience is None or math.isnan(value) or value <= self.value:
            return
        self.epoch, self.value = epoch, value
        self.state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}

    def exhausted(self, epoch: int) -> bool:
        """Whether ``patience`` epochs have passed since the best one."""
        return self.patience is not None and self.epoch is not None and epoch - self.epoch >= self.patience


def ranker_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function of the ranker.

    Args:
        config: ``{"job": RankerJob}``.
    """
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    job: RankerJob = config["job"]
    torch.set_num_threads(job.config.torch_threads)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    model = _model(job)
    wrapped = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=job.config.lr)
    task: MultiTaskTask | ListwiseTask = (
        ListwiseTask(job.config.pointwise_weight)
        if job.list_size is not None
        else MultiTaskTask(job.watch_weight)
    )
    # A dataset row is a whole list when training listwise; the batch keeps about as many candidates.
    batch_size = (
        max(1, job.config.batch_size // job.list_size) if job.list_size is not None else job.config.batch_size
    )
    shard = ray.train.get_dataset_shard("train")
    assert shard is not None, "TorchTrainer was started without a 'train' dataset"
    history: list[dict[str, float]] = []
    best = _BestEpoch(job.config.patience)
    for epoch in range(1, job.config.epochs + 1):
        batches = shard.iter_torch_batches(
            batch_size=batch_size,
            local_shuffle_buffer_size=batch_size * 8,
            local_shuffle_seed=job.config.seed * 1000 + epoch * 10 + rank,
            drop_last=True,
        )
        loss_sum, steps, rows, seconds = ranker_epoch(wrapped, task, optimizer, batches)
        totals = torch.tensor([loss_sum, steps, rows], dtype=torch.float64)
        if world > 1 and dist.is_initialized():
            dist.all_reduce(totals)
        total_loss, total_steps, total_rows = totals.tolist()
        metrics = {
            "epoch": float(epoch),
            "loss": total_loss / total_steps if total_steps else math.nan,
            "rows": total_rows,
            "samples_per_s": total_rows / seconds if seconds > 0 else 0.0,
        }
        if rank == 0 and job.validation is not None and len(job.validation):
            metrics.update({f"valid_{k}": v for k, v in head_metrics(model, job.validation).items()})
            best.update(epoch, metrics.get("valid_auc_click", math.nan), model)
        history.append(metrics)
        # Rank 0 alone judges the epoch; every worker must leave the loop at the same epoch.
        stop = torch.tensor([float(rank == 0 and best.exhausted(epoch))])
        if world > 1 and dist.is_initialized():
            dist.broadcast(stop, src=0)
        last = epoch == job.config.epochs or bool(stop.item())
        if last and rank == 0:
            metrics["best_epoch"] = float(best.epoch or epoch)
            with tempfile.TemporaryDirectory() as directory:
                torch.save(best.state or model.state_dict(), Path(directory) / CHECKPOINT_FILE)
                (Path(directory) / "history.json").write_text(json.dumps(history))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)
        if last:
            break


@dataclass
class RankerResult:
    """A trained ranker and how training went.

    Attributes:
        model: The trained model, unwrapped, on CPU, in eval mode.
        history: Per-epoch metrics.
        validation: Head metrics on the held-out users at the end.
        seconds: Wall time of the fit.
    """

    model: MultiTaskRanker
    history: list[dict[str, float]] = field(default_factory=list)
    validation: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def fit_ranker(
    examples: RankerExamples, job: RankerJob, *, storage_path: str, name: str = "ranker"
) -> RankerResult:
    """Train the ranker with Ray Train and load the final checkpoint.

    Args:
        examples: Training examples (the validation examples are in ``job``).
        job: Model, settings and validation examples.
        storage_path: Where Ray Train keeps run state and checkpoints.
        name: Run name.

    Returns:
        The trained ranker with its history and validation metrics.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    started = time.perf_counter()
    dataset = examples.to_dataset().materialize()
    trainer = TorchTrainer(
        ranker_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.config.num_workers,
            use_gpu=False,
            resources_per_worker={"CPU": job.config.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(name=name, storage_path=storage_path),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    assert result.checkpoint is not None, "ranker training finished without a checkpoint"
    model = MultiTaskRanker(job.config, job.sizes)
    with result.checkpoint.as_directory() as directory:
        model.load_state_dict(
            torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        )
        history = json.loads((Path(directory) / "history.json").read_text())
    model.eval()
    validation = (
        head_metrics(model, job.validation) if job.validation is not None and len(job.validation) else {}
    )
    return RankerResult(
        model=model, history=history, validation=validation, seconds=time.perf_counter() - started
    )
