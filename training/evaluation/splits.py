"""Positive interactions coded as integers, and the train/validation/test splits built from them.

Two protocols are provided, so offline numbers can be compared both with the literature and with
what serving will see:

* ``published`` (:func:`published_split`): per-user random 80/10/10 split of each user's positive
  items, with a seed recorded in the split. This is the protocol most MovieLens results use.
* ``temporal`` (:func:`temporal_split`): global time cut-offs at the 80th and 90th percentile of
  interaction time. Validation and test rows whose user or item never occurs in train are
  dropped (and the number dropped recorded), because no model fitted on train can place them.

All three parts of a split share one user and one item vocabulary, so a user or item index means
the same thing in each of them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
StrArray = npt.NDArray[np.str_]

Part = Literal["train", "valid", "test"]
"""Name of one part of a :class:`Split`."""

POSITIVE_EVENT_TYPES: Final[frozenset[str]] = frozenset(
    {"click", "like", "share", "purchase", "watch", "view"}
)
"""Event types that count as positive feedback when an event carries no rating."""

_TS_UNIT = pa.timestamp("us", tz="UTC")
_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_PARTS: Final[tuple[Part, ...]] = ("train", "valid", "test")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class PositiveRule:
    """Which events count as positive interactions.

    A row with a rating is positive when the rating reaches ``min_rating``, whatever its event type;
    a row without a rating (implicit feedback) is positive when its event type is one of
    ``event_types``.

    Attributes:
        min_rating: Lowest rating that counts as positive (MovieLens convention: 3 of 5).
        event_types: Event types that count as positive when the row has no rating.
    """

    min_rating: float = 3.0
    event_types: frozenset[str] = POSITIVE_EVENT_TYPES

    def mask(self, table: pa.Table) -> BoolArray:
        """Flag the positive rows of an events table.

        Args:
            table: Events with a ``rating`` column, an ``event_type`` column, or both.

        Returns:
            One flag per row.

        Raises:
            ValueError: The table has neither a ``rating`` nor an ``event_type`` column.
        """
        names = set(table.column_names)
        if not names & {"rating", "event_type"}:
            raise ValueError("events need a 'rating' or an 'event_type' column to tell positives apart")
        n_rows = table.num_rows
        has_rating = np.zeros(n_rows, dtype=np.bool_)
        rated_positive = np.zeros(n_rows, dtype=np.bool_)
        if "rating" in names:
            rating = np.asarray(
                table.column("rating").cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64
            )
            has_rating = ~np.isnan(rating)
            rated_positive = has_rating & (np.nan_to_num(rating, nan=-np.inf) >= self.min_rating)
        typed_positive = np.zeros(n_rows, dtype=np.bool_)
        if "event_type" in names:
            value_set = pa.array(sorted(self.event_types), type=pa.string())
            flags = pc.is_in(table.column("event_type").cast(pa.string()), value_set=value_set)
            typed_positive = np.asarray(flags.fill_null(False).to_numpy(zero_copy_only=False), dtype=np.bool_)
        return np.where(has_rating, rated_positive, typed_positive)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, recorded in split metadata."""
        return {"min_rating": self.min_rating, "event_types": sorted(self.event_types)}


