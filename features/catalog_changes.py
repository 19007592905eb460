"""Catalog changes made through the API: written to Redis (serving truth) and the lake's change-logs.

The online write happens first and synchronously, so the very next request sees it (seed section
18). The change-log row then goes to that table's catalog stream (``{ns}:stream:catalog:items``,
``…:users``, ``…:edges``), which the lake writer appends to the table of the same name; offline
jobs read the latest row per key from there.

Entry format: field ``"e"`` holds the row in the table's lake schema as JSON, timestamps as ISO
strings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

from redis.typing import EncodableT, FieldT

from core.schema import Item, ItemStatus, SocialEdge, UserProfile, utcnow
from core.tables import EDGES, ITEMS, USERS
from features.catalog import CatalogStore, item_row
from features.redis_store import RedisStore
from features.stream_codec import ENTRY_FIELD, EntryDecodeError

CHANGELOG_TABLES: Final = (ITEMS.name, USERS.name, EDGES.name)


class UnknownEntity(LookupError):
    """The item or user named in a change does not exist (or was erased)."""


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


_TIME_COLUMNS: Final = frozenset({"created_at", "updated_at"})


def encode_change(row: Mapping[str, Any]) -> dict[FieldT, EncodableT]:
    """The catalog-stream fields of one change-log row."""
    return {ENTRY_FIELD: json.dumps(row, separators=(",", ":"), default=str)}


def decode_change(fields: Mapping[str, str] | None) -> dict[str, Any]:
    """The change-log row of a catalog-stream entry, timestamps parsed, ready for the lake.

    Raises:
        EntryDecodeError: The entry is gone, has no ``"e"`` field, or is not a JSON object.
    """
    if fields is None or ENTRY_FIELD not in fields:
        raise EntryDecodeError("catalog entry is missing or has no 'e' field")
    try:
        row = json.loads(fields[ENTRY_FIELD])
    except json.JSONDecodeError as exc:
        raise EntryDecodeError(f"catalog entry is not JSON: {exc}") from exc
    if not isinstance(row, dict):
        raise EntryDecodeError("catalog entry is not a JSON object")
    for column in _TIME_COLUMNS & row.keys():
        row[column] = datetime.fromisoformat(row[column].replace("Z", "+00:00"))
    return row


def _user_row(user: UserProfile, *, erased: bool = False) -> dict[str, Any]:
    return {
        "user_id": user.user_id,
        "age_group": user.age_group.value,
        "region": user.region,
        "language": user.language,
        "interests": list(user.interests),
        "personalization": user.personalization,
        "erased": erased,
        "created_at": _iso(user.created_at),
        "updated_at": _iso(user.updated_at),
    }


class CatalogChanges:
    """Every catalog, moderation and privacy write the API makes.

    Args:
        store: The online store.
    """

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self.catalog = CatalogStore(store)
        self.keys = store.keys

    def _log(self, table: str, row: Mapping[str, Any]) -> None:
        with self._store.guard():
            self._store.client.xadd(self.keys.stream_catalog(table), encode_change(row))

    # Items.

    def put_item(self, item: Item) -> Item:
        """Create or replace an item."""
        row = item_row(item, utcnow())
        self.catalog.put_item_rows([row])
        self._log(ITEMS.name, row)
        return item

    def put_items(self, items: list[Item]) -> int:
        """Create or replace many items (bulk upload) with one change-log entry each."""
        now = utcnow()
        rows = [item_row(item, now) for item in items]
        self.catalog.put_item_rows(rows)
        with self._store.guard():
            pipe = self._store.client.pipeline(transaction=False)
            for row in rows:
                pipe.xadd(self.keys.stream_catalog(ITEMS.name), encode_change(row))
            pipe.execute()
        return len(items)

    def get_item(self, item_id: str) -> Item:
        """The item, or :class:`UnknownEntity`."""
        record = self.catalog.get_item(item_id)
        if record is None:
            raise UnknownEntity(f"item {item_id!r} does not exist")
        record = dict(record)
        record["metadata"] = json.loads(record.pop("metadata_json", None) or "{}")
        record.pop("updated_at", None)
        return Item.model_validate(record)

    def set_item_status(self, item_id: str, status: ItemStatus) -> Item:
        """Remove or restore an item everywhere, effective on the next request."""
        item = self.get_item(item_id).model_copy(update={"status": status})
        return self.put_item(item)

    # Global moderation.

    def block_item(self, item_id: str, blocked: bool) -> None:
        """Block (or unblock) one item for every user."""
        with self._store.guard():
            op = self._store.client.sadd if blocked else self._store.client.srem
            op(self.keys.blocked_items(), item_id)

    def block_creator(self, creator_id: str, blocked: bool) -> None:
        """Block (or unblock) every item of one creator for every user."""
        with self._store.guard():
            op = self._store.client.sadd if blocked else self._store.client.srem
            op(self.keys.blocked_creators_global(), creator_id)

    # Users.

    def put_user(self, user: UserProfile) -> UserProfile:
        """Create or replace a user profile (onboarding interests, privacy)."""
        user = user.model_copy(update={"updated_at": utcnow()})
        # The write skips an erased user, so its answer is the erasure check too.
        if not self.catalog.put_user(user):
            raise UnknownEntity(f"user {user.user_id!r} was erased")
        self._log(USERS.name, _user_row(user))
        return user

    def get_user(self, user_id: str) -> UserProfile:
        """The user profile, or :class:`UnknownEntity`."""
        record = self.catalog.get_user(user_id)
        if record is None:
            raise UnknownEntity(f"user {user_id!r} does not exist")
        return UserProfile.model_validate(record)

    def set_personalization(self, user_id: str, enabled: bool) -> UserProfile:
        """Turn personalisation on or off for a user, effective on the next request."""
        user = self.get_user(user_id).model_copy(update={"personalization": enabled})
        return self.put_user(user)

    def block_creator_for_user(self, user_id: str, creator_id: str, blocked: bool) -> None:
        """Block (or unblock) a creator for one user only."""
        with self._store.guard():
            op = self._store.client.sadd if blocked else self._store.client.srem
            op(self.keys.blocked_creators(user_id), creator_id)

    def erase_user(self, user_id: str) -> None:
        """Erase a user's online data and record a tombstone that offline jobs honour."""
        record = self.catalog.get_user(user_id)
        self.catalog.erase_user(user_id)
        now = utcnow()
        profile = UserProfile(user_id=user_id, created_at=now, updated_at=now)
        if record is not None:
            profile = UserProfile.model_validate(record).model_copy(update={"updated_at": now})
        self._log(USERS.name, _user_row(profile, erased=True))

    # Social graph.

    def follow(self, edge: SocialEdge) -> None:
        """Record a follow (``active=True``) or an unfollow (``active=False``)."""
        self.catalog.put_edge(edge)
        now = utcnow()
        self._log(
            EDGES.name,
            {
                "follower_id": edge.follower_id,
                "followee_id": edge.followee_id,
                "active": edge.active,
                "updated_at": _iso(now),
            },
        )
