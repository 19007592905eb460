"""Logs carry ids, never the personal or catalog data around them.

Representative traffic runs with every logger at DEBUG: profile and item writes and reads, events
and feedback, refused bodies, a recommendation request over records that do not decode, and the
stream consumers (the stream processor and the lake writer) over those writes plus entries that
do not decode. Values that only a body could hold (a region, interests, a title, tags, metadata,
event context) are marked, and no captured line or traceback may hold a mark.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from core.lake import Lake
from core.settings import Settings
from deployments.api.app import create_app
from deployments.api.services import ApiServices
from deployments.recommender.options import ServingOptions
from deployments.recommender.service import RecommendationService
from features.lake_writer import LakeWriter
from features.metrics import StreamMetrics
from features.redis_store import RedisStore
from features.stream_processor import StreamProcessor
from tests.integration.no_models import NoModels

pytestmark = pytest.mark.integration

TOKEN = "privacy-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
MARK = "qz7731"
"""Part of every marked value; appears in no id, path or message of the platform."""

REGION = f"atlantis-{MARK}"
INTEREST = f"falconry-{MARK}"
TITLE = f"Secret pasta {MARK}"
TAG = f"tag-{MARK}"
META = f"meta-{MARK}"
EXTRA = f"extra-{MARK}"


@pytest.fixture
def client(redis_settings: Settings, store: RedisStore) -> Iterator[TestClient]:
    services = ApiServices.from_settings(redis_settings.replace(admin_token=TOKEN))
    services.recommendations = RecommendationService(services.store, NoModels(), ServingOptions())
    with TestClient(
        create_app(services, stream_metrics=StreamMetrics()), raise_server_exceptions=False
    ) as test:
        yield test
    services.close()


def _traffic(client: TestClient, store: RedisStore) -> None:
    profile = {
        "userId": "u-p1",
        "region": REGION,
        "language": "en",
        "interests": [INTEREST],
        "ageGroup": "25_34",
    }
    assert client.put("/api/users/u-p1", json=profile).status_code == 200
    item = {
        "itemId": "i-p1",
        "itemType": "video",
        "title": TITLE,
        "category": "cooking",
        "tags": [TAG],
        "creatorId": "c-p1",
        "metadata": {"note": META},
    }
    assert client.post("/api/items", json=item, headers=ADMIN).status_code == 201
    event = {
        "userId": "u-p1",
        "itemId": "i-p1",
        "eventType": "like",
        "context": {"surface": "home", "region": REGION, "extra": {"note": EXTRA}},
    }
    assert client.post("/api/events", json=event).status_code == 202
    assert (
        client.post("/api/events/batch", json={"events": [event, {**event, "eventType": "view"}]}).status_code
        == 202
    )
    feedback = {"userId": "u-p1", "itemId": "i-p1", "feedback": "hide"}
    assert client.post("/api/recommendations/feedback", json=feedback).status_code == 202
    assert client.get("/api/users/u-p1").status_code == 200
    assert client.get("/api/items/i-p1").status_code == 200
    assert client.put("/api/users/u-p1/privacy", json={"personalization": True}).status_code == 200

    # Refusals echo nothing of the body into the logs.
    assert client.put("/api/users/u-p1", json={**profile, "region": REGION * 10}).status_code == 422
    assert client.post("/api/events", json={**event, "eventType": EXTRA}).status_code == 422
    malformed = f'{{"userId": "u-p1", "region": "{REGION}",'.encode()
    headers = {"content-type": "application/json"}
    assert client.post("/api/events", content=malformed, headers=headers).status_code == 400

    # Records that do not decode, on the read path.
    store.client.set(store.keys.user("u-p2"), f'{{"region": "{REGION}", "interests": ["{INTEREST}"]')
    store.client.set(store.keys.item("i-p2"), json.dumps({"title": TITLE, "tags": [TAG]}))
    store.client.sadd(store.keys.items_active(), "i-p2")
    for user in ("u-p1", "u-p2"):
        assert client.get("/api/recommendations", params={"userId": user, "limit": 5}).status_code == 200


def _consumers(store: RedisStore, home: Path) -> None:
    bad = {"userId": "u-p3", "itemId": "i-p1", "eventType": EXTRA, "context": {"region": REGION}}
    store.client.xadd(store.keys.stream_events(), {"e": json.dumps(bad)})
    store.client.xadd(store.keys.stream_catalog("users"), {"e": f'{{"region": "{REGION}"'})
    metrics = StreamMetrics()
    StreamProcessor(store, "privacy-p", metrics=metrics).drain()
    writer = LakeWriter(store, Lake(str(home)), "privacy-w", flush_entries=1, metrics=metrics)
    writer.drain()
    writer.flush(force=True)


def test_logs_hold_no_profile_or_catalog_values(
    client: TestClient, store: RedisStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    _traffic(client, store)
    _consumers(store, tmp_path)

    assert any(r.name.startswith("features.") for r in caplog.records), (
        "the consumers' warnings were captured"
    )
    leaks = [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if MARK in r.getMessage() or (r.exc_text and MARK in r.exc_text)
    ]
    assert leaks == []
    assert MARK not in caplog.text
