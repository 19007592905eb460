"""Every size limit of the HTTP API answers 4xx and names what it refused.

The limits: the body (4 MiB, declared or streamed), a batch (1,000 events), a bulk upload
(10,000 items), every id (128 characters, in bodies, paths and queries), ``limit`` (1-100) and
``surface`` (64) on the recommendation routes, and the bounded fields of the data model (title,
tags, labels, interests, metadata, event context, watch time, position). Timestamps are bounded
too: no instant outside what UTC can hold, and no event before 1970.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.schema import MAX_CONTEXT_BYTES, MAX_ID_LEN, MAX_INTERESTS, MAX_METADATA_BYTES, MAX_TAGS
from core.settings import Settings
from deployments.api.app import MAX_BODY_BYTES, create_app
from deployments.api.catalog import MAX_BULK_ITEMS
from deployments.api.events import MAX_BATCH_EVENTS
from deployments.api.recommendations import MAX_LIMIT
from deployments.api.services import ApiServices
from deployments.recommender.options import ServingOptions
from deployments.recommender.service import RecommendationService
from features.metrics import StreamMetrics
from features.redis_store import RedisStore
from tests.integration.no_models import NoModels

pytestmark = pytest.mark.integration

TOKEN = "limits-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
LONG_ID = "x" * (MAX_ID_LEN + 1)


@pytest.fixture
def client(redis_settings: Settings, store: RedisStore) -> Iterator[TestClient]:
    services = ApiServices.from_settings(redis_settings.replace(admin_token=TOKEN))
    services.recommendations = RecommendationService(services.store, NoModels(), ServingOptions())
    with TestClient(
        create_app(services, stream_metrics=StreamMetrics()), raise_server_exceptions=False
    ) as test:
        yield test
    services.close()


def _event(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"userId": "u1", "itemId": "i1", "eventType": "click"}
    body.update(overrides)
    return body


def _item(item_id: str = "i1", **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "itemId": item_id,
        "itemType": "video",
        "title": "t",
        "category": "c",
        "creatorId": "c1",
    }
    body.update(overrides)
    return body


def _fields(response: Any) -> set[str]:
    return {f["field"] for f in response.json()["fields"]}


BODY_LIMITS = [
    ("POST", "/api/events/batch", {"events": [_event()] * (MAX_BATCH_EVENTS + 1)}, "events"),
    ("POST", "/api/catalog/items", {"items": [_item(f"i{n}") for n in range(MAX_BULK_ITEMS + 1)]}, "items"),
    ("POST", "/api/events", _event(userId=LONG_ID), "userId"),
    ("POST", "/api/events", _event(itemId=LONG_ID), "itemId"),
    ("POST", "/api/events", _event(eventId=LONG_ID), "eventId"),
    ("POST", "/api/events", _event(context={"requestId": LONG_ID}), "context.requestId"),
    ("POST", "/api/events", _event(context={"region": "r" * 65}), "context.region"),
    ("POST", "/api/events", _event(context={"surface": "s" * 65}), "context.surface"),
    ("POST", "/api/events", _event(context={"position": 10_001}), "context.position"),
    ("POST", "/api/events", _event(context={"extra": {"blob": "x" * MAX_CONTEXT_BYTES}}), "context.extra"),
    ("POST", "/api/events", _event(eventType="watch", watchTimeS=86_401), "watchTimeS"),
    ("POST", "/api/events", _event(timestamp="1969-12-31T23:59:59Z"), "timestamp"),
    ("POST", "/api/events", _event(timestamp="0001-01-01T00:00:00+01:00"), "timestamp"),
    (
        "POST",
        "/api/recommendations/feedback",
        {"userId": LONG_ID, "itemId": "i1", "feedback": "hide"},
        "userId",
    ),
    (
        "POST",
        "/api/recommendations/feedback",
        {"userId": "u1", "itemId": "i1", "feedback": "hide", "requestId": LONG_ID},
        "requestId",
    ),
    ("POST", "/api/items", _item(LONG_ID), "itemId"),
    ("POST", "/api/items", _item(creatorId=LONG_ID), "creatorId"),
    ("POST", "/api/items", _item(title="t" * 513), "title"),
    ("POST", "/api/items", _item(category="c" * 65), "category"),
    ("POST", "/api/items", _item(tags=[f"t{n}" for n in range(MAX_TAGS + 1)]), "tags"),
    ("POST", "/api/items", _item(tags=["t" * 65]), "tags.0"),
    ("POST", "/api/items", _item(metadata={"blob": "x" * MAX_METADATA_BYTES}), "metadata"),
    ("POST", "/api/items", _item(createdAt="9999-12-31T23:59:59-01:00"), "createdAt"),
    (
        "PUT",
        "/api/users/u1",
        {"userId": "u1", "interests": [f"i{n}" for n in range(MAX_INTERESTS + 1)]},
        "interests",
    ),
    ("PUT", "/api/users/u1", {"userId": "u1", "interests": ["i" * 65]}, "interests.0"),
    ("PUT", "/api/users/u1", {"userId": "u1", "region": "r" * 65}, "region"),
    ("PUT", "/api/users/u1", {"userId": "u1", "language": "e" * 20}, "language"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "field"), BODY_LIMITS, ids=[f"{p}:{f}" for _, p, _, f in BODY_LIMITS]
)
def test_body_limits_name_the_field(
    client: TestClient, method: str, path: str, body: Any, field: str
) -> None:
    response = client.request(method, path, json=body, headers=ADMIN)
    assert response.status_code == 422, response.text
    assert field in _fields(response), response.json()["fields"]
    assert field in response.json()["message"]


QUERY_LIMITS = [
    ("/api/recommendations", {"userId": LONG_ID}, "userId"),
    ("/api/recommendations", {"userId": "u1", "itemId": LONG_ID}, "itemId"),
    ("/api/recommendations", {"userId": "u1", "limit": 0}, "limit"),
    ("/api/recommendations", {"userId": "u1", "limit": MAX_LIMIT + 1}, "limit"),
    ("/api/recommendations", {"userId": "u1", "surface": "s" * 65}, "surface"),
    ("/api/items/i1/similar", {"limit": MAX_LIMIT + 1}, "limit"),
    ("/api/items/i1/similar", {"userId": LONG_ID}, "userId"),
    (f"/api/items/{LONG_ID}/similar", {}, "item_id"),
    (f"/api/items/{LONG_ID}", {}, "item_id"),
    (f"/api/users/{LONG_ID}", {}, "user_id"),
]


@pytest.mark.parametrize(
    ("path", "params", "field"), QUERY_LIMITS, ids=[f"{p[:24]}:{f}" for p, _, f in QUERY_LIMITS]
)
def test_query_and_path_limits_name_the_field(
    client: TestClient, path: str, params: dict[str, Any], field: str
) -> None:
    response = client.get(path, params=params)
    assert response.status_code == 422, response.text
    assert field in _fields(response)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", f"/api/users/u1/following/{LONG_ID}"),
        ("PUT", f"/api/users/{LONG_ID}/blocked-creators/c1"),
        ("POST", f"/api/admin/items/{LONG_ID}/remove"),
        ("PUT", f"/api/admin/blocked-creators/{LONG_ID}"),
    ],
)
def test_path_ids_are_bounded_on_writes(client: TestClient, method: str, path: str) -> None:
    response = client.request(method, path, headers=ADMIN)
    assert response.status_code == 422, response.text
    assert _fields(response) & {"user_id", "followee_id", "creator_id", "item_id"}


def test_a_declared_body_over_the_limit_is_413(client: TestClient) -> None:
    body = json.dumps({"events": [_event()]}).encode() + b" " * (MAX_BODY_BYTES + 1)
    response = client.post("/api/events/batch", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"
    assert f"{MAX_BODY_BYTES:,}" in response.json()["message"]


def test_a_streamed_body_over_the_limit_is_413_and_stores_nothing(
    client: TestClient, store: RedisStore
) -> None:
    body = json.dumps({"events": [_event()]}).encode() + b" " * (MAX_BODY_BYTES + 1)

    def chunks() -> Iterator[bytes]:
        # No Content-Length: the body arrives chunked and only counting it can stop it.
        for start in range(0, len(body), 256 * 1024):
            yield body[start : start + 256 * 1024]

    response = client.post(
        "/api/events/batch", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"
    assert store.client.xlen(store.keys.stream_events()) == 0


def test_a_content_length_that_is_not_a_number_is_400(client: TestClient) -> None:
    response = client.post(
        "/api/events", content=b"{}", headers={"content-type": "application/json", "content-length": "12x"}
    )
    assert response.status_code == 400
    assert "Content-Length" in response.json()["message"]
