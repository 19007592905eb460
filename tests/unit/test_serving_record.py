"""Serving records: the positional layout, and what readers get from either layout."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

import orjson
import pytest

from core.schema import EntityType
from features.definitions import ITEM_ENGAGEMENT, USER_ACTIVITY, VIEWS, record_layout, views_of
from features.params import DEFAULT_PARAMS
from features.serving_record import UPDATED_AT, RecordLayout, expand, layout_of, loads

NOW = datetime(2026, 3, 3, 12, 0, tzinfo=UTC)
STAMP = "2026-03-03T12:00:00Z"


def _mapping(entity: EntityType) -> dict[str, object]:
    values: dict[str, object] = {}
    for view in views_of(entity):
        values.update(view.serve_refs({}, NOW, DEFAULT_PARAMS))
    values[UPDATED_AT] = STAMP
    return values


@pytest.mark.parametrize("entity", list(EntityType))
def test_a_record_reads_back_as_the_mapping_it_was_made_of(entity: EntityType) -> None:
    mapping = _mapping(entity)
    raw = record_layout(entity).encode(mapping)
    assert loads(raw) == json.loads(json.dumps(mapping)), "as the object layout read (tuples as lists)"
    assert len(raw) < len(orjson.dumps(mapping)) / 2, "positional records are the smaller ones"


def test_the_layout_lists_every_reference_of_the_entitys_views_in_order() -> None:
    layout = record_layout(EntityType.USER)
    assert layout.refs == tuple(spec.ref for spec in USER_ACTIVITY.specs)
    doc = json.loads(layout.encode(_mapping(EntityType.USER)))
    assert doc[:2] == [layout.id, STAMP]
    assert doc[2 + layout.refs.index("user_activity:event_count")] == 0
    assert len({record_layout(e).id for e in EntityType}) == len(EntityType)


def test_records_of_the_earlier_object_layout_still_read() -> None:
    old = {"item_engagement:view_count_7d": 4, UPDATED_AT: STAMP}
    assert loads(json.dumps(old)) == old
    assert loads(None) is None


def test_a_layout_of_other_definitions_reads_as_absent_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    foreign = ["0badf00d", STAMP, 1, 2, 3]
    with caplog.at_level(logging.WARNING, logger="features.serving_record"):
        assert expand(foreign) is None
        assert expand(foreign) is None
    assert len([r for r in caplog.records if "0badf00d" in r.getMessage()]) == 1


def test_a_layout_made_in_process_is_known_to_readers() -> None:
    views = (ITEM_ENGAGEMENT,)
    layout = layout_of(views)
    assert layout == record_layout(EntityType.ITEM)
    custom = RecordLayout(("x:a", "x:b"))
    assert expand([custom.id, STAMP, 1, 2]) is None, "a layout nobody registered is unknown"
    assert layout_of(v for v in VIEWS if v is USER_ACTIVITY) is record_layout(EntityType.USER)


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[1, 2]",
        "[]",
        '"text"',
        "17",
        json.dumps([record_layout(EntityType.CREATOR).id, STAMP, 1]),
    ],
)
def test_anything_else_is_refused_with_a_value_error(raw: str) -> None:
    with pytest.raises(ValueError):
        loads(raw)


def test_encode_names_a_missing_reference() -> None:
    mapping = _mapping(EntityType.CREATOR)
    del mapping["creator_quality:quality_score"]
    with pytest.raises(KeyError, match="quality_score"):
        record_layout(EntityType.CREATOR).encode(mapping)
