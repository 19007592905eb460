"""The ``item_engagement`` view: how much and how well an item engages, over sliding windows.

State (JSON, one per item)::

    {
      "v": 1,
      "h": {"<hour index>": {event_type: n}},        # hourly buckets, last 7 days
      "m": {"<5-minute index>": {event_type: n}},    # 5-minute buckets, last hour
      "latest": null | ts,                           # newest event time folded in
      "totals": {event_type: n},                     # all time
      "trend_ref": null | ts, "trend": {"all": score as of trend_ref}
    }

A bucket index is ``floor(ts / width)``; keys are strings so the state is the same after a JSON
round trip. Buckets are pruned relative to ``latest`` (never the wall clock), which keeps the fold
a pure function of its events: an event older than what is kept is not bucketed, whichever order
it arrives in.

Windows: a bucket counts toward a window when any part of it lies within ``[now - window, now]``,
so a windowed count never misses an event inside the window and may include events up to one
bucket width (5 minutes for 1 h; 1 hour for 24 h and 7 d) older than the window.

Rates are Beta-smoothed: ``(successes + m * k) / (trials + k)`` with prior mean ``m`` and strength
``k`` (pseudo-trials), i.e. ``a = m * k`` and ``b = (1 - m) * k``. Trials are the item's ``view``
events in the window, but never fewer than the successes, so clients that send clicks without
views cannot push a rate above 1.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from datetime import datetime
from typing import Final

from core.schema import EventType
from core.types import FeatureValue
from features.decay import add_decayed, decay
from features.params import DAY_S, HOUR_S, FeatureParams
from features.records import EventRecord, ItemInfo
from features.spec import ItemLookup, State

VERSION: Final = 1

HOUR_WIDTH_S: Final = HOUR_S
MINUTE_WIDTH_S: Final = 300.0
HOURS_KEPT: Final = 7 * 24
MINUTES_KEPT: Final = 12

WINDOWS: Final[dict[str, float]] = {"1h": HOUR_S, "24h": DAY_S, "7d": 7 * DAY_S}
"""Window suffix to length in seconds."""

_TREND_KEY: Final = "all"

_WINDOW_FEATURES: Final = {
    suffix: tuple((t.value, f"{t.value}_count_{suffix}") for t in EventType) for suffix in WINDOWS
}


def empty() -> State:
    """A new item's state."""
    return {"v": VERSION, "h": {}, "m": {}, "latest": None, "totals": {}, "trend_ref": None, "trend": {}}


def entity_key(event: EventRecord, item: ItemInfo | None) -> str | None:
    """The item an event updates."""
    return event.item_id


def _bucket(buckets: dict[str, dict[str, int]], index: int, event_type: str) -> None:
    counts = buckets.setdefault(str(index), {})
    counts[event_type] = counts.get(event_type, 0) + 1


def _prune(buckets: dict[str, dict[str, int]], oldest: int) -> None:
    for key in [k for k in buckets if int(k) < oldest]:
        del buckets[key]


def _fold_one(state: State, event: EventRecord, params: FeatureParams) -> None:
    t = event.ts_s
    kind = event.kind
    hour = math.floor(t / HOUR_WIDTH_S)
    minute = math.floor(t / MINUTE_WIDTH_S)
    latest = state["latest"]
    if latest is None or t > latest:
        # Every bucket kept is at or after the cut-offs of the current ``latest`` (each move of
        # ``latest`` prunes to its cut-offs, and nothing older is added), so a newer event whose
        # bucket index is unchanged leaves nothing to prune: skip the scan of every bucket.
        if latest is None or hour > math.floor(latest / HOUR_WIDTH_S):
            _prune(state["h"], hour - HOURS_KEPT)
        if latest is None or minute > math.floor(latest / MINUTE_WIDTH_S):
            _prune(state["m"], minute - MINUTES_KEPT)
        state["latest"] = latest = t
    if hour >= math.floor(latest / HOUR_WIDTH_S) - HOURS_KEPT:
        _bucket(state["h"], hour, kind)
    if minute >= math.floor(latest / MINUTE_WIDTH_S) - MINUTES_KEPT:
        _bucket(state["m"], minute, kind)
    totals: dict[str, int] = state["totals"]
    totals[kind] = totals.get(kind, 0) + 1
    weight = params.trending_weight(event.event_type, event.watch_time_s)
    if weight > 0.0:
        state["trend_ref"] = add_decayed(
            state["trend"], state["trend_ref"], _TREND_KEY, weight, t, params.trending_half_life_s
        )


