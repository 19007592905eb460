from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pytest

from core.schema import Item, ItemStatus, ItemType, SocialEdge, UserProfile
from core.tables import EDGES, ITEMS, USERS
from features.catalog import CatalogStore, item_row
from features.redis_store import RedisStore

pytestmark = pytest.mark.integration

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def items_table(
    n: int, *, status: str = "active", creator: str | None = None, at: datetime = T0 + timedelta(minutes=1)
) -> pa.Table:
    rows = [
        {
            "item_id": f"i{k}",
            "item_type": "video",
            "title": f"Item {k}",
            "category": "music" if k % 2 else "sport",
            "tags": ["a", "b"],
            "creator_id": creator or f"c{k % 10}",
            "status": status,
            "created_at": T0,
            "metadata_json": json.dumps({"k": k}),
            "updated_at": at,
        }
        for k in range(n)
    ]
    return pa.Table.from_pylist(rows, schema=ITEMS.schema)


def users_table(ids: list[str], *, erased: bool = False, at: datetime = T0) -> pa.Table:
    rows = [
        {
            "user_id": uid,
            "age_group": "25_34",
            "region": "us-9",
            "language": "en",
            "interests": ["music"],
            "personalization": True,
            "erased": erased,
            "created_at": T0,
            "updated_at": at,
        }
        for uid in ids
    ]
    return pa.Table.from_pylist(rows, schema=USERS.schema)


def edges_table(pairs: list[tuple[str, str, bool]], at: datetime = T0) -> pa.Table:
    rows = [{"follower_id": a, "followee_id": b, "active": act, "updated_at": at} for a, b, act in pairs]
    return pa.Table.from_pylist(rows, schema=EDGES.schema)


@pytest.fixture
def catalog(store: RedisStore) -> CatalogStore:
    return CatalogStore(store)


def test_items_round_trip(catalog: CatalogStore) -> None:
    assert catalog.put_items(items_table(20)) == 20
    record = catalog.get_item("i3")
    assert record is not None
    assert record["title"] == "Item 3"
    assert record["metadata"] == {"k": 3}
    assert record["created_at"] == "2024-01-01T00:00:00Z"
    # A record is the JSON form of the boundary model.
    assert Item.model_validate(record).item_type is ItemType.VIDEO
    got = catalog.get_items(["i0", "nope", "i19"])
    assert [r["item_id"] if r else None for r in got] == ["i0", None, "i19"]
    assert catalog.counts() == {"items": 20, "active_items": 20, "users": 0, "edges": 0}
    assert catalog.creator_items("c3") == {"i3", "i13"}


def test_removed_items_are_not_active(catalog: CatalogStore, store: RedisStore) -> None:
    catalog.put_items(items_table(5))
    removed = items_table(2, status="removed", at=T0 + timedelta(hours=1))
    catalog.put_items(removed)
    assert catalog.counts()["items"] == 5
    assert catalog.counts()["active_items"] == 3
    assert not catalog.is_active("i0")
    assert catalog.is_active("i4")
    assert store.client.smembers(store.keys.removed_items()) == {"i0", "i1"}
    assert "i0" not in catalog.creator_items("c0")
    record = catalog.get_item("i0")
    assert record is not None and record["status"] == "removed"
    # Restoring it makes it active again and takes it off the removed set.
    catalog.put_item(Item.model_validate({**record, "status": "active"}))
    assert catalog.is_active("i0")
    assert "i0" not in store.client.smembers(store.keys.removed_items())
    assert "i0" in catalog.creator_items("c0")


def test_latest_row_per_item_wins_and_creator_moves(catalog: CatalogStore) -> None:
    old = items_table(1, creator="alice")
    new = items_table(1, creator="bob", at=T0 + timedelta(days=1))
    # The newer row comes first in the batch: updated_at decides, not position.
    assert catalog.put_items(pa.concat_tables([new, old])) == 1
    record = catalog.get_item("i0")
    assert record is not None and record["creator_id"] == "bob"
    assert catalog.creator_items("bob") == {"i0"}
    catalog.put_items(items_table(1, creator="carol"))
    assert catalog.creator_items("bob") == set()
    assert catalog.creator_items("carol") == {"i0"}


def test_single_writes(catalog: CatalogStore) -> None:
    item = Item(
        item_id="v1", item_type=ItemType.VIDEO, title="Hello", category="music", creator_id="c1", tags=["x"]
    )
    catalog.put_item(item)
    record = catalog.get_item("v1")
    assert record is not None and Item.model_validate(record) == item
    catalog.put_user(UserProfile(user_id="u1", interests=["music"]))
    user = catalog.get_user("u1")
    assert user is not None and user["interests"] == ["music"]
    assert UserProfile.model_validate(user).user_id == "u1"
    catalog.put_edge(SocialEdge(follower_id="u1", followee_id="c1"))
    assert catalog.following("u1") == {"c1"}
    assert catalog.followers("c1") == {"u1"}
    assert catalog.counts() == {"items": 1, "active_items": 1, "users": 1, "edges": 1}
    catalog.put_item(item.model_copy(update={"status": ItemStatus.REMOVED}))
    assert catalog.counts()["active_items"] == 0


