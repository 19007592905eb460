"""The HTTP API deployed on Ray Serve, called over real HTTP."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from core.lake import Lake
from core.schema import EntityType
from core.settings import Settings
from features.online_store import OnlineFeatureStore
from features.redis_store import RedisStore
from features.stream_codec import decode_event
from tests.integration.ray_session import ray_cluster
from tests.integration.streams import stream_entries

pytestmark = pytest.mark.integration
__all__ = ["ray_cluster"]

PORT = 8765


@pytest.fixture(scope="module")
def lake_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve-lake")


@pytest.fixture(scope="module")
def serve_url(ray_cluster: None, redis_settings: Settings, lake_home: Path) -> Iterator[str]:
    from ray import serve

    from deployments.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    app = build_app(
        {"namespace": redis_settings.namespace, "redis_url": redis_settings.redis_url, "home": str(lake_home)}
    )
    serve.run(app, name="rayrec-test", route_prefix="/")
    yield f"http://127.0.0.1:{PORT}"
    serve.delete("rayrec-test")
    serve.shutdown()  # type: ignore[no-untyped-call]


def test_event_through_serve_is_stored(serve_url: str, store: RedisStore) -> None:
    with httpx.Client(base_url=serve_url, timeout=30) as client:
        assert client.get("/readyz").json()["status"] == "ready"
        body = {"userId": "u1", "itemId": "i1", "eventType": "like", "context": {"surface": "home"}}
        response = client.post("/api/events", json=body)
        assert response.status_code == 202, response.text
        refused = client.post("/api/events", json={**body, "eventType": "teleport"})
        assert refused.status_code == 422 and "eventType" in refused.json()["message"]
        assert "/api/events/batch" in client.get("/openapi.json").json()["paths"]
    stored = [decode_event(f) for _, f in stream_entries(store, store.keys.stream_events())]
    assert [e.event_id for e in stored] == [response.json()["eventId"]]


def test_like_through_serve_reaches_features_and_lake(
    serve_url: str, store: RedisStore, lake_home: Path
) -> None:
    like = {"userId": "u7", "itemId": "i7", "eventType": "like", "context": {"surface": "home"}}
    with httpx.Client(base_url=serve_url, timeout=30) as client:
        event_id = client.post("/api/events", json=like).json()["eventId"]
    online = OnlineFeatureStore(store)
    deadline = time.monotonic() + 60
    record = None
    while time.monotonic() < deadline:
        record = online.get_serving(EntityType.ITEM, ["i7"])[0]
        if record is not None:
            break
        time.sleep(0.2)
    assert record is not None, "the stream processor never applied the like"
    assert record["item_engagement:like_count_1h"] == 1
    lake = Lake(str(lake_home))
    while time.monotonic() < deadline and event_id not in lake.read("events").column("event_id").to_pylist():
        time.sleep(0.5)
    assert event_id in lake.read("events").column("event_id").to_pylist(), "the lake writer never wrote it"
