"""Arrow schemas of the lake's tables: the offline contract shared by writers and readers.

Each table is append-only. ``events`` and ``impressions`` are facts, partitioned by the UTC date
of ``ts``/``served_at``; ``items``, ``users`` and ``edges`` are change-logs partitioned by the
date of ``updated_at``, where the latest row per key wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True)
class TableSpec:
    """A lake table: its schema, the column its date partition comes from, and its key.

    Attributes:
        name: Directory name under ``lake/``.
        schema: Arrow schema every appended batch is cast to.
        time_column: Timestamp column whose UTC date names the partition.
        key: Columns identifying one entity in a change-log; empty for fact tables.
        dedupe_key: Column whose repeats are the same fact delivered twice (fact tables).
    """

    name: str
    schema: pa.Schema
    time_column: str
    key: tuple[str, ...] = ()
    dedupe_key: str | None = None

    @property
    def is_changelog(self) -> bool:
        """Whether the latest row per key is the truth (catalog tables)."""
        return bool(self.key)


EVENTS: Final = TableSpec(
    name="events",
    schema=pa.schema(
        [
            pa.field("event_id", pa.string(), nullable=False),
            pa.field("user_id", pa.string(), nullable=False),
            pa.field("item_id", pa.string(), nullable=False),
            pa.field("event_type", pa.string(), nullable=False),
            pa.field("ts", TS, nullable=False),
            pa.field("surface", pa.string()),
            pa.field("device", pa.string()),
            pa.field("region", pa.string()),
            pa.field("request_id", pa.string()),
            pa.field("position", pa.int32()),
            pa.field("watch_time_s", pa.float32()),
            pa.field("rating", pa.float32()),
            pa.field("context_json", pa.string()),
        ]
    ),
    time_column="ts",
    dedupe_key="event_id",
)
"""Behaviour events. ``rating`` is kept from explicit-feedback imports (MovieLens); null otherwise."""

IMPRESSIONS: Final = TableSpec(
    name="impressions",
    schema=pa.schema(
        [
            pa.field("request_id", pa.string(), nullable=False),
            pa.field("user_id", pa.string(), nullable=False),
            pa.field("surface", pa.string(), nullable=False),
            pa.field("item_id", pa.string(), nullable=False),
            pa.field("position", pa.int32(), nullable=False),
            pa.field("score", pa.float32()),
            pa.field("sources", pa.list_(pa.string())),
            pa.field("propensity", pa.float32()),
            pa.field("model_version", pa.string()),
            pa.field("experiment_id", pa.string()),
            pa.field("arm", pa.string()),
            pa.field("fallback", pa.string()),
            pa.field("served_at", TS, nullable=False),
        ]
    ),
    time_column="served_at",
)
"""One row per served item: a recommendation log entry flattened for joins with events."""

ITEMS: Final = TableSpec(
    name="items",
    schema=pa.schema(
        [
            pa.field("item_id", pa.string(), nullable=False),
            pa.field("item_type", pa.string(), nullable=False),
            pa.field("title", pa.string()),
            pa.field("category", pa.string(), nullable=False),
            pa.field("tags", pa.list_(pa.string())),
            pa.field("creator_id", pa.string(), nullable=False),
            pa.field("status", pa.string(), nullable=False),
            pa.field("created_at", TS, nullable=False),
            pa.field("metadata_json", pa.string()),
            pa.field("updated_at", TS, nullable=False),
        ]
    ),
    time_column="updated_at",
    key=("item_id",),
)

USERS: Final = TableSpec(
    name="users",
    schema=pa.schema(
        [
            pa.field("user_id", pa.string(), nullable=False),
            pa.field("age_group", pa.string()),
            pa.field("region", pa.string()),
            pa.field("language", pa.string()),
            pa.field("interests", pa.list_(pa.string())),
            pa.field("personalization", pa.bool_(), nullable=False),
            pa.field("erased", pa.bool_(), nullable=False),
            pa.field("created_at", TS, nullable=False),
            pa.field("updated_at", TS, nullable=False),
        ]
    ),
    time_column="updated_at",
    key=("user_id",),
)
"""Users. ``erased=True`` is a tombstone: offline jobs drop every event of that user."""

EDGES: Final = TableSpec(
    name="edges",
    schema=pa.schema(
        [
            pa.field("follower_id", pa.string(), nullable=False),
            pa.field("followee_id", pa.string(), nullable=False),
            pa.field("active", pa.bool_(), nullable=False),
            pa.field("updated_at", TS, nullable=False),
        ]
    ),
    time_column="updated_at",
    key=("follower_id", "followee_id"),
)

TABLES: Final[dict[str, TableSpec]] = {t.name: t for t in (EVENTS, IMPRESSIONS, ITEMS, USERS, EDGES)}
