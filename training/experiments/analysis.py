"""A/B analysis of one experiment from the lake: the backend of ``rayrec experiments report``.

**Data.** Ray Data reads the ``impressions`` of the experiment (one row per served item, with its
arm), the ``events`` and the ``items`` change-log, and runs three hash shuffles:

1. by ``item_id`` over items and events: each item's latest category and creation time (latest
   ``updated_at`` wins; exact ties are broken arbitrarily) and its event count, the popularity
   behind novelty;
2. by ``item_id`` over impressions and those item rows: each impression gets its item's attributes;
3. by ``user_id`` over impressions and events: each user's events are attributed to the user's
   impressions, the impressions are labelled (clicked, liked, ...) and summed per user and arm.

Each step is a ``map_batches`` call with ``batch_size=None`` right after ``repartition(keys=...)``,
so a call sees whole keys (the pattern Ray Data's own ``map_groups`` is built on), and the stage
functions below are plain Arrow/pandas code that the unit tests call directly.

**Attribution.** An event counts for an impression when it comes within
``attribution_window_h`` (24 h by default) after the impression was served, and

* it carries the impression's ``request_id`` (the client echoed the response's id): it is
  matched on ``(request_id, item_id)``; or
* it carries no ``request_id``: it is matched on ``(user_id, item_id)`` to the *latest* of the
  experiment's impressions served at or before it, so an event is never counted twice. Such a
  match may be wrong when the user also met the item elsewhere (another surface, a search);
  clients should send the ``request_id``, and the report counts how many events needed the
  fallback.

An event with a ``request_id`` of a request outside the experiment is not attributed. Duplicate
deliveries are dropped (events by ``event_id``, impressions by ``(request_id, position)``).

**Metrics** (per arm): users, impressions, CTR (clicked impressions / impressions), like rate,
conversion (purchased impressions / impressions), watch seconds per impression, hide, report and
negative-feedback (hide, not interested, report) rates, fallback rate, diversity (mean over
served lists of the share of item pairs from different categories), novelty (mean ``-log2 p`` of
served items, with ``p = (events of the item + 1) / (events + items)`` over the analysis window)
and freshness (mean age of served items in hours), each a user-clustered ratio with a delta-method
interval and a z-test against control (:mod:`training.experiments.stats`); catalogue coverage
(distinct items served / items in the catalogue) without an interval.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.schema import EventType
from core.tables import EVENTS, IMPRESSIONS, ITEMS, TS
from policies.experiments import ExperimentConfig
from training.experiments.report import ArmResult, ExperimentReport, GuardrailResult, MetricResult
from training.experiments.stats import (
    SRM_P_THRESHOLD,
    Comparison,
    RatioMoments,
    compare,
    group_sum,
    ratio_estimate,
    srm_check,
)

if TYPE_CHECKING:
    import ray.data

    from core.lake import Lake

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Bool = npt.NDArray[np.bool_]

# -- metric definitions ----------------------------------------------------------------------


@dataclass(frozen=True)
class RatioMetric:
    """A per-arm metric defined as a ratio of per-user sums.

    Attributes:
        name: Metric id in reports and configs.
        numerator: Per-user sum on top (a :data:`USER_SUMS_SCHEMA` column).
        denominator: Per-user sum below.
        higher_is_better: Direction of improvement.
        description: One line for readers of the report.
    """

    name: str
    numerator: str
    denominator: str
    higher_is_better: bool
    description: str


METRICS: Final[tuple[RatioMetric, ...]] = (
    RatioMetric("ctr", "clicks", "impressions", True, "clicked impressions / impressions"),
    RatioMetric("like_rate", "likes", "impressions", True, "liked impressions / impressions"),
    RatioMetric("conversion", "purchases", "impressions", True, "purchased impressions / impressions"),
    RatioMetric("watch_s_per_impression", "watch_s", "impressions", True, "seconds watched / impressions"),
    RatioMetric("hide_rate", "hides", "impressions", False, "hidden impressions / impressions"),
    RatioMetric("report_rate", "reports", "impressions", False, "reported impressions / impressions"),
    RatioMetric(
        "negative_feedback_rate",
        "negatives",
        "impressions",
        False,
        "impressions hidden, marked not interested or reported / impressions",
    ),
    RatioMetric("fallback_rate", "fallbacks", "impressions", False, "impressions from a fallback list"),
    RatioMetric("diversity", "diversity_sum", "lists", True, "share of item pairs of different categories"),
    RatioMetric("novelty_bits", "novelty_sum", "novelty_n", True, "mean -log2 popularity of served items"),
    RatioMetric("item_age_h", "age_h_sum", "fresh_n", False, "mean age of served items in hours"),
)
"""Every ratio metric of the report, in display order."""

METRIC_BY_NAME: Final = {m.name: m for m in METRICS}

SUM_COLUMNS: Final[tuple[str, ...]] = (
    "impressions",
    "clicks",
    "likes",
    "purchases",
    "watch_s",
    "hides",
    "not_interested",
    "reports",
    "negatives",
    "fallbacks",
    "lists",
    "diversity_sum",
    "novelty_n",
    "novelty_sum",
    "fresh_n",
    "age_h_sum",
    "events_by_request",
    "events_by_window",
    "multi_arm",
)
"""Per-user sums, one column each in :data:`USER_SUMS_SCHEMA`."""

# -- configuration ---------------------------------------------------------------------------


class AnalysisWindow(BaseModel):
    """Which impressions and events an analysis reads."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: datetime | None = None
    """First serving instant analysed; unbounded when ``None``."""
    end: datetime | None = None
    """Serving instants up to this one (exclusive) are analysed; unbounded when ``None``."""
    attribution_window_h: Annotated[float, Field(gt=0, le=24 * 30)] = 24.0
    """How long after an impression its events count."""

    @field_validator("start", "end")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is None or value.tzinfo is not None:
            return value
        raise ValueError("must be timezone-aware")

    @model_validator(mode="after")
    def _ordered(self) -> AnalysisWindow:
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ValueError("end: must be after start")
        return self

    @property
    def events_end(self) -> datetime | None:
        """Last event instant that can still be attributed."""
        return None if self.end is None else self.end + timedelta(hours=self.attribution_window_h)


