"""The catalog in Redis: the serving truth for items, users and the follow graph.

Writers hand it Arrow tables in the lake schemas of :mod:`core.tables` (``ITEMS``, ``USERS``,
``EDGES``), or single :mod:`core.schema` models; both go through the same code path.

What is kept (key names in :mod:`features.keys`):

- one packed JSON record per item and per user, holding the fields of ``core.schema.Item`` and
  ``core.schema.UserProfile`` in snake_case, timestamps as ISO 8601 strings (``…Z``); an item's
  ``title`` may be null (items known only from an event file have none);
- sets of all item ids, active item ids, each creator's *active* item ids and all user ids;
  a removed item leaves the active and creator sets and joins the global removed-items set;
- the follow graph as a following set and a followers set per user, plus an edge counter;
  an edge row with ``active=False`` removes the edge.

Within one call, rows are applied in ``updated_at`` order and the last row per key wins, so a
change-log batch can be passed as it is. Erasure is sticky: a user row with ``erased=True``
deletes the user's record, exclusions, features and edges and adds a tombstone; later rows for an
erased user (and edges touching one) are skipped, so replaying an old import cannot bring the
user back.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from core.lake import conform
from core.schema import EntityType, Item, ItemStatus, SocialEdge, UserProfile, utcnow
from core.tables import EDGES, ITEMS, USERS, TableSpec
from features.redis_store import RedisStore

_CHUNK_ROWS = 2000
"""Rows per pipeline: big enough to amortise round trips, small enough to bound client memory."""

_SET_CHUNK = 1000
"""Members per SADD/SREM."""


def _iso(value: datetime) -> str:
    utc = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    # The same spelling pydantic writes, so records from tables and from models look alike.
    return utc.isoformat().replace("+00:00", "Z")


def item_row(item: Item, updated_at: datetime) -> dict[str, Any]:
    """The ``ITEMS`` lake row of one item, timestamps as ISO text: as stored and as change-logged."""
    return {
        "item_id": item.item_id,
        "item_type": item.item_type.value,
        "title": item.title,
        "category": item.category,
        "tags": list(item.tags),
        "creator_id": item.creator_id,
        "status": item.status.value,
        "created_at": _iso(item.created_at),
        "metadata_json": json.dumps(item.metadata, separators=(",", ":")),
        "updated_at": _iso(updated_at),
    }


def _iso_column(column: pa.ChunkedArray) -> pa.ChunkedArray:
    # Vectorised _iso: Arrow always prints six fraction digits, pydantic omits an all-zero fraction.
    text = pc.strftime(column, format="%Y-%m-%dT%H:%M:%S")
    return pc.binary_join_element_wise(pc.replace_substring_regex(text, r"\.000000$", ""), "Z", "")


def _rows(spec: TableSpec, table: pa.Table) -> list[dict[str, Any]]:
    """The table's rows in application order, the last row per key only, timestamps as ISO text."""
    data = conform(spec, table)
    # Arrow's sort is stable: rows with equal times keep their input order.
    data = data.take(pc.sort_indices(data, sort_keys=[("updated_at", "ascending")]))
    columns: dict[str, list[Any]] = {}
    for name in data.column_names:
        column = data.column(name)
        columns[name] = (_iso_column(column) if pa.types.is_timestamp(column.type) else column).to_pylist()
    latest: dict[tuple[Any, ...], dict[str, Any]] = {}
    for values in zip(*columns.values(), strict=True):
        row = dict(zip(columns, values, strict=True))
        identity = tuple(row[k] for k in spec.key)
        latest.pop(identity, None)  # re-inserting keeps the result in application order
        latest[identity] = row
    return list(latest.values())


