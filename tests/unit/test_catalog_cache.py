from __future__ import annotations

import pytest

from features.catalog_cache import CatalogCache, CatalogEntry


def _entry(item_id: str, category: str = "news", creator: str = "c1") -> CatalogEntry:
    return CatalogEntry.from_record(
        {
            "item_id": item_id,
            "category": category,
            "creator_id": creator,
            "tags": ["a", "b"],
            "created_at": "2026-11-01T00:00:00+00:00",
            "metadata": {"region": "eu"},
        }
    )


def test_entries_are_served_until_their_ttl_then_missed() -> None:
    clock = [0.0]
    cache = CatalogCache(ttl_s=10.0, clock=lambda: clock[0])
    cache.put_many([_entry("i1"), _entry("i2")])
    found, missing = cache.get_many(["i1", "i3", "i2", "i3"])
    assert set(found) == {"i1", "i2"} and missing == ["i3"]
    assert found["i1"].region == "eu" and found["i1"].tags == ("a", "b")
    clock[0] = 10.0
    found, missing = cache.get_many(["i1", "i2"])
    assert found == {} and missing == ["i1", "i2"]
    assert (cache.hits, cache.misses) == (2, 3)


def test_the_least_recently_used_entry_goes_first() -> None:
    cache = CatalogCache(max_entries=2)
    cache.put_many([_entry("i1"), _entry("i2")])
    cache.get_many(["i1"])
    cache.put_many([_entry("i3")])
    found, missing = cache.get_many(["i1", "i2", "i3"])
    assert set(found) == {"i1", "i3"} and missing == ["i2"]


def test_the_backing_answers_what_the_lru_cannot_and_a_fresher_read_wins() -> None:
    clock = [0.0]
    cache = CatalogCache(ttl_s=10.0, clock=lambda: clock[0])
    indexed = {"i1": _entry("i1", "news"), "i2": _entry("i2", "sport")}
    cache.back_with(indexed)
    cache.put_many([_entry("i2", "opera")])  # read from Redis after the index was built
    found, missing = cache.get_many(["i1", "i2", "gone"])
    assert found["i1"] is indexed["i1"]
    assert found["i2"].category == "opera"
    assert missing == ["gone"], "an item the index does not hold is read from Redis"
    clock[0] = 11.0
    found, _ = cache.get_many(["i2"])
    assert found["i2"] is indexed["i2"], "past its ttl the read entry gives way to the index's"
    cache.back_with({})
    assert cache.get_many(["i1"]) == ({}, ["i1"]), "a new index replaces the old one whole"
    cache.back_with(indexed)
    cache.clear()
    assert cache.get_many(["i1"]) == ({}, ["i1"]) and len(cache) == 0


@pytest.mark.parametrize(("max_entries", "ttl_s"), [(0, 1.0), (10, 0.0), (10, -1.0)])
def test_bad_settings_are_refused(max_entries: int, ttl_s: float) -> None:
    with pytest.raises(ValueError, match=r"max_entries|ttl_s"):
        CatalogCache(max_entries=max_entries, ttl_s=ttl_s)