def test_item_rows_in_one_call_keep_the_last_per_id(catalog: CatalogStore) -> None:
    first = Item(item_id="v1", item_type=ItemType.VIDEO, title="A", category="music", creator_id="ann")
    moved = first.model_copy(update={"creator_id": "bob", "title": "B"})
    other = Item(item_id="v2", item_type=ItemType.POST, title="C", category="art", creator_id="ann")
    # More than one pipeline's worth, so the chunks meet in one call.
    filler = [other.model_copy(update={"item_id": f"f{k}"}) for k in range(2_500)]
    catalog.put_item_rows([item_row(item, T0) for item in (first, *filler, other, moved)])
    record = catalog.get_item("v1")
    assert record is not None and record["creator_id"] == "bob" and record["title"] == "B"
    assert catalog.creator_items("bob") == {"v1"}
    assert "v1" not in catalog.creator_items("ann")
    assert len(catalog.creator_items("ann")) == 2_501
    assert catalog.counts()["active_items"] == 2_502


def test_users_round_trip(catalog: CatalogStore) -> None:
    assert catalog.put_users(users_table(["u1", "u2"])) == 2
    user = catalog.get_user("u2")
    assert user is not None
    assert user["age_group"] == "25_34" and user["region"] == "us-9" and user["personalization"] is True
    assert catalog.get_user("u3") is None
    assert catalog.counts()["users"] == 2


def test_edges_follow_and_unfollow(catalog: CatalogStore) -> None:
    catalog.put_edges(edges_table([("u1", "u2", True), ("u1", "u3", True), ("u2", "u3", True)]))
    assert catalog.following("u1") == {"u2", "u3"}
    assert catalog.followers("u3") == {"u1", "u2"}
    assert catalog.counts()["edges"] == 3
    # Re-applying the same follows changes nothing.
    catalog.put_edges(edges_table([("u1", "u2", True)]))
    assert catalog.counts()["edges"] == 3
    catalog.put_edges(edges_table([("u1", "u3", False)], at=T0 + timedelta(hours=1)))
    assert catalog.following("u1") == {"u2"}
    assert catalog.followers("u3") == {"u2"}
    assert catalog.counts()["edges"] == 2
    # Unfollowing twice does not count twice.
    catalog.put_edge(SocialEdge(follower_id="u1", followee_id="u3", active=False))
    assert catalog.counts()["edges"] == 2


def test_follow_then_unfollow_in_one_batch(catalog: CatalogStore) -> None:
    batch = pa.concat_tables(
        [edges_table([("u1", "u2", False)], at=T0 + timedelta(hours=1)), edges_table([("u1", "u2", True)])]
    )
    catalog.put_edges(batch)
    assert catalog.following("u1") == set()
    assert catalog.counts()["edges"] == 0


def test_self_loop_is_refused(catalog: CatalogStore) -> None:
    with pytest.raises(ValueError, match="itself"):
        catalog.put_edges(edges_table([("u1", "u1", True)]))


def test_erasure_is_sticky(catalog: CatalogStore, store: RedisStore) -> None:
    catalog.put_users(users_table(["u1", "u2", "u3"]))
    catalog.put_edges(edges_table([("u1", "u2", True), ("u3", "u1", True), ("u2", "u3", True)]))
    store.sadd_many({store.keys.exclusions("u1"): ["i1"]})
    catalog.put_users(users_table(["u1"], erased=True, at=T0 + timedelta(days=1)))
    assert catalog.get_user("u1") is None
    assert catalog.is_erased("u1")
    assert catalog.followers("u2") == set()
    assert catalog.following("u3") == set()
    assert store.smembers_many([store.keys.exclusions("u1")]) == [set()]
    assert catalog.counts() == {"items": 0, "active_items": 0, "users": 2, "edges": 1}
    # An old import replayed does not bring the user back, nor their edges.
    catalog.put_users(users_table(["u1"]))
    catalog.put_edges(edges_table([("u1", "u2", True)]))
    assert catalog.get_user("u1") is None
    assert catalog.counts()["edges"] == 1


def test_bad_table_is_refused(catalog: CatalogStore) -> None:
    with pytest.raises(ValueError, match="item_id"):
        catalog.put_items(pa.table({"title": ["x"]}))


def test_10k_items_load_in_chunks(catalog: CatalogStore) -> None:
    # Speed is measured by benchmarks, not asserted here; this checks the chunked paths agree.
    catalog.put_items(items_table(10_000))
    assert catalog.counts()["active_items"] == 10_000
    records = catalog.get_items([f"i{k}" for k in range(10_000)])
    assert all(r is not None for r in records)