def update(state: State, events: Sequence[EventRecord], items: ItemLookup, params: FeatureParams) -> State:
    """Fold an item's events into its state.

    Args:
        state: The current state (``{}`` for a new item); not modified.
        events: Events on this item, in any order; folded in ``(ts, event_id)`` order.
        items: Catalog lookup (unused: item engagement needs no catalog data).
        params: Fold constants.

    Returns:
        The new state.
    """
    new = copy.deepcopy(state) if state else empty()
    for event in sorted(events, key=lambda e: e.sort_key):
        _fold_one(new, event, params)
    return new


def window_counts(
    buckets: dict[str, dict[str, int]], width_s: float, window_s: float, now_s: float
) -> dict[str, int]:
    """Event counts by type of the buckets overlapping ``[now_s - window_s, now_s]``.

    Args:
        buckets: Bucket index (string) to counts by event type.
        width_s: Bucket width.
        window_s: Window length.
        now_s: Window end, epoch seconds. Buckets after it (client clock skew) are counted.

    Returns:
        Event type to count.
    """
    totals: dict[str, int] = {}
    start = now_s - window_s
    for key, counts in buckets.items():
        if (int(key) + 1) * width_s > start:
            for kind, n in counts.items():
                totals[kind] = totals.get(kind, 0) + n
    return totals


def smoothed_rate(successes: int, trials: int, prior_mean: float, prior_strength: float) -> float:
    """A Beta-smoothed rate: ``(successes + m * k) / (max(trials, successes) + k)``.

    Args:
        successes: Observed successes (clicks, likes).
        trials: Observed trials (views).
        prior_mean: Prior rate ``m``.
        prior_strength: Pseudo-trials ``k`` the prior is worth.

    Returns:
        The posterior mean rate, in ``(0, 1)``.
    """
    return (successes + prior_mean * prior_strength) / (max(trials, successes) + prior_strength)


def serve(state: State, now: datetime, params: FeatureParams) -> dict[str, FeatureValue]:
    """The served ``item_engagement`` features as of ``now``.

    Args:
        state: The item's state (``{}`` serves every default).
        now: Serving instant, timezone-aware.
        params: Fold constants.

    Returns:
        Feature name to value; see :data:`features.definitions.ITEM_ENGAGEMENT` for each meaning.
    """
    state = state or empty()
    now_s = now.timestamp()
    values: dict[str, FeatureValue] = {}
    hour_1h = window_counts(state["m"], MINUTE_WIDTH_S, WINDOWS["1h"], now_s)
    day, week = _day_and_week_counts(state["h"], now_s)
    for suffix, counts in (("1h", hour_1h), ("24h", day), ("7d", week)):
        for kind, name in _WINDOW_FEATURES[suffix]:
            values[name] = counts.get(kind, 0)
    views = week.get(EventType.VIEW.value, 0)
    values["ctr_7d"] = smoothed_rate(
        week.get(EventType.CLICK.value, 0), views, params.ctr_prior_mean, params.ctr_prior_strength
    )
    values["like_rate_7d"] = smoothed_rate(
        week.get(EventType.LIKE.value, 0), views, params.like_prior_mean, params.like_prior_strength
    )
    ref = state["trend_ref"]
    values["trending_score"] = (
        0.0 if ref is None else decay(state["trend"][_TREND_KEY], ref, now_s, params.trending_half_life_s)
    )
    values["event_count_total"] = sum(state["totals"].values())
    values["last_event_ts"] = 0.0 if state["latest"] is None else float(state["latest"])
    return values


def _day_and_week_counts(
    hours: dict[str, dict[str, int]], now_s: float
) -> tuple[dict[str, int], dict[str, int]]:
    """:func:`window_counts` of the hourly buckets for 24 h and for 7 d, in one pass over them."""
    day: dict[str, int] = {}
    week: dict[str, int] = {}
    day_start = now_s - WINDOWS["24h"]
    week_start = now_s - WINDOWS["7d"]
    for key, counts in hours.items():
        end = (int(key) + 1) * HOUR_WIDTH_S
        if end > week_start:
            for kind, n in counts.items():
                week[kind] = week.get(kind, 0) + n
            if end > day_start:
                for kind, n in counts.items():
                    day[kind] = day.get(kind, 0) + n
    return day, week
