"""Replays the lake's latest events into the online store, to warm a fresh namespace.

An import writes events to the lake and the catalog to Redis, but the online features (recent
history, counters, trending) are the stream processor's work and start empty. Replaying the tail
of the lake through :meth:`OnlineFeatureStore.apply_events` (the stream processor's own fold)
fills them. Replays are idempotent on ``event_id``, like every consumer.

Imported worlds are often in the past (a synthetic span, a public dataset); trending and decayed
counters would then read as stale. ``retime_to`` shifts every replayed event by one offset so the
newest lands at that instant: relative order and spacing are kept, the features look current.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

import pyarrow.compute as pc

from core.lake import Lake
from features.online_store import OnlineFeatureStore
from features.records import EventRecord


def replay_events(
    lake: Lake,
    online: OnlineFeatureStore,
    *,
    max_events: int = 50_000,
    retime_to: datetime | None = None,
    batch_size: int = 1000,
) -> int:
    """Apply the newest ``max_events`` events of the lake to the online store, oldest first.

    Args:
        lake: The lake to read ``events`` from.
        online: The online store to fold them into.
        max_events: How many of the newest events to replay.
        retime_to: When given, events are shifted so the newest one happened at this instant.
        batch_size: Events per ``apply_events`` transaction.

    Returns:
        Events applied now (duplicates of earlier replays are not counted).
    """
    assert max_events >= 1 and batch_size >= 1, "max_events and batch_size must be positive"
    events = lake.read("events")
    if events.num_rows == 0:
        return 0
    order = pc.sort_indices(events, sort_keys=[("ts", "ascending"), ("event_id", "ascending")])
    events = events.take(order).slice(max(0, events.num_rows - max_events))
    rows = events.to_pylist()
    records = [EventRecord.from_row(row) for row in rows]
    if retime_to is not None:
        shift = retime_to - records[-1].ts
        records = [replace(record, ts=record.ts + shift) for record in records]
    applied = 0
    for start in range(0, len(records), batch_size):
        applied += online.apply_events(records[start : start + batch_size]).applied
    return applied