def _chunked(values: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


class CatalogStore:
    """Reads and writes the catalog of one namespace.

    Args:
        store: The Redis store (its namespace decides the keys).
    """

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.keys = store.keys

    # -- items -------------------------------------------------------------------------------

    def put_items(self, table: pa.Table) -> int:
        """Write items from a table in the ``ITEMS`` schema.

        Args:
            table: Item rows; cast to the schema first.

        Returns:
            How many items were written (after keeping the latest row per ``item_id``).

        Raises:
            ValueError: The table does not fit the schema, or a ``metadata_json`` is not a JSON object.
            StoreUnavailable: Redis could not be reached.
        """
        rows = _rows(ITEMS, table)
        for part in _chunked(rows, _CHUNK_ROWS):
            self._write_items(part)
        return len(rows)

    def put_item(self, item: Item, *, updated_at: datetime | None = None) -> None:
        """Write one item.

        Args:
            item: The item.
            updated_at: When it changed; now when omitted.

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        self.put_item_rows([item_row(item, updated_at or utcnow())])

    def put_item_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Write rows of :func:`item_row` in pipelines of ``_CHUNK_ROWS``; a later row wins.

        Args:
            rows: Item rows, in the order they apply.

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        # The last row per id only, as for tables: one write must not leave an item in the sets
        # of a creator an earlier row of the same call named.
        latest = list({row["item_id"]: row for row in rows}.values())
        for part in _chunked(latest, _CHUNK_ROWS):
            self._write_items(part)

    def _write_items(self, rows: Sequence[Mapping[str, Any]]) -> None:
        keys = self.keys
        records: dict[str, dict[str, Any]] = {}
        active: list[str] = []
        removed: list[str] = []
        by_creator: dict[str, list[str]] = defaultdict(list)
        for row in rows:
            item_id = row["item_id"]
            raw_meta = row["metadata_json"]
            metadata = json.loads(raw_meta) if raw_meta else {}
            if not isinstance(metadata, dict):
                raise ValueError(f"item {item_id!r}: metadata_json must be a JSON object")
            records[keys.item(item_id)] = {
                "item_id": item_id,
                "item_type": row["item_type"],
                "title": row["title"],
                "category": row["category"],
                "tags": list(row["tags"] or ()),
                "creator_id": row["creator_id"],
                "status": row["status"],
                "created_at": row["created_at"],
                "metadata": metadata,
            }
            if row["status"] == ItemStatus.ACTIVE.value:
                active.append(item_id)
                by_creator[row["creator_id"]].append(item_id)
            else:
                removed.append(item_id)
        # An item that moved to another creator, or was removed, must leave its old creator's set.
        with self.store.guard():
            known = self.store.client.smismember(keys.items_all(), [r["item_id"] for r in records.values()])
        existing = [key for key, flag in zip(records, known, strict=True) if flag]
        stale: dict[str, list[str]] = defaultdict(list)
        for key, old in zip(existing, self.store.mget_json(existing), strict=True):
            record = records[key]
            if old is None:
                continue
            moved = old["creator_id"] != record["creator_id"]
            if moved or record["status"] != ItemStatus.ACTIVE.value:
                stale[old["creator_id"]].append(record["item_id"])

        ids = [record["item_id"] for record in records.values()]
        with self.store.guard():
            pipe = self.store.client.pipeline(transaction=False)
            for part in _chunked(list(records.items()), _SET_CHUNK):
                pipe.mset({key: json.dumps(value, separators=(",", ":")) for key, value in part})
            for part in _chunked(ids, _SET_CHUNK):
                pipe.sadd(keys.items_all(), *part)
            for creator, members in stale.items():
                pipe.srem(keys.creator_items(creator), *members)
            for part in _chunked(active, _SET_CHUNK):
                pipe.sadd(keys.items_active(), *part)
                pipe.srem(keys.removed_items(), *part)
            for part in _chunked(removed, _SET_CHUNK):
                pipe.srem(keys.items_active(), *part)
                pipe.sadd(keys.removed_items(), *part)
            for creator, members in by_creator.items():
                for part in _chunked(members, _SET_CHUNK):
                    pipe.sadd(keys.creator_items(creator), *part)
            # Last, so a reader that sees the new version also sees every record written with it.
            pipe.incr(keys.items_version())
            pipe.execute()

    def get_item(self, item_id: str) -> dict[str, Any] | None:
        """The record of one item, or ``None`` when it is not in the catalog.

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        return self.store.mget_json([self.keys.item(item_id)])[0]

    def get_items(self, item_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """The records of several items in one ``MGET``, in order; ``None`` for unknown ids.

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        return self.store.mget_json([self.keys.item(i) for i in item_ids])

    def is_active(self, item_id: str) -> bool:
        """Whether the item may be served.

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        with self.store.guard():
            return bool(self.store.client.sismember(self.keys.items_active(), item_id))

    def creator_items(self, creator_id: str) -> set[str]:
        """The ids of a creator's active items.

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        return self.store.smembers_many([self.keys.creator_items(creator_id)])[0]

    # -- users -------------------------------------------------------------------------------

    def put_users(self, table: pa.Table) -> int:
        """Write users from a table in the ``USERS`` schema; ``erased=True`` rows erase.

        Args:
            table: User rows; cast to the schema first.

        Returns:
            How many users were written or erased (erased users seen again are not counted).

        Raises:
            ValueError: The table does not fit the schema.
            StoreUnavailable: Redis could not be reached.
        """
        rows = _rows(USERS, table)
        applied = 0
        for part in _chunked(rows, _CHUNK_ROWS):
            applied += self._write_users(part)
        return applied

    def put_user(self, user: UserProfile) -> bool:
        """Write one user (skipped when the user was erased).

        Returns:
            Whether the user was written: ``False`` when erased.

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        written = self._write_users(
            [
                {
                    "user_id": user.user_id,
                    "age_group": user.age_group.value,
                    "region": user.region,
                    "language": user.language,
                    "interests": list(user.interests),
                    "personalization": user.personalization,
                    "erased": False,
                    "created_at": _iso(user.created_at),
                    "updated_at": _iso(user.updated_at),
                }
            ]
        )
        return written == 1

    def erase_user(self, user_id: str) -> None:
        """Erase a user from the online store and leave a tombstone.

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        self._erase([user_id])

    def _write_users(self, rows: Sequence[Mapping[str, Any]]) -> int:
        keys = self.keys
        erased_before = self._erased([row["user_id"] for row in rows])
        live = [row for row in rows if row["user_id"] not in erased_before]
        to_erase = [row["user_id"] for row in live if row["erased"]]
        records = {
            keys.user(row["user_id"]): {
                "user_id": row["user_id"],
                "age_group": row["age_group"] or "unknown",
                "region": row["region"],
                "language": row["language"],
                "interests": list(row["interests"] or ()),
                "personalization": row["personalization"],
                "created_at": row["created_at"],
                "updated_at": row["updated_at"],
            }
            for row in live
            if not row["erased"]
        }
        if records:
            ids = [record["user_id"] for record in records.values()]
            with self.store.guard():
                pipe = self.store.client.pipeline(transaction=False)
                for part in _chunked(list(records.items()), _SET_CHUNK):
                    pipe.mset({key: json.dumps(value, separators=(",", ":")) for key, value in part})
                for part in _chunked(ids, _SET_CHUNK):
                    pipe.sadd(keys.users_all(), *part)
                pipe.execute()
        if to_erase:
            self._erase(to_erase)
        return len(live)

    def _erased(self, user_ids: Sequence[str]) -> set[str]:
        if not user_ids:
            return set()
        with self.store.guard():
            flags = self.store.client.smismember(self.keys.erased_users(), list(user_ids))
        return {uid for uid, flag in zip(user_ids, flags, strict=True) if flag}

    def _erase(self, user_ids: Sequence[str]) -> None:
        keys = self.keys
        # Both directions in one round trip: the first half of the answer is following, the rest followers.
        sets = self.store.smembers_many(
            [keys.following(u) for u in user_ids] + [keys.followers(u) for u in user_ids]
        )
        following, followers = sets[: len(user_ids)], sets[len(user_ids) :]
        with self.store.guard():
            pipe = self.store.client.pipeline(transaction=False)
            dropped_edges = 0
            for uid, out, inc in zip(user_ids, following, followers, strict=True):
                for followee in out:
                    pipe.srem(keys.followers(followee), uid)
                for follower in inc:
                    pipe.srem(keys.following(follower), uid)
                dropped_edges += len(out) + len(inc)
                pipe.unlink(
                    keys.user(uid),
                    keys.following(uid),
                    keys.followers(uid),
                    keys.exclusions(uid),
                    keys.blocked_creators(uid),
                    keys.features(EntityType.USER, uid),
                    keys.feature_state(EntityType.USER, uid),
                )
            pipe.srem(keys.users_all(), *user_ids)
            pipe.sadd(keys.erased_users(), *user_ids)
            if dropped_edges:
                pipe.decrby(keys.edge_count(), dropped_edges)
            pipe.execute()

    def get_user(self, user_id: str) -> dict[str, Any] | None:
        """The record of one user, or ``None`` when unknown or erased.

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        return self.store.mget_json([self.keys.user(user_id)])[0]

    def is_erased(self, user_id: str) -> bool:
        """Whether the user was erased.

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        return bool(self._erased([user_id]))

    # -- edges -------------------------------------------------------------------------------

    def put_edges(self, table: pa.Table) -> int:
        """Write follow edges from a table in the ``EDGES`` schema; ``active=False`` unfollows.

        Args:
            table: Edge rows; cast to the schema first.

        Returns:
            How many edges were applied (after keeping the latest row per pair and skipping
            edges that touch an erased user).

        Raises:
            ValueError: The table does not fit the schema, or an edge links a user to itself.
            StoreUnavailable: Redis could not be reached.
        """
        rows = _rows(EDGES, table)
        loops = [row["follower_id"] for row in rows if row["follower_id"] == row["followee_id"]]
        if loops:
            raise ValueError(f"{len(loops)} edges link a user to itself, e.g. {loops[0]!r}")
        applied = 0
        for part in _chunked(rows, _CHUNK_ROWS):
            applied += self._write_edges(part)
        return applied

    def put_edge(self, edge: SocialEdge) -> None:
        """Write one follow (or, with ``active=False``, unfollow).

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        self._write_edges(
            [
                {
                    "follower_id": edge.follower_id,
                    "followee_id": edge.followee_id,
                    "active": edge.active,
                    "updated_at": _iso(edge.created_at),
                }
            ]
        )

    def _write_edges(self, rows: Sequence[Mapping[str, Any]]) -> int:
        keys = self.keys
        users = list({u for row in rows for u in (row["follower_id"], row["followee_id"])})
        erased = self._erased(users)
        live = [row for row in rows if row["follower_id"] not in erased and row["followee_id"] not in erased]
        if not live:
            return 0
        with self.store.guard():
            pipe = self.store.client.pipeline(transaction=False)
            for row in live:
                follower, followee = row["follower_id"], row["followee_id"]
                if row["active"]:
                    pipe.sadd(keys.following(follower), followee)
                    pipe.sadd(keys.followers(followee), follower)
                else:
                    pipe.srem(keys.following(follower), followee)
                    pipe.srem(keys.followers(followee), follower)
            replies = pipe.execute()
            # The following set is the edge's truth: its reply says whether the edge changed.
            delta = sum((1 if row["active"] else -1) * int(replies[2 * i]) for i, row in enumerate(live))
            if delta:
                self.store.client.incrby(keys.edge_count(), delta)
        return len(live)

    def following(self, user_id: str) -> set[str]:
        """The ids this user follows.

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        return self.store.smembers_many([self.keys.following(user_id)])[0]

    def followers(self, user_id: str) -> set[str]:
        """The ids of the users who follow this user.

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        return self.store.smembers_many([self.keys.followers(user_id)])[0]

    # -- totals ------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Catalog totals: ``items``, ``active_items``, ``users`` and ``edges``.

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        keys = self.keys
        with self.store.guard():
            pipe = self.store.client.pipeline(transaction=False)
            pipe.scard(keys.items_all())
            pipe.scard(keys.items_active())
            pipe.scard(keys.users_all())
            pipe.get(keys.edge_count())
            items, active, users, edges = pipe.execute()
        return {
            "items": int(items),
            "active_items": int(active),
            "users": int(users),
            "edges": int(edges or 0),
        }
