"""How the online features split between stream processors.

One processor folding every view of every event needs about 60 µs of its own CPU per event, so
it finishes some 7,000 events/s however many cores the node has. The work splits cleanly by
entity type, because every view belongs to one entity and no fold reads another entity's state:

- ``users``: the ``user_activity`` states and the exclusion sets (hide, not interested, report);
- ``items``: the ``item_engagement`` and ``creator_quality`` states and the trending sets.

Each partition is its own consumer group on the events stream (``features-users``,
``features-items``), read by its own processor, so the two run side by side in two processes
and each reads every event. Each has its own processed-event markers
(``{ns}:processed:{partition}:{minute}``, sets of event ids): a partition applies an event once
whatever the other has done with it.

A store that covers several partitions (the default :class:`features.online_store.OnlineFeatureStore`,
which replays and tests use) checks and writes the markers of all of them in one transaction and
counts an event as applied when any of its markers exists. That is exact as long as an event
with one partition's marker reaches every partition: true of stream entries, which every group
reads, and of replays, which write all markers at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from core.schema import EntityType


@dataclass(frozen=True, slots=True)
class FeaturePartition:
    """A share of the online features that one stream processor maintains.

    Attributes:
        name: Short name; part of the consumer group's name and of the processed markers' keys.
        entities: The entity types whose views it folds.
        trending: Whether it adds to the trending sorted sets.
        exclusions: Whether it adds negative feedback to the users' exclusion sets.
    """

    name: str
    entities: frozenset[EntityType]
    trending: bool
    exclusions: bool

    @property
    def group(self) -> str:
        """Its consumer group on the events stream."""
        return f"features-{self.name}"

    @property
    def report_name(self) -> str:
        """The name its processor's totals go by in the stream workers' report and in metrics."""
        return f"stream_processor_{self.name}"


USERS: Final = FeaturePartition("users", frozenset({EntityType.USER}), trending=False, exclusions=True)
"""User views and exclusion sets."""

ITEMS: Final = FeaturePartition(
    "items", frozenset({EntityType.ITEM, EntityType.CREATOR}), trending=True, exclusions=False
)
"""Item and creator views and trending sets."""

PARTITIONS: Final[tuple[FeaturePartition, ...]] = (USERS, ITEMS)
"""Every partition; together they cover every view and every side effect exactly once."""

LEGACY_GROUP: Final = "features"
"""The consumer group of the single processor that folded every view, before the split.

A partition group created while it exists starts where it stood (see
:func:`features.stream_groups.ensure_partition_group`), and it is removed once every partition
group exists.
"""


def partition(name: str) -> FeaturePartition:
    """The partition of a name.

    Raises:
        ValueError: No partition has that name.
    """
    for p in PARTITIONS:
        if p.name == name:
            return p
    raise ValueError(f"unknown feature partition {name!r}; known: {', '.join(p.name for p in PARTITIONS)}")


def groups(partitions: Sequence[FeaturePartition] = PARTITIONS) -> tuple[str, ...]:
    """The consumer groups of some partitions."""
    return tuple(p.group for p in partitions)
