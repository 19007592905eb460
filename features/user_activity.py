"""The ``user_activity`` view: what a user did recently and which categories they lean to.

State (JSON, one per user)::

    {
      "v": 1,
      "recent": [[ts, event_id, item_id, event_type], ...],   # newest first, capped
      "session": null | {"start": ts, "last": ts, "events": n,
                         "items": [[ts, event_id, item_id], ...]},  # distinct items, newest first
      "aff_ref": null | ts, "aff": {category: affinity as of aff_ref},
      "last_cat": null | [ts, event_id, category],
      "counts": {event_type: n},
      "last_ts": null | ts
    }

Times are epoch seconds. Order ties are broken by ``event_id`` so any run picks the same order.
Sessions are exact for events folded in time order; an event that arrives after a newer one
extends the current session only when it lies within ``session_gap_s`` of it, and is otherwise
taken to belong to an earlier, finished session.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

from core.schema import NEGATIVE_FEEDBACK, EventType
from core.types import FeatureValue
from features.decay import add_decayed, decay
from features.params import FeatureParams
from features.records import EventRecord, ItemInfo
from features.spec import ItemLookup, State

VERSION: Final = 1

CONSUMPTION: Final[frozenset[EventType]] = frozenset(
    {EventType.VIEW, EventType.CLICK, EventType.WATCH, EventType.LIKE, EventType.SHARE, EventType.PURCHASE}
)
"""Events that mean the user looked at the item: they set the last viewed category."""

_NOT_SESSION_ITEMS: Final = NEGATIVE_FEEDBACK | {EventType.SKIP}

# The same sets as event type values: folds test ``EventRecord.kind``, a plain string, because
# hashing an enum member runs Python code and the folds test every event.
_CONSUMPTION_KINDS: Final = frozenset(t.value for t in CONSUMPTION)
_NOT_SESSION_KINDS: Final = frozenset(t.value for t in _NOT_SESSION_ITEMS)
_COUNT_FEATURES: Final = tuple((t.value, f"{t.value}_count") for t in EventType)


def empty() -> State:
    """A new user's state."""
    return {
        "v": VERSION,
        "recent": [],
        "session": None,
        "aff_ref": None,
        "aff": {},
        "last_cat": None,
        "counts": {},
        "last_ts": None,
    }


def entity_key(event: EventRecord, item: ItemInfo | None) -> str | None:
    """The user an event updates."""
    return event.user_id


def _insert_recent(recent: list[list[Any]], event: EventRecord, limit: int) -> None:
    key = event.sort_key
    at = 0
    while at < len(recent) and (recent[at][0], recent[at][1]) > key:
        at += 1
    if at >= limit or (at < len(recent) and (recent[at][0], recent[at][1]) == key):
        return  # older than everything kept, or this very event again
    recent.insert(at, [event.ts_s, event.event_id, event.item_id, event.kind])
    del recent[limit:]


def _fold_session(state: State, event: EventRecord, params: FeatureParams) -> None:
    t = event.ts_s
    session = state["session"]
    if session is None or t > session["last"] + params.session_gap_s:
        session = {"start": t, "last": t, "events": 0, "items": []}
        state["session"] = session
    elif t < session["start"] - params.session_gap_s:
        return
    else:
        session["start"] = min(session["start"], t)
        session["last"] = max(session["last"], t)
    session["events"] += 1
    if event.kind in _NOT_SESSION_KINDS:
        return
    items: list[list[Any]] = session["items"]
    key = event.sort_key
    for index, (ts, event_id, item_id) in enumerate(items):
        if item_id == event.item_id:
            if (ts, event_id) >= key:
                return  # the item is already listed at a newer position
            del items[index]
            break
    at = 0
    while at < len(items) and (items[at][0], items[at][1]) > key:
        at += 1
    if at < params.session_items_max:
        items.insert(at, [t, event.event_id, event.item_id])
        del items[params.session_items_max :]