class Guardrail(BaseModel):
    """A metric no treatment may make significantly worse."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str
    """A metric of :data:`METRICS`."""
    tolerance: Annotated[float, Field(ge=0, le=10)] = 0.0
    """Relative worsening accepted (0.05: up to 5 % worse); the guardrail fails when the interval
    of the relative change lies entirely beyond it."""

    @field_validator("metric")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in METRIC_BY_NAME:
            raise ValueError(f"unknown metric {value!r}; known: {sorted(METRIC_BY_NAME)}")
        return value


DEFAULT_GUARDRAILS: Final = (
    Guardrail(metric="negative_feedback_rate"),
    Guardrail(metric="fallback_rate"),
)


class AnalysisConfig(BaseModel):
    """How an experiment is analysed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha: Annotated[float, Field(gt=0, lt=0.5)] = 0.05
    """Significance level of the tests; intervals have ``1 - alpha`` coverage."""
    srm_threshold: Annotated[float, Field(gt=0, lt=1)] = SRM_P_THRESHOLD
    """p-value of the sample-ratio test under which the split is flagged."""
    window: AnalysisWindow = Field(default_factory=AnalysisWindow)
    """Impressions and events read; the experiment's own schedule fills unset bounds."""
    guardrails: tuple[Guardrail, ...] = DEFAULT_GUARDRAILS
    """Metrics checked for harm in every treatment arm."""
    partitions: Annotated[int, Field(ge=1, le=10_000)] = 4
    """Hash partitions of each shuffle; raise it with the data (each partition is one task's memory)."""


# -- schemas of the stages -------------------------------------------------------------------

KIND_IMPRESSION: Final = 0
KIND_EVENT: Final = 1
KIND_ITEM: Final = 2

ITEM_INPUT_SCHEMA: Final = pa.schema(
    [
        pa.field("item_id", pa.string()),
        pa.field("kind", pa.int8()),
        pa.field("category", pa.string()),
        pa.field("status", pa.string()),
        pa.field("created_at", TS),
        pa.field("updated_at", TS),
    ]
)

ITEM_STATS_SCHEMA: Final = pa.schema(
    [
        pa.field("item_id", pa.string()),
        pa.field("category", pa.string()),
        pa.field("item_created_at", TS),
        pa.field("item_events", pa.int64()),
        pa.field("active", pa.int64()),
    ]
)
"""One row per item seen in the catalogue or the events."""

