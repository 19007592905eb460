"""Validation of the boundary models: each bad value is refused with an error naming its field."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from core.schema import (
    MAX_CONTEXT_BYTES,
    EventType,
    FeatureRow,
    FeedbackRequest,
    Item,
    RecommendationLogEntry,
    SocialEdge,
    UserEvent,
    UserProfile,
)


def _event(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "userId": "u123",
        "itemId": "i789",
        "eventType": "click",
        "timestamp": "2026-05-02T10:00:00Z",
        "context": {"surface": "home", "device": "mobile"},
    }
    body.update(overrides)
    return body


def _field_names(exc: ValidationError) -> set[str]:
    return {".".join(str(p) for p in err["loc"]) for err in exc.errors()}


def test_seed_example_event_parses() -> None:
    event = UserEvent.model_validate(_event())
    assert event.user_id == "u123"
    assert event.event_type is EventType.CLICK
    assert event.timestamp == datetime(2026, 5, 2, 10, tzinfo=UTC)
    assert event.context.surface == "home"
    assert len(event.event_id) == 32


def test_json_round_trip_uses_camel_case() -> None:
    event = UserEvent.model_validate(_event())
    dumped = event.model_dump(mode="json", by_alias=True)
    assert {"userId", "itemId", "eventType", "eventId"} <= dumped.keys()
    assert UserEvent.model_validate(dumped) == event


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"userId": ""}, "userId"),
        ({"userId": "u" * 129}, "userId"),
        ({"itemId": "has space"}, "itemId"),
        ({"eventType": "teleport"}, "eventType"),
        ({"timestamp": (datetime.now(UTC) + timedelta(days=1)).isoformat()}, "timestamp"),
        ({"timestamp": "yesterday-ish"}, "timestamp"),
        ({"context": {"device": "toaster"}}, "context.device"),
        ({"context": {"extra": {"k": "x" * (MAX_CONTEXT_BYTES + 1)}}}, "context.extra"),
        ({"context": {"surprise": 1}}, "context.surprise"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_event_values_name_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        UserEvent.model_validate(_event(**overrides))
    assert field in _field_names(info.value), info.value


def test_oversized_context_as_a_whole_is_refused() -> None:
    # Many keys, each under the per-field limit, still exceed the context limit together.
    extra = {f"k{i}": "x" * 200 for i in range(12)}
    with pytest.raises(ValidationError) as info:
        UserEvent.model_validate(_event(context={"extra": extra}))
    assert "context" in str(info.value)


def test_a_context_without_extra_keys_cannot_exceed_the_limit() -> None:
    # EventContext only measures contexts with extra keys; this is the largest one without.
    label = "\U0001f600" * 64  # astral characters: 12 bytes each once escaped in JSON
    context = {
        "surface": label,
        "device": "desktop",
        "region": label,
        "requestId": "r" * 128,
        "position": 10_000,
    }
    event = UserEvent.model_validate(_event(context=context))
    size = len(json.dumps(event.context.model_dump(mode="json", exclude_none=True), separators=(",", ":")))
    assert size < MAX_CONTEXT_BYTES


def test_missing_user_is_named() -> None:
    body = _event()
    del body["userId"]
    with pytest.raises(ValidationError) as info:
        UserEvent.model_validate(body)
    assert "userId" in _field_names(info.value)


def test_watch_events_need_watch_time_and_others_refuse_it() -> None:
    with pytest.raises(ValidationError, match="watchTimeS"):
        UserEvent.model_validate(_event(eventType="watch"))
    with pytest.raises(ValidationError, match="watchTimeS"):
        UserEvent.model_validate(_event(watchTimeS=3.0))
    event = UserEvent.model_validate(_event(eventType="watch", watchTimeS=42.5))
    assert event.watch_time_s == 42.5


def test_small_clock_skew_is_accepted() -> None:
    soon = datetime.now(UTC) + timedelta(seconds=30)
    assert UserEvent.model_validate(_event(timestamp=soon.isoformat())).timestamp == soon


def test_naive_timestamp_is_utc() -> None:
    event = UserEvent.model_validate(_event(timestamp="2026-05-02T10:00:00"))
    assert event.timestamp.tzinfo is UTC


def test_feedback_maps_to_event() -> None:
    fb = FeedbackRequest.model_validate({"userId": "u123", "itemId": "i789", "feedback": "not_interested"})
    event = fb.to_event()
    assert event.event_type is EventType.NOT_INTERESTED
    with pytest.raises(ValidationError) as info:
        FeedbackRequest.model_validate({"userId": "u123", "itemId": "i789", "feedback": "meh"})
    assert "feedback" in _field_names(info.value)


def test_item_validation() -> None:
    item = Item.model_validate(
        {
            "itemId": "i1",
            "itemType": "video",
            "title": "Quick pasta",
            "category": "cooking",
            "tags": ["pasta", "quick", "pasta"],
            "creatorId": "c1",
        }
    )
    assert item.tags == ["pasta", "quick"]
    assert item.status.value == "active"
    with pytest.raises(ValidationError) as info:
        Item.model_validate(
            {"itemId": "i1", "itemType": "spaceship", "title": "", "category": "x", "creatorId": "c"}
        )
    assert {"itemType", "title"} <= _field_names(info.value)
    with pytest.raises(ValidationError) as info:
        Item.model_validate(
            {
                "itemId": "i1",
                "itemType": "video",
                "title": "t",
                "category": "c",
                "creatorId": "c",
                "metadata": {"blob": "x" * 10_000},
            }
        )
    assert "metadata" in _field_names(info.value)


def test_user_profile_validation() -> None:
    user = UserProfile.model_validate({"userId": "u1", "language": "en", "interests": ["tech"]})
    assert user.personalization is True
    with pytest.raises(ValidationError) as info:
        UserProfile.model_validate({"userId": "u1", "language": "English!", "ageGroup": "ancient"})
    assert {"language", "ageGroup"} <= _field_names(info.value)
    with pytest.raises(ValidationError) as info:
        UserProfile.model_validate({"userId": "u1", "interests": ["x"] * 65})
    assert "interests" in _field_names(info.value)


def test_social_edge_refuses_self_follow() -> None:
    with pytest.raises(ValidationError, match="followeeId"):
        SocialEdge.model_validate({"followerId": "u1", "followeeId": "u1"})


def test_feature_row_name_is_a_view_reference() -> None:
    FeatureRow.model_validate(
        {"entityId": "u1", "entityType": "user", "featureName": "user:ctr_7d", "featureValue": 0.1}
    )
    with pytest.raises(ValidationError) as info:
        FeatureRow.model_validate(
            {"entityId": "u1", "entityType": "user", "featureName": "ctr", "featureValue": 1}
        )
    assert "featureName" in _field_names(info.value)


def test_recommendation_log_entry() -> None:
    entry = RecommendationLogEntry.model_validate(
        {
            "requestId": "r1",
            "userId": "u1",
            "surface": "home",
            "items": [
                {"itemId": "i1", "position": 0, "score": 0.9, "sources": ["trending"], "propensity": 0.5}
            ],
            "modelVersion": "v1",
            "experimentId": "exp1",
            "arm": "control",
        }
    )
    assert entry.items[0].propensity == 0.5
    with pytest.raises(ValidationError) as info:
        RecommendationLogEntry.model_validate(
            {
                "requestId": "r1",
                "userId": "u1",
                "surface": "home",
                "items": [{"itemId": "i1", "position": -1, "score": 0.9, "propensity": 2}],
                "modelVersion": "v1",
            }
        )
    assert {"items.0.position", "items.0.propensity"} <= _field_names(info.value)