def _fold_one(state: State, event: EventRecord, item: ItemInfo | None, params: FeatureParams) -> None:
    t = event.ts_s
    _insert_recent(state["recent"], event, params.recent_items_max)
    _fold_session(state, event, params)
    counts: dict[str, int] = state["counts"]
    kind = event.kind
    counts[kind] = counts.get(kind, 0) + 1
    last_ts = state["last_ts"]
    state["last_ts"] = t if last_ts is None or t > last_ts else last_ts
    if item is None:
        return  # without a catalog entry the category is unknown
    weight = params.affinity_weight(event.event_type, event.watch_time_s)
    if weight != 0.0:
        state["aff_ref"] = add_decayed(
            state["aff"],
            state["aff_ref"],
            item.category,
            weight,
            t,
            params.affinity_half_life_s,
            params.affinity_floor,
        )
    last = state["last_cat"]
    if kind in _CONSUMPTION_KINDS and (last is None or (last[0], last[1]) < event.sort_key):
        state["last_cat"] = [t, event.event_id, item.category]


def update(state: State, events: Sequence[EventRecord], items: ItemLookup, params: FeatureParams) -> State:
    """Fold a user's events into their state.

    Args:
        state: The current state (``{}`` for a new user); not modified.
        events: Events of this user, in any order; folded in ``(ts, event_id)`` order.
        items: Catalog info of the events' items; missing items leave affinities unchanged.
        params: Fold constants.

    Returns:
        The new state.
    """
    new = copy.deepcopy(state) if state else empty()
    for event in sorted(events, key=lambda e: e.sort_key):
        _fold_one(new, event, items.get(event.item_id), params)
    return new


def serve(state: State, now: datetime, params: FeatureParams) -> dict[str, FeatureValue]:
    """The served ``user_activity`` features as of ``now``.

    Args:
        state: The user's state (``{}`` serves every default).
        now: Serving instant, timezone-aware.
        params: Fold constants.

    Returns:
        Feature name to value; see :data:`features.definitions.USER_ACTIVITY` for each meaning.
    """
    state = state or empty()
    now_s = now.timestamp()
    recent: list[list[Any]] = state["recent"]
    session = state["session"]
    live = session is not None and now_s - session["last"] <= params.session_gap_s
    ref = state["aff_ref"]
    half_life_s = params.affinity_half_life_s
    affinities = sorted(
        [
            (decay(value, ref, now_s, half_life_s), category)
            for category, value in state["aff"].items()
            if value > 0
        ],
        key=_strongest_first,
    )[: params.top_categories_max]
    counts: dict[str, int] = state["counts"]
    last_cat = state["last_cat"]
    last_ts = state["last_ts"]
    # List comprehensions, not generators, and no conversions of the entries: this runs for every
    # user of every stream batch, and the folds store ids as str and instants as float already.
    values: dict[str, FeatureValue] = {
        "recent_item_ids": tuple([entry[2] for entry in recent]),
        "recent_event_types": tuple([entry[3] for entry in recent]),
        "recent_event_ts": tuple([entry[0] for entry in recent]),
        "session_item_ids": tuple([entry[2] for entry in session["items"]]) if live else (),
        "session_event_count": int(session["events"]) if live else 0,
        "session_duration_s": float(session["last"] - session["start"]) if live else 0.0,
        "top_categories": tuple([category for _, category in affinities]),
        "top_category_affinities": tuple([value for value, _ in affinities]),
        "last_viewed_category": "" if last_cat is None else str(last_cat[2]),
        "last_event_ts": 0.0 if last_ts is None else float(last_ts),
        "event_count": sum(counts.values()),
    }
    for kind, name in _COUNT_FEATURES:
        values[name] = counts.get(kind, 0)
    return values


def _strongest_first(pair: tuple[float, str]) -> tuple[float, str]:
    return (-pair[0], pair[1])
