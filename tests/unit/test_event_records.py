"""EventRecord.from_event_json: the stream's direct decoding agrees with full validation."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest

from core.schema import EventContext, EventType, UserEvent, utcnow
from features.records import EventRecord
from features.stream_codec import EntryDecodeError, decode_event, decode_event_record, encode_event


def _events() -> list[UserEvent]:
    now = utcnow().replace(microsecond=123456)
    return [
        UserEvent(user_id="u1", item_id="i1", event_type=EventType.VIEW, timestamp=now),
        UserEvent(
            event_id="e-2",
            user_id="u:2@x",
            item_id="i/2",
            event_type=EventType.WATCH,
            timestamp=now - timedelta(days=400),
            watch_time_s=12.3456789,
            context=EventContext(
                surface="home",
                device="tv",
                region="eu-west",
                request_id="req-9",
                position=0,
                extra={"b": [1, 2], "a": "ünïcode", "c": None},
            ),
        ),
        UserEvent(
            user_id="u3", item_id="i3", event_type=EventType.HIDE, context=EventContext(position=10_000)
        ),
    ]


@pytest.mark.parametrize("event", _events(), ids=lambda e: e.event_type.value)
def test_the_direct_path_gives_the_validated_record(event: UserEvent) -> None:
    payload = str(encode_event(event)["e"])
    direct = EventRecord.from_event_json(payload)
    validated = EventRecord.from_event(decode_event({"e": payload}))
    assert direct is not None
    assert direct == validated
    assert (direct.ts_s, direct.sort_key, direct.kind) == (
        validated.ts_s,
        validated.sort_key,
        validated.kind,
    )
    assert direct.ts.utcoffset() == timedelta(0)


def _payload(**changes: Any) -> str:
    doc = json.loads(str(encode_event(_events()[1])["e"]))
    for key, value in changes.items():
        if key.startswith("context_"):
            doc["context"][key.removeprefix("context_")] = value
        else:
            doc[key] = value
    return json.dumps(doc)


@pytest.mark.parametrize(
    "payload",
    [
        "{not json",
        "[1, 2]",
        _payload(unknown=1),
        _payload(eventType="teleport"),
        _payload(eventType="view"),  # a watch time on a view
        _payload(watchTimeS=None),  # a watch without one
        _payload(watchTimeS=-1.0),
        _payload(userId="has space"),
        _payload(itemId=""),
        _payload(eventId=7),
        _payload(timestamp="2025-01-01T00:00:00"),  # no offset
        _payload(timestamp="1969-12-31T23:59:59Z"),
        _payload(timestamp=(utcnow() + timedelta(hours=1)).isoformat()),
        _payload(timestamp="yesterday"),
        _payload(context=None),
        _payload(context_position=True),
        _payload(context_position=10_001),
        _payload(context_device="fridge"),
        _payload(context_region=" eu"),
        _payload(context_other="x"),
    ],
)
def test_payloads_it_does_not_vouch_for_go_to_full_validation(payload: str) -> None:
    assert EventRecord.from_event_json(payload) is None


def test_every_consumer_decodes_an_entry_to_the_same_record_either_way() -> None:
    event = _events()[1]
    direct = decode_event_record({"e": str(encode_event(event)["e"])})
    # Another producer's spelling (snake_case names) is not the intake's: full validation.
    other = decode_event_record({"e": event.model_dump_json()})
    assert direct == other == EventRecord.from_event(event)
    assert EventRecord.from_event_json(event.model_dump_json()) is None
    for broken in ({"e": _payload(eventType="teleport")}, {"x": "1"}, None):
        with pytest.raises(EntryDecodeError):
            decode_event_record(broken)


def test_an_offset_timestamp_is_taken_to_utc_as_validation_takes_it() -> None:
    payload = _payload(timestamp="2025-01-01T02:00:00.5+02:00")
    direct = EventRecord.from_event_json(payload)
    assert direct is not None
    assert direct == EventRecord.from_event(decode_event({"e": payload}))
    assert direct.ts.isoformat() == "2025-01-01T00:00:00.500000+00:00"
    assert direct.sort_key == (direct.ts.timestamp(), direct.event_id)


def test_ids_found_valid_before_do_not_let_an_invalid_one_through() -> None:
    assert EventRecord.from_event_json(_payload()) is not None  # remembers its ids
    assert EventRecord.from_event_json(_payload(userId="u:2@x ")) is None
    assert EventRecord.from_event_json(_payload(context_region="eu-west\n")) is None
