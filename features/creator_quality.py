"""The ``creator_quality`` view: how a creator's items are received, good and bad.

State (JSON, one per creator)::

    {"v": 1, "counts": {event_type: n}, "last_ts": null | ts}

Quality is a smoothed positive-engagement rate minus penalties for negative feedback::

    n        = all events on the creator's items
    positive = (clicks + likes + shares + purchases + watches + m * k) / (n + k)
    hidden   = (hides + not_interested) / (n + k)
    reported = reports / (n + k)
    quality  = positive - hide_penalty * hidden - report_penalty * reported

with prior mean ``m`` and strength ``k`` (``quality_prior_*``): a new creator starts at ``m`` and
moves toward their observed rates as events accumulate. Events on items unknown to the catalog
have no creator and are not counted.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from datetime import datetime
from typing import Final

from core.schema import EventType
from core.types import FeatureValue
from features.params import FeatureParams
from features.records import EventRecord, ItemInfo
from features.spec import ItemLookup, State

VERSION: Final = 1

POSITIVE: Final[frozenset[EventType]] = frozenset(
    {EventType.CLICK, EventType.LIKE, EventType.SHARE, EventType.PURCHASE, EventType.WATCH}
)
HIDDEN: Final[frozenset[EventType]] = frozenset({EventType.HIDE, EventType.NOT_INTERESTED})

_POSITIVE_KINDS: Final = tuple(t.value for t in POSITIVE)
_HIDDEN_KINDS: Final = tuple(t.value for t in HIDDEN)


def empty() -> State:
    """A new creator's state."""
    return {"v": VERSION, "counts": {}, "last_ts": None}


def entity_key(event: EventRecord, item: ItemInfo | None) -> str | None:
    """The creator an event updates: the creator of its item, when the catalog knows the item."""
    return None if item is None else item.creator_id


def update(state: State, events: Sequence[EventRecord], items: ItemLookup, params: FeatureParams) -> State:
    """Fold events on a creator's items into the creator's state.

    Args:
        state: The current state (``{}`` for a new creator); not modified.
        events: Events on this creator's items, in any order.
        items: Catalog lookup (unused: the caller already routed events to their creator).
        params: Fold constants.

    Returns:
        The new state.
    """
    new = copy.deepcopy(state) if state else empty()
    counts: dict[str, int] = new["counts"]
    last_ts = new["last_ts"]
    for event in sorted(events, key=lambda e: e.sort_key):
        kind = event.kind
        counts[kind] = counts.get(kind, 0) + 1
        t = event.ts_s
        if last_ts is None or t > last_ts:
            last_ts = t
    new["last_ts"] = last_ts
    return new


def serve(state: State, now: datetime, params: FeatureParams) -> dict[str, FeatureValue]:
    """The served ``creator_quality`` features (``now`` is unused: the view has no time decay).

    Args:
        state: The creator's state (``{}`` serves the prior).
        now: Serving instant.
        params: Fold constants.

    Returns:
        Feature name to value; see :data:`features.definitions.CREATOR_QUALITY` for each meaning.
    """
    state = state or empty()
    counts: dict[str, int] = state["counts"]
    total = sum(counts.values())
    positive = sum([counts.get(kind, 0) for kind in _POSITIVE_KINDS])
    hidden = sum([counts.get(kind, 0) for kind in _HIDDEN_KINDS])
    reports = counts.get(EventType.REPORT.value, 0)
    denominator = total + params.quality_prior_strength
    positive_rate = (positive + params.quality_prior_mean * params.quality_prior_strength) / denominator
    hidden_rate = hidden / denominator
    report_rate = reports / denominator
    return {
        "quality_score": positive_rate
        - params.hide_penalty * hidden_rate
        - params.report_penalty * report_rate,
        "positive_rate": positive_rate,
        "hide_rate": hidden_rate,
        "report_rate": report_rate,
        "event_count": total,
        "report_count": reports,
        "last_event_ts": 0.0 if state["last_ts"] is None else float(state["last_ts"]),
    }