ROW_SCHEMA: Final = pa.schema(
    [
        pa.field("kind", pa.int8()),
        pa.field("user_id", pa.string()),
        pa.field("item_id", pa.string()),
        pa.field("request_id", pa.string()),
        pa.field("ts", TS),
        pa.field("position", pa.int32()),
        pa.field("surface", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("propensity", pa.float32()),
        pa.field("model_version", pa.string()),
        pa.field("arm", pa.string()),
        pa.field("fallback", pa.string()),
        pa.field("event_id", pa.string()),
        pa.field("event_type", pa.string()),
        pa.field("watch_time_s", pa.float32()),
        pa.field("category", pa.string()),
        pa.field("item_created_at", TS),
        pa.field("item_events", pa.int64()),
    ]
)
"""Impressions, events and item rows in one shape, so that they can share a shuffle."""

LABELLED_SCHEMA: Final = pa.schema(
    [
        pa.field("request_id", pa.string()),
        pa.field("user_id", pa.string()),
        pa.field("surface", pa.string()),
        pa.field("item_id", pa.string()),
        pa.field("position", pa.int32()),
        pa.field("score", pa.float32()),
        pa.field("propensity", pa.float32()),
        pa.field("model_version", pa.string()),
        pa.field("arm", pa.string()),
        pa.field("fallback", pa.string()),
        pa.field("served_at", TS),
        pa.field("category", pa.string()),
        pa.field("item_created_at", TS),
        pa.field("item_events", pa.int64()),
        pa.field("clicked", pa.bool_()),
        pa.field("liked", pa.bool_()),
        pa.field("purchased", pa.bool_()),
        pa.field("watch_s", pa.float64()),
        pa.field("hidden", pa.bool_()),
        pa.field("not_interested", pa.bool_()),
        pa.field("reported", pa.bool_()),
        pa.field("events_by_request", pa.int64()),
        pa.field("events_by_window", pa.int64()),
    ]
)
"""One row per impression with what followed it."""

USER_SUMS_SCHEMA: Final = pa.schema(
    [pa.field("arm", pa.string()), pa.field("user_id", pa.string())]
    + [pa.field(c, pa.float64()) for c in SUM_COLUMNS]
)
"""One row per (arm, user)."""

CROSS_COLUMNS: Final[tuple[tuple[str, str], ...]] = tuple(
    sorted({(m.numerator, m.denominator) for m in METRICS})
)

PARTIAL_SCHEMA: Final = pa.schema(
    [pa.field("arm", pa.string()), pa.field("users", pa.float64())]
    + [pa.field(f"sum__{c}", pa.float64()) for c in SUM_COLUMNS]
    + [pa.field(f"sq__{c}", pa.float64()) for c in SUM_COLUMNS]
    + [pa.field(f"cross__{y}__{x}", pa.float64()) for y, x in CROSS_COLUMNS]
)
"""Per-arm sums, squares and cross products of one batch of users: all the delta method needs."""

NO_ARM: Final = "(none)"
"""Arm shown for impressions of the experiment logged without an arm."""

_ATTRIBUTED: Final = {
    EventType.CLICK.value: "clicked",
    EventType.LIKE.value: "liked",
    EventType.PURCHASE.value: "purchased",
    EventType.HIDE.value: "hidden",
    EventType.NOT_INTERESTED.value: "not_interested",
    EventType.REPORT.value: "reported",
}
ATTRIBUTED_EVENT_TYPES: Final[tuple[str, ...]] = (*_ATTRIBUTED, EventType.WATCH.value)
"""Event types the analysis attributes to impressions; other events only count for popularity."""

# -- stage 0: projection of each table into the shared shapes --------------------------------


def _timestamp_bounds(
    column: pa.ChunkedArray | pa.Array, start: datetime | None, end: datetime | None
) -> pa.Array:
    keep = pa.array(np.ones(len(column), dtype=bool))
    if start is not None:
        keep = pc.and_(keep, pc.fill_null(pc.greater_equal(column, pa.scalar(start, type=TS)), False))
    if end is not None:
        keep = pc.and_(keep, pc.fill_null(pc.less(column, pa.scalar(end, type=TS)), False))
    return keep


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns in order, absent ones as nulls."""
    columns = []
    for field in schema:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def exposure_rows(
    batch: pa.Table,
    *,
    experiment_id: str | None,
    arm: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
) -> pa.Table:
    """Impressions of the experiment (and arm) served in ``[start, end)``, as :data:`ROW_SCHEMA` rows.

    Args:
        batch: ``impressions`` rows.
        experiment_id: Keep only this experiment's rows; every row when ``None``.
        arm: Keep only this arm's rows.
        start: First serving instant kept.
        end: Serving instants before this one are kept.

    Returns:
        Rows of kind :data:`KIND_IMPRESSION`, ``ts`` being ``served_at``.
    """
    keep = _timestamp_bounds(batch.column("served_at"), start, end)
    if experiment_id is not None:
        keep = pc.and_(keep, pc.fill_null(pc.equal(batch.column("experiment_id"), experiment_id), False))
    if arm is not None:
        keep = pc.and_(keep, pc.fill_null(pc.equal(batch.column("arm"), arm), False))
    rows = batch.filter(keep)
    rows = rows.rename_columns(["ts" if c == "served_at" else c for c in rows.column_names])
    arms = pc.fill_null(rows.column("arm"), NO_ARM) if "arm" in rows.column_names else None
    rows = rows.append_column("kind", pa.array(np.full(rows.num_rows, KIND_IMPRESSION, dtype=np.int8)))
    if arms is not None:
        rows = rows.set_column(rows.column_names.index("arm"), "arm", arms)
    return _conform(rows, ROW_SCHEMA)


def event_rows(batch: pa.Table, *, start: datetime | None = None, end: datetime | None = None) -> pa.Table:
    """Attributable events stamped in ``[start, end)``, as :data:`ROW_SCHEMA` rows.

    Args:
        batch: ``events`` rows.
        start: First event instant kept.
        end: Event instants before this one are kept.

    Returns:
        Rows of kind :data:`KIND_EVENT` of the types in :data:`ATTRIBUTED_EVENT_TYPES`.
    """
    keep = pc.and_(
        _timestamp_bounds(batch.column("ts"), start, end),
        pc.fill_null(pc.is_in(batch.column("event_type"), pa.array(ATTRIBUTED_EVENT_TYPES)), False),
    )
    rows = batch.filter(keep)
    rows = rows.append_column("kind", pa.array(np.full(rows.num_rows, KIND_EVENT, dtype=np.int8)))
    return _conform(rows, ROW_SCHEMA)


def item_input_rows(batch: pa.Table) -> pa.Table:
    """``items`` change-log rows as :data:`ITEM_INPUT_SCHEMA` rows."""
    rows = batch.append_column("kind", pa.array(np.full(batch.num_rows, KIND_ITEM, dtype=np.int8)))
    return _conform(rows, ITEM_INPUT_SCHEMA)


def popularity_rows(
    batch: pa.Table, *, start: datetime | None = None, end: datetime | None = None
) -> pa.Table:
    """Events of any type stamped in ``[start, end)`` as :data:`ITEM_INPUT_SCHEMA` rows (item only)."""
    rows = batch.select(["item_id"]).filter(_timestamp_bounds(batch.column("ts"), start, end))
    rows = rows.append_column("kind", pa.array(np.full(rows.num_rows, KIND_EVENT, dtype=np.int8)))
    return _conform(rows, ITEM_INPUT_SCHEMA)


# -- array helpers ---------------------------------------------------------------------------


def _array(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _codes(column: pa.ChunkedArray | pa.Array) -> tuple[I64, pa.Array]:
    """Dense integer codes of a column (``-1`` for nulls) and the distinct values they index."""
    encoded = pc.dictionary_encode(_array(column))
    codes = np.asarray(pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False), dtype=np.int64)
    return codes, encoded.dictionary


def _pair_codes(left: pa.ChunkedArray | pa.Array, right: pa.ChunkedArray | pa.Array) -> I64:
    """Codes of ``(left, right)`` string pairs, equal exactly when both parts are."""
    left_codes, _ = _codes(left)
    right_codes, right_values = _codes(right)
    return left_codes * (len(right_values) + 1) + right_codes


def _micros(column: pa.ChunkedArray | pa.Array) -> tuple[I64, Bool]:
    """A timestamp column as integer microseconds, with its validity."""
    values = _array(column)
    valid = np.asarray(pc.is_valid(values).to_numpy(zero_copy_only=False), dtype=bool)
    micros = pc.fill_null(pc.cast(values, pa.int64()), 0).to_numpy(zero_copy_only=False)
    return np.asarray(micros, dtype=np.int64), valid


def _bools(column: pa.ChunkedArray | pa.Array) -> Bool:
    return np.asarray(pc.fill_null(_array(column), False).to_numpy(zero_copy_only=False), dtype=bool)


def _floats(column: pa.ChunkedArray | pa.Array) -> F64:
    values = pc.fill_null(pc.cast(_array(column), pa.float64()), 0.0)
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)


def _first_of_each(codes: I64) -> I64:
    """Row indices of the first occurrence of each code, in row order."""
    _, first = np.unique(codes, return_index=True)
    return np.sort(first).astype(np.int64)


# -- stage 1: item attributes and popularity (partitioned by item) ---------------------------


def summarise_items(batch: pa.Table) -> pa.Table:
    """Each item's latest catalogue row and its event count.

    Args:
        batch: :data:`ITEM_INPUT_SCHEMA` rows holding every row of their items.

    Returns:
        :data:`ITEM_STATS_SCHEMA` rows, one per item.
    """
    if batch.num_rows == 0:
        return ITEM_STATS_SCHEMA.empty_table()
    kind = batch.column("kind")
    items = batch.filter(pc.equal(kind, KIND_ITEM))
    events = batch.filter(pc.equal(kind, KIND_EVENT))
    if items.num_rows:
        items = items.take(
            pc.sort_indices(items, sort_keys=[("item_id", "ascending"), ("updated_at", "ascending")])
        )
        codes, _ = _codes(items.column("item_id"))
        last = np.r_[codes[1:] != codes[:-1], True]
        items = items.filter(pa.array(last))
    latest = pa.table(
        {
            "item_id": items.column("item_id"),
            "category": items.column("category"),
            "item_created_at": items.column("created_at"),
            "active": pc.cast(pc.equal(items.column("status"), "active"), pa.int64()),
        }
    )
    counts = (
        events.group_by("item_id").aggregate([("kind", "count")]).rename_columns(["item_id", "item_events"])
    )
    joined = latest.join(counts, keys="item_id", join_type="full outer")
    joined = joined.set_column(
        joined.column_names.index("item_events"), "item_events", pc.fill_null(joined.column("item_events"), 0)
    ).set_column(joined.column_names.index("active"), "active", pc.fill_null(joined.column("active"), 0))
    return _conform(joined, ITEM_STATS_SCHEMA)


ITEM_COUNTS_SCHEMA: Final = pa.schema(
    [pa.field("items", pa.int64()), pa.field("events", pa.int64()), pa.field("active", pa.int64())]
)


def item_counts(batch: pa.Table) -> pa.Table:
    """Items, their events and the active ones in a batch of :data:`ITEM_STATS_SCHEMA` rows (one row)."""
    return pa.Table.from_pylist(
        [
            {
                "items": batch.num_rows,
                "events": pc.sum(batch.column("item_events")).as_py() or 0,
                "active": pc.sum(batch.column("active")).as_py() or 0,
            }
        ],
        schema=ITEM_COUNTS_SCHEMA,
    )


def item_stat_rows(batch: pa.Table) -> pa.Table:
    """:data:`ITEM_STATS_SCHEMA` rows as :data:`ROW_SCHEMA` rows of kind :data:`KIND_ITEM`."""
    rows = batch.select(["item_id", "category", "item_created_at", "item_events"])
    rows = rows.append_column("kind", pa.array(np.full(rows.num_rows, KIND_ITEM, dtype=np.int8)))
    return _conform(rows, ROW_SCHEMA)


# -- stage 2: item attributes onto impressions (partitioned by item) -------------------------


def attach_items(batch: pa.Table) -> pa.Table:
    """Copy each item row's attributes onto the impressions of that item.

    Args:
        batch: :data:`ROW_SCHEMA` rows of impressions and items, holding every row of their items.

    Returns:
        The impressions, with ``category``, ``item_created_at`` and ``item_events`` set (null for
        items neither the catalogue nor the events know).
    """
    kind = batch.column("kind")
    impressions = batch.filter(pc.equal(kind, KIND_IMPRESSION))
    if impressions.num_rows == 0:
        return ROW_SCHEMA.empty_table()
    attributes = ["category", "item_created_at", "item_events"]
    # summarise_items gives one row per item (its input is partitioned by item), so the join
    # cannot duplicate impressions.
    items = batch.filter(pc.equal(kind, KIND_ITEM)).select(["item_id", *attributes])
    joined = impressions.drop_columns(attributes).join(items, keys="item_id", join_type="left outer")
    return _conform(joined, ROW_SCHEMA)


# -- stage 3: attribution and per-user sums (partitioned by user) ----------------------------


def label_impressions(batch: pa.Table, *, attribution_window_h: float = 24.0) -> pa.Table:
    """Attribute events to impressions and label every impression with what followed it.

    Args:
        batch: :data:`ROW_SCHEMA` impressions and events, holding every row of their users.
        attribution_window_h: How long after an impression its events count.

    Returns:
        :data:`LABELLED_SCHEMA` rows, one per distinct impression (``(request_id, position)``).
    """
    kind = batch.column("kind")
    imp = batch.filter(pc.equal(kind, KIND_IMPRESSION))
    if imp.num_rows == 0:
        return LABELLED_SCHEMA.empty_table()
    imp = imp.take(
        pa.array(
            _first_of_each(
                _pair_codes(imp.column("request_id"), pc.cast(imp.column("position"), pa.string()))
            )
        )
    )
    ev = batch.filter(pc.equal(kind, KIND_EVENT))
    ev = ev.take(pa.array(_first_of_each(_codes(ev.column("event_id"))[0])))
    n = imp.num_rows
    window_us = round(attribution_window_h * 3_600e6)
    served_us, _ = _micros(imp.column("ts"))
    event_us, _ = _micros(ev.column("ts"))
    has_request = np.asarray(
        pc.is_valid(_array(ev.column("request_id"))).to_numpy(zero_copy_only=False), dtype=bool
    )

    users_items = _pair_codes(
        pa.concat_arrays([_array(imp.column("user_id")), _array(ev.column("user_id"))]),
        pa.concat_arrays([_array(imp.column("item_id")), _array(ev.column("item_id"))]),
    )

    # Events that name their request: matched on (request_id, item_id), from the same user.
    pairs = _pair_codes(
        pa.concat_arrays([_array(imp.column("request_id")), _array(ev.column("request_id"))]),
        pa.concat_arrays([_array(imp.column("item_id")), _array(ev.column("item_id"))]),
    )
    imp_pairs, ev_pairs = pairs[:n], pairs[n:]
    first = _first_of_each(imp_pairs)
    order = np.argsort(imp_pairs[first], kind="stable")
    known_pairs, known_rows = imp_pairs[first][order], first[order]
    slot = np.minimum(np.searchsorted(known_pairs, ev_pairs), len(known_pairs) - 1)
    match = has_request & (known_pairs[slot] == ev_pairs) & (users_items[known_rows[slot]] == users_items[n:])
    by_request = np.where(match, known_rows[slot], -1)
    late = by_request >= 0
    late[late] = event_us[late] > served_us[by_request[late]] + window_us
    by_request[late] = -1

    # Events without a request: the latest impression of the same (user, item) at or before them.
    loose = np.flatnonzero(~has_request)
    by_window = np.full(ev.num_rows, -1, dtype=np.int64)
    if len(loose):
        key = np.concatenate([users_items[:n], users_items[n:][loose]])
        ts = np.concatenate([served_us, event_us[loose]])
        # At equal times the impression sorts first: an event stamped as it was served counts.
        is_event = np.r_[np.zeros(n, dtype=np.int8), np.ones(len(loose), dtype=np.int8)]
        source = np.r_[np.arange(n), loose]
        by_time = np.lexsort((is_event, ts, key))
        key, ts, is_event, source = key[by_time], ts[by_time], is_event[by_time], source[by_time]
        # For each sorted row, the position of the latest impression at or before it.
        last_impression = np.maximum.accumulate(np.where(is_event == 0, np.arange(len(by_time)), -1))
        events_at = np.flatnonzero(is_event == 1)
        previous = last_impression[events_at]
        ok = previous >= 0
        ok[ok] = (key[previous[ok]] == key[events_at[ok]]) & (
            ts[events_at[ok]] - ts[previous[ok]] <= window_us
        )
        by_window[source[events_at[ok]]] = source[previous[ok]]

    row = np.where(by_request >= 0, by_request, by_window)
    attributed = row >= 0
    event_type = np.asarray(ev.column("event_type").to_pylist(), dtype=object)
    watch = _floats(ev.column("watch_time_s"))

    def count(mask: Bool) -> I64:
        return np.bincount(row[attributed & mask], minlength=n).astype(np.int64)

    carried = [name for name in LABELLED_SCHEMA.names if name in ROW_SCHEMA.names]
    out = imp.select(["ts" if name == "served_at" else name for name in ["served_at", *carried]])
    out = out.rename_columns(["served_at", *carried])
    for value, column in _ATTRIBUTED.items():
        out = out.append_column(column, pa.array(count(event_type == value) > 0))
    is_watch = attributed & (event_type == EventType.WATCH.value)
    out = out.append_column(
        "watch_s", pa.array(np.bincount(row[is_watch], weights=watch[is_watch], minlength=n))
    )
    out = out.append_column("events_by_request", pa.array(count(by_request >= 0)))
    out = out.append_column("events_by_window", pa.array(count(by_window >= 0)))
    return _conform(out, LABELLED_SCHEMA)


def user_metric_sums(labelled: pa.Table, *, total_events: float, catalogue_items: float) -> pa.Table:
    """Per-(arm, user) sums of every metric's numerator and denominator.

    Args:
        labelled: :data:`LABELLED_SCHEMA` rows holding every impression of their users.
        total_events: Events in the analysis window (popularity's denominator).
        catalogue_items: Items known (popularity's add-one smoothing).

    Returns:
        :data:`USER_SUMS_SCHEMA` rows.
    """
    if labelled.num_rows == 0:
        return USER_SUMS_SCHEMA.empty_table()
    unit = _pair_codes(labelled.column("arm"), labelled.column("user_id"))
    units, unit_of = np.unique(unit, return_inverse=True)
    k = len(units)

    def per_unit(values: F64 | Bool) -> F64:
        return group_sum(unit_of, values, k)

    clicked, liked = _bools(labelled.column("clicked")), _bools(labelled.column("liked"))
    hidden, not_interested = _bools(labelled.column("hidden")), _bools(labelled.column("not_interested"))
    reported = _bools(labelled.column("reported"))
    fallback = _array(labelled.column("fallback"))
    has_fallback = _bools(pc.and_(pc.is_valid(fallback), pc.not_equal(pc.fill_null(fallback, ""), "")))
    popularity = (_floats(labelled.column("item_events")) + 1.0) / max(total_events + catalogue_items, 1.0)
    served_us, _ = _micros(labelled.column("served_at"))
    created_us, known_age = _micros(labelled.column("item_created_at"))
    age_h = np.where(known_age, np.maximum(served_us - created_us, 0) / 3_600e6, 0.0)
    ones = np.ones(labelled.num_rows)
    sums: dict[str, F64] = {
        "impressions": per_unit(ones),
        "clicks": per_unit(clicked),
        "likes": per_unit(liked),
        "purchases": per_unit(_bools(labelled.column("purchased"))),
        "watch_s": per_unit(_floats(labelled.column("watch_s"))),
        "hides": per_unit(hidden),
        "not_interested": per_unit(not_interested),
        "reports": per_unit(reported),
        "negatives": per_unit(hidden | not_interested | reported),
        "fallbacks": per_unit(has_fallback),
        "novelty_n": per_unit(ones),
        "novelty_sum": per_unit(-np.log2(popularity)),
        "fresh_n": per_unit(known_age),
        "age_h_sum": per_unit(age_h),
        "events_by_request": per_unit(_floats(labelled.column("events_by_request"))),
        "events_by_window": per_unit(_floats(labelled.column("events_by_window"))),
    }

    # Diversity of each list: the share of its item pairs whose categories differ.
    request, _ = _codes(labelled.column("request_id"))
    category, categories = _codes(labelled.column("category"))
    known = category >= 0
    n_requests = int(request.max()) + 1
    size = np.bincount(request[known], minlength=n_requests).astype(np.float64)
    same_keys, same_counts = np.unique(
        request[known] * (len(categories) + 1) + category[known], return_counts=True
    )
    same_pairs = group_sum(same_keys // (len(categories) + 1), same_counts * (same_counts - 1.0), n_requests)
    is_list = size >= 2
    diversity = np.where(is_list, 1.0 - same_pairs / np.maximum(size * (size - 1), 1.0), 0.0)
    owner = np.zeros(n_requests, dtype=np.int64)
    owner[request] = unit_of
    sums["lists"] = group_sum(owner, is_list, k)
    sums["diversity_sum"] = group_sum(owner, diversity, k)

    first = np.unique(unit_of, return_index=True)[1].astype(np.int64)
    user_code, _ = _codes(labelled.column("user_id"))
    distinct_arms = np.bincount(user_code[first], minlength=int(user_code.max()) + 1)
    sums["multi_arm"] = (distinct_arms[user_code[first]] > 1).astype(np.float64)
    columns = [labelled.column("arm").take(pa.array(first)), labelled.column("user_id").take(pa.array(first))]
    columns += [pa.array(sums[c]) for c in SUM_COLUMNS]
    return pa.Table.from_arrays(columns, schema=USER_SUMS_SCHEMA)


def arm_partial_sums(user_sums: pa.Table) -> pa.Table:
    """Per-arm sums, squares and cross products of a batch of users (:data:`PARTIAL_SCHEMA`)."""
    if user_sums.num_rows == 0:
        return PARTIAL_SCHEMA.empty_table()
    arm, arms = _codes(user_sums.column("arm"))
    k = len(arms)
    values = {c: _floats(user_sums.column(c)) for c in SUM_COLUMNS}

    def per_arm(weights: F64) -> pa.Array:
        return pa.array(group_sum(arm, weights, k))

    columns = [arms.cast(pa.string()), per_arm(np.ones(user_sums.num_rows))]
    columns += [per_arm(values[c]) for c in SUM_COLUMNS]
    columns += [per_arm(values[c] ** 2) for c in SUM_COLUMNS]
    columns += [per_arm(values[y] * values[x]) for y, x in CROSS_COLUMNS]
    return pa.Table.from_arrays(columns, schema=PARTIAL_SCHEMA)


@dataclass(frozen=True)
class ArmTotals:
    """Everything the report needs about one arm, summed over all users.

    Attributes:
        users: Users with at least one impression in the arm.
        sums: Total of each :data:`SUM_COLUMNS` column.
        moments: Delta-method moments of each metric of :data:`METRICS`.
    """

    users: int
    sums: dict[str, float]
    moments: dict[str, RatioMoments]


def arm_totals(partials: pa.Table) -> dict[str, ArmTotals]:
    """Combine per-batch :data:`PARTIAL_SCHEMA` rows into totals per arm."""
    if partials.num_rows == 0:
        return {}
    numeric = [name for name in PARTIAL_SCHEMA.names if name != "arm"]
    grouped = partials.group_by("arm").aggregate([(name, "sum") for name in numeric])
    out = {}
    for row in grouped.to_pylist():
        value = {name: float(row[f"{name}_sum"]) for name in numeric}
        moments = {
            m.name: RatioMoments(
                n=value["users"],
                sum_x=value[f"sum__{m.denominator}"],
                sum_y=value[f"sum__{m.numerator}"],
                sum_xx=value[f"sq__{m.denominator}"],
                sum_yy=value[f"sq__{m.numerator}"],
                sum_xy=value[f"cross__{m.numerator}__{m.denominator}"],
            )
            for m in METRICS
        }
        out[str(row["arm"])] = ArmTotals(
            users=int(value["users"]), sums={c: value[f"sum__{c}"] for c in SUM_COLUMNS}, moments=moments
        )
    return out


ARM_ITEM_SCHEMA: Final = pa.schema([pa.field("arm", pa.string()), pa.field("item_id", pa.string())])


def distinct_arm_items(batch: pa.Table) -> pa.Table:
    """Distinct ``(arm, item_id)`` pairs of a batch of impression rows (for coverage)."""
    pairs = batch.select(["arm", "item_id"]).group_by(["arm", "item_id"]).aggregate([])
    return _conform(pairs, ARM_ITEM_SCHEMA)


def items_per_arm(pairs: pa.Table) -> dict[str, int]:
    """Distinct items per arm from ``(arm, item_id)`` pairs, repeats allowed."""
    counts = distinct_arm_items(pairs).group_by("arm").aggregate([("item_id", "count")])
    return {
        str(arm): int(n)
        for arm, n in zip(
            counts.column("arm").to_pylist(), counts.column("item_id_count").to_pylist(), strict=True
        )
    }


# -- the report ------------------------------------------------------------------------------


def build_report(
    experiment: ExperimentConfig,
    totals: dict[str, ArmTotals],
    *,
    items_served: dict[str, int],
    catalogue_items: int,
    config: AnalysisConfig,
    window: AnalysisWindow,
) -> ExperimentReport:
    """Estimates, comparisons, SRM and guardrails from per-arm totals.

    Args:
        experiment: The experiment's configuration (arms, shares, control).
        totals: Per-arm totals (:func:`arm_totals`).
        items_served: Distinct items served per arm.
        catalogue_items: Items in the catalogue (coverage's denominator).
        config: Significance level, SRM threshold and guardrails.
        window: The window actually analysed.

    Returns:
        The report.
    """
    alpha = config.alpha
    control = experiment.control_arm.name
    configured = [arm.name for arm in experiment.arms]
    arms = configured + sorted(a for a in totals if a not in configured)
    notes: list[str] = []
    if control not in totals:
        notes.append(f"the control arm {control!r} has no impressions: nothing can be compared")
    results = []
    for arm in arms:
        total = totals.get(arm)
        metrics = {}
        for m in METRICS:
            moments = total.moments[m.name] if total is not None else _EMPTY
            vs = None
            if arm != control and control in totals and total is not None:
                vs = compare(moments, totals[control].moments[m.name], alpha)
            metrics[m.name] = MetricResult(
                name=m.name,
                estimate=ratio_estimate(moments, alpha),
                vs_control=vs,
                higher_is_better=m.higher_is_better,
                description=m.description,
            )
        served = items_served.get(arm, 0)
        results.append(
            ArmResult(
                arm=arm,
                is_control=arm == control,
                users=total.users if total is not None else 0,
                impressions=int(total.sums["impressions"]) if total is not None else 0,
                items_served=served,
                coverage=served / catalogue_items if catalogue_items else math.nan,
                metrics=metrics,
            )
        )
    srm = srm_check(
        {a: t.users for a, t in totals.items()}, experiment.shares, threshold=config.srm_threshold
    )
    if srm.flagged:
        notes.append(
            "sample-ratio mismatch: the users per arm do not match the configured shares, so "
            "assignment or logging is broken and the comparisons are not trustworthy"
        )
    guardrails = []
    for guardrail in config.guardrails:
        metric = METRIC_BY_NAME[guardrail.metric]
        for result in results:
            if result.is_control:
                continue
            vs = result.metrics[metric.name].vs_control
            guardrails.append(_guardrail(guardrail, metric, result.arm, vs))
    notes.append("latency guardrail not evaluated: the impressions log carries no latency")
    multi = sum(t.sums["multi_arm"] for t in totals.values())
    if multi:
        notes.append(f"{int(multi)} users appear in more than one arm (counted in each): check assignment")
    by_request = sum(t.sums["events_by_request"] for t in totals.values())
    by_window = sum(t.sums["events_by_window"] for t in totals.values())
    return ExperimentReport(
        experiment_id=experiment.id,
        control=control,
        alpha=alpha,
        window_start=window.start,
        window_end=window.end,
        attribution_window_h=window.attribution_window_h,
        arms=results,
        srm=srm,
        guardrails=guardrails,
        diagnostics={
            "events_attributed_by_request_id": int(by_request),
            "events_attributed_by_time_window": int(by_window),
            "users_in_several_arms": int(multi),
            "catalogue_items": int(catalogue_items),
        },
        notes=notes,
    )


_EMPTY: Final = RatioMoments(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def _guardrail(guardrail: Guardrail, metric: RatioMetric, arm: str, vs: Comparison | None) -> GuardrailResult:
    def result(status: Literal["pass", "fail", "no_data"]) -> GuardrailResult:
        relative = vs.relative if vs is not None and math.isfinite(vs.relative.value) else None
        return GuardrailResult(
            metric=metric.name, arm=arm, status=status, relative=relative, tolerance=guardrail.tolerance
        )

    if vs is None or not math.isfinite(vs.difference.value):
        return result("no_data")
    # How much worse the treatment is at least, in the metric's bad direction: the favourable end
    # of the interval. Relative when the control's value allows it, else absolute (control at 0).
    change = vs.relative if math.isfinite(vs.relative.value) else vs.difference
    tolerance = guardrail.tolerance if change is vs.relative else 0.0
    worse_at_least = -change.ci_high if metric.higher_is_better else change.ci_low
    return result("fail" if worse_at_least > tolerance else "pass")


# -- Ray Data plumbing -----------------------------------------------------------------------


def _read(lake: Lake, table: str, columns: Sequence[str]) -> ray.data.Dataset:
    files = lake.files(table)
    if not files:
        raise LookupError(f"the lake at {lake.home} has no {table!r} rows")
    return lake.ray_dataset(files, columns)


def collect(dataset: ray.data.Dataset, schema: pa.Schema) -> pa.Table:
    """Gather a (small) dataset's blocks on the driver as one table with ``schema``."""
    import ray

    tables = [t for t in ray.get(dataset.to_arrow_refs()) if t.num_rows]
    if not tables:
        return schema.empty_table()
    return pa.concat_tables([_conform(t, schema) for t in tables])


def _per_key(dataset: ray.data.Dataset, key: str, partitions: int, fn: Any) -> ray.data.Dataset:
    """Hash-partition by ``key`` and call ``fn`` once per partition, which holds every row of its keys."""
    return dataset.repartition(partitions, keys=[key]).map_batches(
        fn, batch_format="pyarrow", batch_size=None
    )


def item_stats(lake: Lake, window: AnalysisWindow, partitions: int) -> ray.data.Dataset:
    """Per-item attributes and popularity (shuffle 1), materialised because it is used twice."""
    items = _read(lake, ITEMS.name, ["item_id", "category", "status", "created_at", "updated_at"])
    events = _read(lake, EVENTS.name, ["item_id", "ts"])
    stamped = events.map_batches(
        functools.partial(popularity_rows, start=window.start, end=window.events_end), batch_format="pyarrow"
    )
    rows = items.map_batches(item_input_rows, batch_format="pyarrow").union(stamped)
    stats: ray.data.Dataset = _per_key(rows, "item_id", partitions, summarise_items).materialize()
    return stats


def exposure_dataset(
    lake: Lake, *, experiment_id: str | None, window: AnalysisWindow, arm: str | None = None
) -> ray.data.Dataset:
    """The experiment's impressions in the window as :data:`ROW_SCHEMA` rows (lazy)."""
    columns = [f.name for f in IMPRESSIONS.schema if f.name != "sources"]
    project = functools.partial(
        exposure_rows, experiment_id=experiment_id, arm=arm, start=window.start, end=window.end
    )
    return _read(lake, IMPRESSIONS.name, columns).map_batches(project, batch_format="pyarrow")


def labelled_impressions(
    lake: Lake,
    *,
    experiment_id: str | None,
    window: AnalysisWindow,
    partitions: int,
    arm: str | None = None,
    stats: ray.data.Dataset | None = None,
) -> ray.data.Dataset:
    """The experiment's impressions labelled with their attributed events, partitioned by user.

    Every block of the result holds every impression of its users, so per-user work can follow
    with ``map_batches(..., batch_size=None)``.

    Args:
        lake: The lake.
        experiment_id: Only this experiment's impressions; all when ``None``.
        window: Serving and attribution window.
        partitions: Hash partitions per shuffle.
        arm: Only this arm's impressions.
        stats: :func:`item_stats` when already computed.

    Returns:
        A lazy dataset of :data:`LABELLED_SCHEMA` rows.
    """
    stats = stats if stats is not None else item_stats(lake, window, partitions)
    exposures = exposure_dataset(lake, experiment_id=experiment_id, arm=arm, window=window)
    items = stats.map_batches(item_stat_rows, batch_format="pyarrow")
    with_items = _per_key(exposures.union(items), "item_id", partitions, attach_items)
    columns = [f.name for f in EVENTS.schema if f.name in ROW_SCHEMA.names]
    events = _read(lake, EVENTS.name, columns).map_batches(
        functools.partial(event_rows, start=window.start, end=window.events_end), batch_format="pyarrow"
    )
    label = functools.partial(label_impressions, attribution_window_h=window.attribution_window_h)
    return _per_key(with_items.union(events), "user_id", partitions, label)


def resolve_window(experiment: ExperimentConfig, window: AnalysisWindow) -> AnalysisWindow:
    """The window given, with unset bounds taken from the experiment's schedule."""
    return AnalysisWindow(
        start=window.start if window.start is not None else experiment.start,
        end=window.end if window.end is not None else experiment.end,
        attribution_window_h=window.attribution_window_h,
    )


def analyse_experiment(
    lake: Lake, experiment: ExperimentConfig, config: AnalysisConfig | None = None
) -> ExperimentReport:
    """Analyse an experiment from the lake with Ray Data.

    Ray must be initialised (or it starts a local instance on first use).

    Args:
        lake: The lake holding ``impressions``, ``events`` and ``items``.
        experiment: The experiment's configuration (arms and shares for the SRM check).
        config: Analysis settings; defaults when omitted.

    Returns:
        The report.

    Raises:
        LookupError: A table the analysis needs is empty, or the experiment has no impressions.
    """
    config = config if config is not None else AnalysisConfig()
    window = resolve_window(experiment, config.window)
    stats = item_stats(lake, window, config.partitions)
    counts = collect(stats.map_batches(item_counts, batch_format="pyarrow"), ITEM_COUNTS_SCHEMA)
    known_items, total_events, catalogue = (
        sum(counts.column(c).to_pylist()) for c in ITEM_COUNTS_SCHEMA.names
    )
    labelled = labelled_impressions(
        lake, experiment_id=experiment.id, window=window, partitions=config.partitions, stats=stats
    )
    sums = functools.partial(
        user_metric_sums, total_events=float(total_events), catalogue_items=float(known_items)
    )
    partials = labelled.map_batches(sums, batch_format="pyarrow", batch_size=None).map_batches(
        arm_partial_sums, batch_format="pyarrow", batch_size=None
    )
    totals = arm_totals(collect(partials, PARTIAL_SCHEMA))
    if not totals:
        raise LookupError(f"no impressions of experiment {experiment.id!r} in the analysed window")
    pairs = collect(
        exposure_dataset(lake, experiment_id=experiment.id, window=window).map_batches(
            distinct_arm_items, batch_format="pyarrow"
        ),
        ARM_ITEM_SCHEMA,
    )
    return build_report(
        experiment,
        totals,
        items_served=items_per_arm(pairs),
        catalogue_items=catalogue,
        config=config,
        window=window,
    )
