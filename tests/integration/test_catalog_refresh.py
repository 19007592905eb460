"""The ingress's content index: rebuilt when the catalog was written to, left alone otherwise."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from core.schema import Item, ItemStatus, ItemType, utcnow
from deployments.recommender.options import ServingOptions
from deployments.recommender.service import RecommendationService
from features.catalog_changes import CatalogChanges
from features.redis_store import RedisStore
from retrieval.sources.content_index import ContentIndex, catalog_version
from tests.integration.no_models import NoModels


def _item(item_id: str, age_h: float, status: ItemStatus = ItemStatus.ACTIVE) -> Item:
    return Item(
        item_id=item_id,
        item_type=ItemType.VIDEO,
        title=f"title of {item_id}",
        category="hiking",
        creator_id="c1",
        status=status,
        created_at=utcnow() - timedelta(hours=age_h),
    )


def test_every_write_of_item_records_moves_the_catalog_version(store: RedisStore) -> None:
    changes = CatalogChanges(store)
    assert catalog_version(store) is None
    changes.put_item(_item("a", 3))
    first = catalog_version(store)
    changes.put_items([_item("b", 2), _item("c", 1)])
    second = catalog_version(store)
    changes.put_item(_item("a", 3, ItemStatus.REMOVED))
    third = catalog_version(store)
    assert first is not None and second is not None and third is not None
    assert first < second < third
    index = ContentIndex.load(store)
    assert index.version == third
    assert index.newest == ("c", "b"), "newest first; the removed item is not indexed"


def test_the_ingress_rebuilds_its_content_index_only_after_a_catalog_write(store: RedisStore) -> None:
    changes = CatalogChanges(store)
    changes.put_items([_item("old", 5), _item("older", 9)])
    service = RecommendationService(store, NoModels(), ServingOptions())

    async def body() -> list[ContentIndex]:
        seen = []
        try:
            await service._refresh_catalog()
            seen.append(service._content_index)
            await service._refresh_catalog()
            seen.append(service._content_index)
            changes.put_item(_item("new", 0.1))
            await service._refresh_catalog()
            seen.append(service._content_index)
            # A catalog written without the version (by a release before it existed) is rebuilt
            # on every refresh, as it was then.
            store.client.delete(store.keys.items_version())
            await service._refresh_catalog()
            seen.append(service._content_index)
            return seen
        finally:
            await store.aclient.aclose()
            await store.apool.disconnect()

    first, unchanged, after_write, unversioned = asyncio.run(body())
    assert set(first.entries) == {"old", "older"}
    assert unchanged is first, "an unchanged catalog is not read again"
    assert after_write is not first and set(after_write.entries) == {"new", "old", "older"}
    assert service._newest[:3] == ["new", "old", "older"]
    assert unversioned is not after_write and unversioned.version is None
    found, missing = service._cache.get_many(["new", "old", "never-written"])
    assert set(found) == {"new", "old"} and found["new"] is unversioned.entries["new"]
    assert missing == ["never-written"], "the catalog cache is backed by the index's entries"
