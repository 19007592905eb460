"""Where a partition group starts when it takes over from the single processor's group."""

from __future__ import annotations

import pytest

from features.partitions import ITEMS, PARTITIONS, USERS, groups, partition
from features.stream_codec import entry_key
from features.stream_groups import before


@pytest.mark.parametrize(
    ("entry_id", "expected"),
    [("5-3", "5-2"), ("5-0", f"4-{2**64 - 1}"), ("0-0", "0-0"), ("1700000000000-1", "1700000000000-0")],
)
def test_before_is_the_largest_smaller_id(entry_id: str, expected: str) -> None:
    assert before(entry_id) == expected
    if entry_id != "0-0":
        assert entry_key(before(entry_id)) < entry_key(entry_id)


def test_partitions_cover_every_entity_and_side_effect_once() -> None:
    from core.schema import EntityType

    covered = [e for p in PARTITIONS for e in p.entities]
    assert sorted(covered) == sorted(EntityType)
    assert [p.trending for p in PARTITIONS].count(True) == 1
    assert [p.exclusions for p in PARTITIONS].count(True) == 1
    assert groups() == ("features-users", "features-items")
    assert partition("items") is ITEMS and partition("users") is USERS
    with pytest.raises(ValueError, match="unknown feature partition 'creators'"):
        partition("creators")
