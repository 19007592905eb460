"""Creating the feature partitions' consumer groups, and taking over from the single processor's.

A partition group (see :mod:`features.partitions`) is normally created at the start of the events
stream, so it reads everything the stream still holds. A stream that the single processor of
earlier releases read still has that processor's group, ``features``, whose position marks what
it already applied. A partition group created then starts where that group stood: after its
last-delivered entry, or just before its oldest pending entry when it had some. Once every
partition group exists the old group is removed, or it would hold back trimming for good.

The old group's consumers must have stopped first: a live one would fold events the partitions
fold too, and once its group is gone it would create it again and reread the whole stream. So
a partition group waits until every consumer of the old group has been idle for ``idle_ms``,
the same rule by which a consumer's entries are claimed from it as dead. Entries the old
processor had applied but not acknowledged when it stopped are applied again by the
partitions (its markers are not theirs); a processor stopped cleanly acknowledges what it
applied, so there are none.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import redis

from features.partitions import LEGACY_GROUP
from features.stream_codec import entry_key

logger = logging.getLogger(__name__)

_BUSYGROUP = "BUSYGROUP"


def before(entry_id: str) -> str:
    """The largest entry id smaller than ``entry_id`` (a group created there delivers it next)."""
    ms, seq = entry_key(entry_id)
    if seq > 0:
        return f"{ms}-{seq - 1}"
    if ms == 0:
        return "0-0"
    return f"{ms - 1}-{2**64 - 1}"


def _create(client: redis.Redis, stream: str, group: str, start: str) -> None:
    try:
        client.xgroup_create(stream, group, id=start, mkstream=True)
    except redis.ResponseError as exc:
        if _BUSYGROUP not in str(exc):
            raise


def ensure_partition_group(
    client: redis.Redis,
    stream: str,
    group: str,
    *,
    partition_groups: Sequence[str],
    idle_ms: int,
    legacy: str = LEGACY_GROUP,
) -> bool:
    """Make sure a partition's consumer group exists (see the module docstring).

    Args:
        client: A sync Redis client decoding replies to ``str``.
        stream: Full key of the events stream.
        group: The partition's group.
        partition_groups: Every partition's group; the old group goes once all exist.
        idle_ms: How long the old group's consumers must have been idle before taking over.
        legacy: The old group's name.

    Returns:
        Whether the group exists now; ``False`` while a consumer of the old group is still
        active (call again later).
    """
    try:
        infos = {str(info["name"]): info for info in client.xinfo_groups(stream)}
    except redis.ResponseError:
        infos = {}  # no stream yet
    old = infos.get(legacy)
    if group not in infos:
        if old is None:
            _create(client, stream, group, "0")
            return True
        active = [c for c in client.xinfo_consumers(stream, legacy) if int(c["idle"]) < idle_ms]
        if active:
            logger.info(
                "group %s waits for group %s on %s: consumer %s was active %d ms ago",
                group,
                legacy,
                stream,
                active[0]["name"],
                int(active[0]["idle"]),
            )
            return False
        if int(old["pending"]) > 0:
            start = before(str(client.xpending(stream, legacy)["min"]))
        else:
            start = str(old["last-delivered-id"])
        _create(client, stream, group, start)
        logger.info("group %s created on %s at %s, where group %s stood", group, stream, start, legacy)
        infos[group] = {}
    if old is not None and all(g in infos for g in partition_groups):
        client.xgroup_destroy(stream, legacy)
        logger.info("group %s removed from %s: every partition group took over", legacy, stream)
    return True
