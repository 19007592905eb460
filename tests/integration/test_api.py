"""The HTTP API in-process against the real Redis: shapes, refusals, strong-consistency writes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.settings import Settings
from deployments.api.app import MAX_BODY_BYTES, create_app
from deployments.api.services import ApiServices
from features.catalog_changes import decode_change
from features.redis_store import RedisStore
from features.stream_codec import decode_event
from tests.integration.streams import stream_entries

pytestmark = pytest.mark.integration

TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def settings(redis_settings: Settings) -> Settings:
    return redis_settings.replace(admin_token=TOKEN, stream_max_len=1000)


@pytest.fixture
def client(settings: Settings, store: RedisStore) -> Iterator[TestClient]:
    services = ApiServices.from_settings(settings)
    with TestClient(create_app(services), raise_server_exceptions=False) as test_client:
        yield test_client
    services.close()


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


def _item(item_id: str = "i789", **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "itemId": item_id,
        "itemType": "video",
        "title": "Quick pasta",
        "category": "cooking",
        "tags": ["pasta"],
        "creatorId": "c1",
    }
    body.update(overrides)
    return body


def _stream(store: RedisStore) -> list[Any]:
    return [decode_event(fields) for _, fields in stream_entries(store, store.keys.stream_events())]


def test_seed_event_is_stored_before_202(client: TestClient, store: RedisStore) -> None:
    response = client.post("/api/events", json=_event())
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "accepted"
    stored = _stream(store)
    assert [e.event_id for e in stored] == [body["eventId"]]
    assert stored[0].user_id == "u123" and stored[0].context.device == "mobile"


def test_batch_is_all_or_nothing(client: TestClient, store: RedisStore) -> None:
    events = [_event(itemId=f"i{n}") for n in range(5)]
    response = client.post("/api/events/batch", json={"events": events})
    assert response.status_code == 202, response.text
    assert response.json()["accepted"] == 5
    assert len(_stream(store)) == 5

    events[2]["eventType"] = "teleport"
    response = client.post("/api/events/batch", json={"events": events})
    assert response.status_code == 422
    assert "events.2.eventType" in {f["field"] for f in response.json()["fields"]}
    assert len(_stream(store)) == 5, "a refused batch must store nothing"
    report = client.get("/api/admin/streams", headers=ADMIN)
    assert report.status_code == 200, report.text
    assert report.json()["stream_length"] == {"events": 5, "impressions": 0}


def test_oversized_batch_is_refused(client: TestClient) -> None:
    response = client.post("/api/events/batch", json={"events": [_event()] * 1001})
    assert response.status_code == 422
    assert "events" in response.json()["message"]


@pytest.mark.parametrize(
    ("body", "status", "named"),
    [
        (_event(eventType="teleport"), 422, "eventType"),
        ({k: v for k, v in _event().items() if k != "userId"}, 422, "userId"),
        (_event(context={"extra": {"blob": "x" * 5000}}), 422, "context"),
        (_event(timestamp="2999-01-01T00:00:00Z"), 422, "timestamp"),
        (_event(userId=""), 422, "userId"),
    ],
)
def test_bad_events_name_the_problem(
    client: TestClient, store: RedisStore, body: dict[str, Any], status: int, named: str
) -> None:
    response = client.post("/api/events", json=body)
    assert response.status_code == status, response.text
    assert named in response.json()["message"]
    assert _stream(store) == []


def test_malformed_json_is_400(client: TestClient) -> None:
    response = client.post(
        "/api/events", content=b'{"userId": "u1",', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"] == "malformed_json"


def test_oversized_body_is_413(client: TestClient) -> None:
    blob = json.dumps({"events": [_event()]}).encode() + b" " * (MAX_BODY_BYTES + 1)
    response = client.post("/api/events/batch", content=blob, headers={"content-type": "application/json"})
    assert response.status_code == 413


@pytest.mark.parametrize("feedback", ["not_interested", "hide", "report"])
def test_negative_feedback_holds_before_the_answer(
    client: TestClient, store: RedisStore, feedback: str
) -> None:
    response = client.post(
        "/api/recommendations/feedback", json={"userId": "u123", "itemId": "i789", "feedback": feedback}
    )
    assert response.status_code == 202, response.text
    assert store.client.sismember(store.keys.exclusions("u123"), "i789")
    assert _stream(store)[0].event_type.value == feedback


def test_a_batch_is_stored_in_order_with_its_exclusions(client: TestClient, store: RedisStore) -> None:
    # The intake sends a batch's payloads as one newline-separated argument: values holding
    # newlines and separators must come back whole, each event in its own entry.
    events = [
        _event(eventId="b0", eventType="hide", itemId="i1"),
        _event(eventId="b1", context={"extra": {"note": "two\nlines", "sep": "},{"}}),
        _event(eventId="b2", eventType="report", userId="u9", itemId="i2"),
        _event(eventId="b3"),
    ]
    response = client.post("/api/events/batch", json={"events": events})
    assert response.status_code == 202, response.text
    stored = _stream(store)
    assert [e.event_id for e in stored] == ["b0", "b1", "b2", "b3"]
    assert stored[1].context.extra == {"note": "two\nlines", "sep": "},{"}
    assert store.client.smembers(store.keys.exclusions("u123")) == {"i1"}
    assert store.client.smembers(store.keys.exclusions("u9")) == {"i2"}


def test_admin_routes_need_the_token(client: TestClient, store: RedisStore) -> None:
    assert client.post("/api/items", json=_item()).status_code == 401
    wrong = client.post("/api/items", json=_item(), headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403
    created = client.post("/api/items", json=_item(), headers=ADMIN)
    assert created.status_code == 201, created.text
    assert client.get("/api/items/i789").json()["title"] == "Quick pasta"

    assert client.post("/api/admin/items/i789/remove").status_code == 401
    removed = client.post("/api/admin/items/i789/remove", headers=ADMIN)
    assert removed.json()["status"] == "removed"
    assert not store.client.sismember(store.keys.items_active(), "i789")
    assert store.client.sismember(store.keys.removed_items(), "i789")
    restored = client.post("/api/admin/items/i789/restore", headers=ADMIN)
    assert restored.json()["status"] == "active"
    assert store.client.sismember(store.keys.items_active(), "i789")

    assert client.put("/api/admin/blocked-creators/c1", headers=ADMIN).status_code == 204
    assert store.client.sismember(store.keys.blocked_creators_global(), "c1")
    assert client.put("/api/admin/blocked-items/i789", headers=ADMIN).status_code == 204
    assert store.client.sismember(store.keys.blocked_items(), "i789")
    changes = [decode_change(f) for _, f in stream_entries(store, store.keys.stream_catalog("items"))]
    assert [c["status"] for c in changes] == ["active", "removed", "active"], "every change reaches the log"


def test_admin_routes_disabled_without_configured_token(redis_settings: Settings, store: RedisStore) -> None:
    services = ApiServices.from_settings(redis_settings.replace(admin_token=None))
    with TestClient(create_app(services)) as client:
        response = client.post("/api/items", json=_item(), headers=ADMIN)
    services.close()
    assert response.status_code == 503
    assert "RAYREC_ADMIN_TOKEN" in response.json()["message"]


def test_unknown_item_is_404(client: TestClient) -> None:
    response = client.get("/api/items/nope")
    assert response.status_code == 404
    assert "nope" in response.json()["message"]


def test_bulk_upload_and_path_mismatch(client: TestClient, store: RedisStore) -> None:
    items = [_item(f"i{n}", creatorId=f"c{n % 3}") for n in range(50)]
    response = client.post("/api/catalog/items", json={"items": items}, headers=ADMIN)
    assert response.json() == {"written": 50}
    assert store.client.scard(store.keys.items_active()) == 50
    mismatch = client.put("/api/items/i1", json=_item("i2"), headers=ADMIN)
    assert mismatch.status_code == 422


def test_user_controls(client: TestClient, store: RedisStore) -> None:
    profile = {"userId": "u1", "region": "us-west", "language": "en", "interests": ["cooking"]}
    assert client.put("/api/users/u1", json=profile).status_code == 200
    assert client.put("/api/users/u2", json={"userId": "u2"}).status_code == 200
    assert client.put("/api/users/u1/following/u2").status_code == 204
    assert store.client.sismember(store.keys.following("u1"), "u2")
    assert client.delete("/api/users/u1/following/u2").status_code == 204
    assert not store.client.sismember(store.keys.following("u1"), "u2")

    off = client.put("/api/users/u1/privacy", json={"personalization": False})
    assert off.status_code == 200 and off.json()["personalization"] is False
    assert client.get("/api/users/u1").json()["personalization"] is False

    assert client.put("/api/users/u1/blocked-creators/c9").status_code == 204
    assert store.client.sismember(store.keys.blocked_creators("u1"), "c9")

    assert client.delete("/api/users/u1").status_code == 204
    assert client.get("/api/users/u1").status_code == 404
    assert store.client.sismember(store.keys.erased_users(), "u1")
    again = client.put("/api/users/u1", json=profile)
    assert again.status_code == 404 and "erased" in again.text, again.text
    assert client.get("/api/users/u1").status_code == 404
    changes = [decode_change(f) for _, f in stream_entries(store, store.keys.stream_catalog("users"))]
    tombstones = [row for row in changes if row["erased"]]
    assert [row["user_id"] for row in tombstones] == ["u1"]
    assert changes[-1]["erased"], "a refused write of an erased user reaches no change log"


def test_stream_at_capacity_answers_503_and_stores_nothing(client: TestClient, store: RedisStore) -> None:
    pipe = store.client.pipeline(transaction=False)
    for n in range(1000):
        pipe.xadd(store.keys.stream_events(), {"e": f"filler-{n}"})
    pipe.execute()
    response = client.post("/api/events", json=_event())
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json()["error"] == "stream_full"
    assert store.client.xlen(store.keys.stream_events()) == 1000


def test_redis_unreachable_answers_503(redis_settings: Settings) -> None:
    settings = redis_settings.replace(
        redis_url="redis://127.0.0.1:6399/0", redis_timeout_s=0.5, admin_token=TOKEN
    )
    services = ApiServices.from_settings(settings)
    with TestClient(create_app(services), raise_server_exceptions=False) as client:
        event = client.post("/api/events", json=_event())
        streams = client.get("/api/admin/streams", headers=ADMIN)
        ready = client.get("/readyz")
        health = client.get("/healthz")
    services.close()
    assert event.status_code == 503 and event.headers["retry-after"] == "2"
    assert streams.status_code == 503, streams.text
    assert ready.status_code == 503
    assert health.status_code == 200


def test_openapi_is_served(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert "/api/events" in spec["paths"] and "/api/recommendations/feedback" in spec["paths"]
    assert client.get("/docs").status_code == 200
