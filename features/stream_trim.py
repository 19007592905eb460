"""Trimming streams without losing entries a consumer group still needs.

A stream may only lose entries that every group that reads it has finished. For each group the
safe boundary is its oldest pending entry when it has any (that entry and everything after it
must stay), or else its last-delivered id (everything before it was delivered and acknowledged).
The stream is trimmed with ``XTRIM MINID`` to the smallest boundary over all groups, which keeps
the boundary entry itself. When a group that should read the stream does not exist yet (its
consumer never started), nothing is trimmed: it will read from the start when it comes. On the
events stream the feature partitions' groups are required, unless the group of a processor
folding every partition (``features``) is there in their place.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import redis

from features.catalog_changes import CHANGELOG_TABLES
from features.metrics import StreamMetrics, default_metrics
from features.partitions import groups as partition_groups
from features.redis_store import RedisStore
from features.stream_codec import FEATURES_GROUP, LAKE_GROUP, entry_key

logger = logging.getLogger(__name__)


def required_groups(store: RedisStore) -> dict[str, tuple[str, ...]]:
    """Stream key to the consumer groups that must have finished an entry before it is trimmed."""
    keys = store.keys
    return {
        keys.stream_events(): (*partition_groups(), LAKE_GROUP),
        keys.stream_impressions(): (LAKE_GROUP,),
        **{keys.stream_catalog(table): (LAKE_GROUP,) for table in CHANGELOG_TABLES},
    }


def safe_trim_id(store: RedisStore, stream: str, groups: Sequence[str]) -> str | None:
    """The ``MINID`` up to which a stream may be trimmed.

    Args:
        store: The Redis store.
        stream: Full stream key.
        groups: Groups that must exist before anything is trimmed.

    Returns:
        The smallest safe boundary over the stream's groups, or ``None`` when nothing may be
        trimmed (no stream, a required group missing, or nothing delivered yet).
    """
    client = store.client
    try:
        infos = client.xinfo_groups(stream)
    except redis.ResponseError:
        return None  # no such stream
    present = {str(info["name"]) for info in infos}
    missing = [g for g in groups if g not in present]
    if FEATURES_GROUP in present:
        # One processor folds every partition there: its group stands in for theirs.
        missing = [g for g in missing if g not in partition_groups()]
    if missing or not infos:
        if missing:
            logger.info("not trimming %s: groups %s do not exist yet", stream, missing)
        return None
    bounds: list[str] = []
    for info in infos:
        if int(info["pending"]) > 0:
            bounds.append(str(client.xpending(stream, info["name"])["min"]))
        else:
            bounds.append(str(info["last-delivered-id"]))
    boundary = min(bounds, key=entry_key)
    return None if entry_key(boundary) == (0, 0) else boundary


def trim_acknowledged(
    store: RedisStore,
    stream: str | None = None,
    *,
    groups: Sequence[str] | None = None,
    metrics: StreamMetrics | None = None,
) -> int:
    """Trim entries every consumer group has finished.

    Args:
        store: The Redis store.
        stream: Full stream key; both the events and the impressions stream when omitted.
        groups: Groups that must exist for ``stream`` before it is trimmed; those of
            :func:`required_groups` when omitted (none for other streams).
        metrics: Where to count trimmed entries; the process-wide metrics when omitted.

    Returns:
        How many entries were removed.

    Raises:
        StoreUnavailable: Redis could not be reached.
    """
    plan = required_groups(store)
    if stream is not None:
        plan = {stream: tuple(groups) if groups is not None else plan.get(stream, ())}
    counter = (metrics or default_metrics()).trimmed_entries
    removed = 0
    with store.guard():
        for key, needed in plan.items():
            boundary = safe_trim_id(store, key, needed)
            if boundary is None:
                continue
            # Exact trimming costs only the entries it removes; "~" would keep up to a whole
            # macro node of finished entries, which makes the length gauge harder to read.
            n = int(store.client.xtrim(key, minid=boundary, approximate=False))
            removed += n
            if n:
                counter.labels(key.rsplit(":", 1)[-1]).inc(n)
    return removed