@dataclass(frozen=True, eq=False)
class Interactions:
    """Unique (user, item) positive interactions, integer-coded against shared vocabularies.

    Rows are in (user, item) order and no pair occurs twice. Every array has one entry per row,
    except the vocabularies, which map an index back to its id.

    Attributes:
        user_index: User of each row, an index into ``user_ids``.
        item_index: Item of each row, an index into ``item_ids``.
        ts_us: Time of each row in microseconds since the Unix epoch (UTC).
        user_ids: User vocabulary: ``user_ids[u]`` is the id of user index ``u``.
        item_ids: Item vocabulary: ``item_ids[i]`` is the id of item index ``i``.
        rating: Rating of each row (NaN when an event had none), or ``None`` for implicit data.
        positive: The rule the rows were selected with, when they came from events.
    """

    user_index: IntArray
    item_index: IntArray
    ts_us: IntArray
    user_ids: StrArray
    item_ids: StrArray
    rating: npt.NDArray[np.float32] | None = None
    positive: PositiveRule | None = None

    def __post_init__(self) -> None:
        n_rows = len(self.user_index)
        columns: dict[str, npt.NDArray[Any]] = {"item_index": self.item_index, "ts_us": self.ts_us}
        if self.rating is not None:
            columns["rating"] = self.rating
        for name, values in columns.items():
            if len(values) != n_rows:
                raise ValueError(f"{name} has {len(values)} rows, user_index has {n_rows}")
        for name, values, size in (
            ("user_index", self.user_index, len(self.user_ids)),
            ("item_index", self.item_index, len(self.item_ids)),
        ):
            if n_rows and (int(values.min()) < 0 or int(values.max()) >= size):
                raise ValueError(f"{name} holds values outside the vocabulary of {size} ids")

    def __len__(self) -> int:
        return len(self.user_index)

    def __repr__(self) -> str:
        return f"Interactions(rows={len(self)}, users={self.n_users}, items={self.n_items})"

    @property
    def n_users(self) -> int:
        """Size of the user vocabulary (not only users with rows)."""
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        """Size of the item vocabulary: the catalogue every ranking is over."""
        return len(self.item_ids)

    @classmethod
    def from_events(cls, table: pa.Table, positive: PositiveRule | None = None) -> Interactions:
        """Select the positive events of an events table and code them as integers.

        A (user, item) pair with several positive events becomes one row, stamped with its earliest
        positive event: the moment the preference became known (a rated event wins a tie, so its
        rating is kept). The vocabularies hold the users and items of the positive rows, sorted by id,
        so the coding does not depend on row order.

        Args:
            table: Rows shaped like the lake's ``events`` table; ``user_id``, ``item_id`` and ``ts``
                are required, plus ``rating`` and/or ``event_type`` to tell positives apart.
            positive: What counts as positive; the published rule (rating >= 3, or a positive event
                type for rows without a rating) when omitted.

        Returns:
            The positive interactions.

        Raises:
            ValueError: A required column is missing or holds nulls among the positive rows, or
                ``ts`` is not a timestamp column.
        """
        rule = PositiveRule() if positive is None else positive
        missing = [c for c in ("user_id", "item_id", "ts") if c not in table.column_names]
        if missing:
            raise ValueError(f"events table lacks columns {missing}")
        ts_type = table.schema.field("ts").type
        if not pa.types.is_timestamp(ts_type):
            raise ValueError(f"column 'ts' must be a timestamp, not {ts_type}")

        kept = table.filter(pa.array(rule.mask(table)))
        with_nulls = [c for c in ("user_id", "item_id", "ts") if kept.column(c).null_count]
        if with_nulls:
            raise ValueError(f"positive events hold nulls in required columns {with_nulls}")
        users = kept.column("user_id").cast(pa.string())
        items = kept.column("item_id").cast(pa.string())
        user_vocab = pc.unique(users).sort()
        item_vocab = pc.unique(items).sort()
        user_index = _to_int64(pc.index_in(users, value_set=user_vocab))
        item_index = _to_int64(pc.index_in(items, value_set=item_vocab))
        # Naive timestamps are UTC in the lake; sub-microsecond digits carry no ordering we rely on.
        ts_column = pc.cast(
            kept.column("ts"), options=pc.CastOptions(_TS_UNIT, allow_time_truncate=True)
        ).cast(pa.int64())
        ts_us = _to_int64(ts_column)
        rating: npt.NDArray[np.float32] | None = None
        if "rating" in kept.column_names:
            rating = np.asarray(
                kept.column("rating").cast(pa.float32()).to_numpy(zero_copy_only=False), dtype=np.float32
            )

        # Sorting by (pair, time) puts each pair's earliest event first, which is the row kept; at equal
        # times a rated row wins (imports write a rated "view" and an unrated "like" at the same instant).
        pair = user_index * max(len(item_vocab), 1) + item_index
        unrated = np.zeros(len(pair), dtype=np.bool_) if rating is None else np.isnan(rating)
        order = np.lexsort((unrated, ts_us, pair))
        sorted_pair = pair[order]
        first = np.ones(len(order), dtype=np.bool_)
        first[1:] = sorted_pair[1:] != sorted_pair[:-1]
        rows = order[first]
        return cls(
            user_index=user_index[rows],
            item_index=item_index[rows],
            ts_us=ts_us[rows],
            user_ids=np.asarray(user_vocab.to_pylist(), dtype=np.str_),
            item_ids=np.asarray(item_vocab.to_pylist(), dtype=np.str_),
            rating=None if rating is None else rating[rows],
            positive=rule,
        )

    def subset(self, rows: BoolArray | IntArray) -> Interactions:
        """The given rows, against the same vocabularies.

        Args:
            rows: A boolean mask over the rows, or row positions in increasing order.

        Returns:
            The selected interactions.
        """
        return Interactions(
            user_index=self.user_index[rows],
            item_index=self.item_index[rows],
            ts_us=self.ts_us[rows],
            user_ids=self.user_ids,
            item_ids=self.item_ids,
            rating=None if self.rating is None else self.rating[rows],
            positive=self.positive,
        )

    def concat(self, other: Interactions) -> Interactions:
        """The rows of both, for example train and validation when scoring test.

        Args:
            other: Interactions over the same vocabularies, sharing no (user, item) pair with these.

        Returns:
            The union, in (user, item) order.

        Raises:
            ValueError: The vocabularies differ.
        """
        if not (
            np.array_equal(self.user_ids, other.user_ids) and np.array_equal(self.item_ids, other.item_ids)
        ):
            raise ValueError("cannot concatenate interactions coded against different vocabularies")
        user_index = np.concatenate([self.user_index, other.user_index])
        item_index = np.concatenate([self.item_index, other.item_index])
        order = np.lexsort((item_index, user_index))
        rating: npt.NDArray[np.float32] | None = None
        if self.rating is not None or other.rating is not None:
            rating = np.concatenate([_ratings_or_nan(self), _ratings_or_nan(other)])[order]
        return Interactions(
            user_index=user_index[order],
            item_index=item_index[order],
            ts_us=np.concatenate([self.ts_us, other.ts_us])[order],
            user_ids=self.user_ids,
            item_ids=self.item_ids,
            rating=rating,
            positive=self.positive,
        )

    @cached_property
    def _csr(self) -> tuple[IntArray, IntArray]:
        # Per-user item lists in compressed-row form: what every batched lookup below reads.
        order = np.argsort(self.user_index, kind="stable")
        counts = np.bincount(self.user_index, minlength=self.n_users)
        indptr = np.zeros(self.n_users + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return indptr, self.item_index[order].astype(np.int64, copy=False)

    def user_counts(self) -> IntArray:
        """Number of rows of each user index (zeros for users without rows)."""
        indptr, _ = self._csr
        return np.diff(indptr)

    def item_counts(self) -> IntArray:
        """Number of rows of each item index (zeros for items without rows)."""
        return np.bincount(self.item_index, minlength=self.n_items).astype(np.int64, copy=False)

    def active_users(self) -> IntArray:
        """Sorted indices of the users with at least one row."""
        return np.flatnonzero(self.user_counts()).astype(np.int64, copy=False)

    def coordinates(self, user_indices: IntArray) -> tuple[IntArray, IntArray]:
        """Where a batch of users' items sit in a (batch, item) matrix.

        Args:
            user_indices: Users of the batch, one per matrix row.

        Returns:
            ``(rows, items)``: the batch row and item index of every interaction of those users.
        """
        indptr, indices = self._csr
        users = np.asarray(user_indices, dtype=np.int64)
        starts = indptr[users]
        lengths = indptr[users + 1] - starts
        rows = np.repeat(np.arange(len(users), dtype=np.int64), lengths)
        # Offset of each entry within its user's run, so the runs can be gathered in one take.
        run_starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        positions = np.repeat(starts, lengths) + (np.arange(len(rows), dtype=np.int64) - run_starts)
        return rows, indices[positions]

    def dense_rows(self, user_indices: IntArray, dtype: npt.DTypeLike = np.float32) -> npt.NDArray[Any]:
        """The binary user-item matrix restricted to a batch of users.

        Args:
            user_indices: Users of the batch, one per returned row.
            dtype: Element type of the result.

        Returns:
            A ``(len(user_indices), n_items)`` matrix with 1 where the user has the item.
        """
        matrix = np.zeros((len(user_indices), self.n_items), dtype=dtype)
        rows, items = self.coordinates(user_indices)
        matrix[rows, items] = 1
        return matrix

    def to_table(self) -> pa.Table:
        """The rows as Arrow columns ``user_index``, ``item_index``, ``ts`` and, if known, ``rating``."""
        columns: dict[str, pa.Array] = {
            "user_index": pa.array(self.user_index, type=pa.int64()),
            "item_index": pa.array(self.item_index, type=pa.int64()),
            "ts": pa.array(self.ts_us, type=pa.int64()).cast(_TS_UNIT),
        }
        if self.rating is not None:
            columns["rating"] = pa.array(self.rating, type=pa.float32(), from_pandas=True)
        return pa.table(columns)


@dataclass(frozen=True, eq=False)
class Split:
    """Train, validation and test interactions over one vocabulary, and how they were made.

    Attributes:
        train: What models are fitted on.
        valid: Held-out interactions for model selection.
        test: Held-out interactions for the reported numbers.
        metadata: JSON-ready description: ``protocol``, ``seed``, ``cutoffs``, ``sizes``,
            ``positive`` and ``notes``.
    """

    train: Interactions
    valid: Interactions
    test: Interactions
    metadata: dict[str, Any] = field(default_factory=dict)

    def part(self, name: Part) -> Interactions:
        """One part by name."""
        parts: dict[Part, Interactions] = {"train": self.train, "valid": self.valid, "test": self.test}
        return parts[name]

    def known_before(self, name: Literal["valid", "test"]) -> Interactions:
        """What a model may have seen when ``name`` is scored: train, plus validation for test.

        These items are removed from every user's ranking, since recommending them again carries no
        information about held-out preferences.

        Args:
            name: The part being scored.

        Returns:
            The interactions to exclude from rankings.
        """
        return self.train if name == "valid" else self._train_and_valid

    @cached_property
    def _train_and_valid(self) -> Interactions:
        return self.train.concat(self.valid)

    def save(self, path: str, *, filesystem: pafs.FileSystem | None = None) -> None:
        """Write the split to a directory: one Parquet file per part, the vocabularies, the metadata.

        Args:
            path: A local directory, or a pyarrow filesystem URI (``s3://bucket/prefix``).
            filesystem: A filesystem to use instead of resolving ``path``; ``path`` is then within it.
        """
        fs, root = resolve_location(path, filesystem)
        fs.create_dir(root, recursive=True)
        for name in _PARTS:
            pq.write_table(self.part(name).to_table(), f"{root}/{name}.parquet", filesystem=fs)
        pq.write_table(
            pa.table({"user_id": pa.array(self.train.user_ids.tolist(), pa.string())}),
            f"{root}/users.parquet",
            filesystem=fs,
        )
        pq.write_table(
            pa.table({"item_id": pa.array(self.train.item_ids.tolist(), pa.string())}),
            f"{root}/items.parquet",
            filesystem=fs,
        )
        with fs.open_output_stream(f"{root}/metadata.json") as out:
            out.write(json.dumps(self.metadata, indent=2, sort_keys=True).encode())

    @classmethod
    def load(cls, path: str, *, filesystem: pafs.FileSystem | None = None) -> Split:
        """Read a split written by :meth:`save`.

        Args:
            path: The directory given to :meth:`save`.
            filesystem: A filesystem to use instead of resolving ``path``.

        Returns:
            The split.
        """
        fs, root = resolve_location(path, filesystem)
        with fs.open_input_stream(f"{root}/metadata.json") as stream:
            metadata: dict[str, Any] = json.loads(stream.read().decode())
        user_ids = np.asarray(
            pq.read_table(f"{root}/users.parquet", filesystem=fs).column("user_id").to_pylist(), dtype=np.str_
        )
        item_ids = np.asarray(
            pq.read_table(f"{root}/items.parquet", filesystem=fs).column("item_id").to_pylist(), dtype=np.str_
        )
        rule = metadata.get("positive")
        positive = (
            None
            if rule is None
            else PositiveRule(
                min_rating=float(rule["min_rating"]), event_types=frozenset(rule["event_types"])
            )
        )
        parts = {
            name: _interactions_from_table(
                pq.read_table(f"{root}/{name}.parquet", filesystem=fs), user_ids, item_ids, positive
            )
            for name in _PARTS
        }
        return cls(train=parts["train"], valid=parts["valid"], test=parts["test"], metadata=metadata)


def published_split(
    interactions: Interactions,
    *,
    seed: int = 42,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    min_positives: int = 3,
) -> Split:
    """Protocol (a): per-user random train/validation/test split of positive items.

    Each user with at least ``min_positives`` items gives ``max(1, round(fraction * n))`` of them to
    validation and to test, chosen at random; the rest go to train. Users with fewer items keep all
    of them in train: they shape the model but are not evaluated. The same interactions and seed
    always give the same split.

    Args:
        interactions: Positive interactions, e.g. from :meth:`Interactions.from_events`.
        seed: Seed of the random assignment; recorded in the metadata.
        valid_fraction: Share of each user's items held out for validation.
        test_fraction: Share of each user's items held out for test.
        min_positives: Fewest items a user needs to be held out from at all.

    Returns:
        The split, with ``protocol="published"``.

    Raises:
        ValueError: A fraction is not positive, the two sum above one half, or ``min_positives`` < 3.
    """
    if valid_fraction <= 0 or test_fraction <= 0 or valid_fraction + test_fraction > 0.5:
        raise ValueError("valid_fraction and test_fraction must be positive and sum to at most 0.5")
    if min_positives < 3:
        # Below three items a user cannot keep one in each of train, validation and test.
        raise ValueError("min_positives must be at least 3")
    rng = np.random.default_rng(seed)
    n_rows = len(interactions)
    users = interactions.user_index
    order = np.lexsort((rng.random(n_rows), users))
    counts = interactions.user_counts()
    starts = np.cumsum(counts) - counts
    rank = np.empty(n_rows, dtype=np.int64)
    rank[order] = np.arange(n_rows, dtype=np.int64) - starts[users[order]]

    n_user = counts[users]
    eligible = n_user >= min_positives
    # Half-up rounding, so held-out counts grow steadily with n (round-half-even gives 25 items 2, not 3).
    n_test = np.where(eligible, np.maximum(1, np.floor(test_fraction * n_user + 0.5)), 0).astype(np.int64)
    n_valid = np.where(eligible, np.maximum(1, np.floor(valid_fraction * n_user + 0.5)), 0).astype(np.int64)
    is_test = rank < n_test
    is_valid = ~is_test & (rank < n_test + n_valid)
    is_train = ~(is_test | is_valid)
    split_parts = (interactions.subset(is_train), interactions.subset(is_valid), interactions.subset(is_test))
    metadata = _metadata(
        "published",
        interactions,
        split_parts,
        seed=seed,
        cutoffs=None,
        extra={
            "valid_fraction": valid_fraction,
            "test_fraction": test_fraction,
            "min_positives": min_positives,
            "train_only_users": int(np.count_nonzero((counts > 0) & (counts < min_positives))),
        },
        notes=[
            f"users with fewer than {min_positives} positives keep all of them in train and are not evaluated"
        ],
    )
    return Split(*split_parts, metadata=metadata)


def temporal_split(
    interactions: Interactions, *, valid_quantile: float = 0.8, test_quantile: float = 0.9
) -> Split:
    """Protocol (b): global time cut-offs, as a model deployed at a point in time would face.

    Train holds what happened before the ``valid_quantile`` point of interaction time, validation
    what happened from there up to the ``test_quantile`` point, test the rest. Validation and test
    keep only users and items that occur in train: a model fitted on train has no representation
    for the others, so they would measure cold start rather than ranking quality. The number of
    rows dropped that way is recorded in the metadata.

    Args:
        interactions: Positive interactions, e.g. from :meth:`Interactions.from_events`.
        valid_quantile: Quantile of interaction time where validation starts.
        test_quantile: Quantile of interaction time where test starts.

    Returns:
        The split, with ``protocol="temporal"`` and the cut-offs in the metadata.

    Raises:
        ValueError: The quantiles are not increasing within (0, 1), or there are no interactions.
    """
    if not 0 < valid_quantile < test_quantile < 1:
        raise ValueError("need 0 < valid_quantile < test_quantile < 1")
    if len(interactions) == 0:
        raise ValueError("cannot split zero interactions")
    ts = interactions.ts_us
    # "lower" picks an observed timestamp, so a cut-off is an instant that happened.
    valid_cut, test_cut = (int(q) for q in np.quantile(ts, [valid_quantile, test_quantile], method="lower"))
    is_train = ts < valid_cut
    train = interactions.subset(is_train)
    known_user = np.zeros(interactions.n_users, dtype=np.bool_)
    known_user[train.user_index] = True
    known_item = np.zeros(interactions.n_items, dtype=np.bool_)
    known_item[train.item_index] = True
    seen = known_user[interactions.user_index] & known_item[interactions.item_index]
    in_valid = ~is_train & (ts < test_cut)
    in_test = ts >= test_cut
    is_valid = in_valid & seen
    is_test = in_test & seen
    split_parts = (train, interactions.subset(is_valid), interactions.subset(is_test))
    dropped_valid = int(np.count_nonzero(in_valid & ~seen))
    dropped_test = int(np.count_nonzero(in_test & ~seen))
    metadata = _metadata(
        "temporal",
        interactions,
        split_parts,
        seed=None,
        cutoffs={
            "valid_quantile": valid_quantile,
            "test_quantile": test_quantile,
            "valid_start_us": valid_cut,
            "test_start_us": test_cut,
            "valid_start": _iso(valid_cut),
            "test_start": _iso(test_cut),
        },
        extra={"dropped_unseen_valid": dropped_valid, "dropped_unseen_test": dropped_test},
        notes=[
            "validation and test are limited to users and items seen in train "
            f"({dropped_valid} validation and {dropped_test} test rows dropped)"
        ],
    )
    return Split(*split_parts, metadata=metadata)


def resolve_location(path: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """The filesystem and in-filesystem path of a local path or filesystem URI.

    Args:
        path: A local path (relative paths are made absolute) or a URI such as ``s3://bucket/x``.
        filesystem: A filesystem to use as is; ``path`` is then a path within it.

    Returns:
        ``(filesystem, path)`` ready for pyarrow calls, without a trailing slash.
    """
    if filesystem is not None:
        return filesystem, path.rstrip("/")
    if _URI_RE.match(path):
        fs, base = pafs.FileSystem.from_uri(path)
        return fs, base.rstrip("/")
    local = Path(os.path.abspath(os.path.expanduser(path))).as_posix()
    return pafs.LocalFileSystem(), local.rstrip("/") or "/"


def _metadata(
    protocol: str,
    source: Interactions,
    parts: tuple[Interactions, Interactions, Interactions],
    *,
    seed: int | None,
    cutoffs: dict[str, Any] | None,
    extra: Mapping[str, Any],
    notes: list[str],
) -> dict[str, Any]:
    train, valid, test = parts
    sizes = {
        "users": source.n_users,
        "items": source.n_items,
        "interactions": len(source),
        "train": len(train),
        "valid": len(valid),
        "test": len(test),
        "valid_users": len(valid.active_users()),
        "test_users": len(test.active_users()),
    }
    return {
        "protocol": protocol,
        "seed": seed,
        "cutoffs": cutoffs,
        "sizes": sizes,
        "positive": None if source.positive is None else source.positive.to_dict(),
        **extra,
        "notes": notes,
    }


def _interactions_from_table(
    table: pa.Table, user_ids: StrArray, item_ids: StrArray, positive: PositiveRule | None
) -> Interactions:
    rating: npt.NDArray[np.float32] | None = None
    if "rating" in table.column_names:
        rating = np.asarray(table.column("rating").to_numpy(zero_copy_only=False), dtype=np.float32)
    return Interactions(
        user_index=_to_int64(table.column("user_index")),
        item_index=_to_int64(table.column("item_index")),
        ts_us=_to_int64(table.column("ts").cast(_TS_UNIT).cast(pa.int64())),
        user_ids=user_ids,
        item_ids=item_ids,
        rating=rating,
        positive=positive,
    )


def _to_int64(column: pa.ChunkedArray | pa.Array) -> IntArray:
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.int64)


def _ratings_or_nan(interactions: Interactions) -> npt.NDArray[np.float32]:
    if interactions.rating is not None:
        return interactions.rating
    return np.full(len(interactions), np.nan, dtype=np.float32)


def _iso(ts_us: int) -> str:
    return (_EPOCH + timedelta(microseconds=ts_us)).isoformat()
