"""``GET /metrics``: the series move with the events posted and the consumers' progress."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from core.settings import Settings
from deployments.api.app import create_app
from deployments.api.services import ApiServices
from features.metrics import StreamMetrics
from features.partitions import PARTITIONS
from features.redis_store import RedisStore
from features.stream_processor import StreamProcessor
from tests.integration.ray_session import ray_cluster

pytestmark = pytest.mark.integration
__all__ = ["ray_cluster"]

PORT = 8766


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Sample name and sorted labels to value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _like(n: int, event_type: str = "like") -> dict[str, Any]:
    return {"userId": f"u{n}", "itemId": f"i{n}", "eventType": event_type, "context": {"surface": "home"}}


def test_counters_stream_length_lag_and_consumer_report(redis_settings: Settings, store: RedisStore) -> None:
    metrics = StreamMetrics()
    services = ApiServices.from_settings(redis_settings)
    processor = StreamProcessor(store, "p1", metrics=StreamMetrics())

    async def stream_stats() -> dict[str, Any]:
        return {"stream_processor": {**asdict(processor.stats), "running": True, "errors": 0}}

    services.stream_stats = stream_stats
    with TestClient(create_app(services, stream_metrics=metrics)) as client:
        before = scrape(client.get("/metrics").text)
        assert value(before, "rayrec_store_up") == 1.0
        assert value(before, "rayrec_consumer_stats_up") == 1.0

        assert client.post("/api/events", json=_like(1)).status_code == 202
        batch = {"events": [_like(2), _like(3, "view")]}
        assert client.post("/api/events/batch", json=batch).status_code == 202
        refused = {"events": [_like(4, "teleport"), _like(5, "click")]}
        assert client.post("/api/events/batch", json=refused).status_code == 422
        malformed = client.post("/api/events", content=b"{", headers={"content-type": "application/json"})
        assert malformed.status_code == 400

        # One entry finished: the other two wait, so the group lags by the oldest one's age.
        time.sleep(0.05)
        assert processor.run_once(count=1, block_ms=0) == 1
        middle = scrape(client.get("/metrics").text)
        assert processor.drain() == 2
        after = scrape(client.get("/metrics").text)
    services.close()

    accepted = "rayrec_events_accepted_total"
    assert value(middle, accepted, event_type="like") - value(before, accepted, event_type="like") == 2
    assert value(middle, accepted, event_type="view") - value(before, accepted, event_type="view") == 1
    rejected = "rayrec_events_rejected_total"
    assert value(middle, rejected, event_type="click", reason="invalid") == 1
    assert value(middle, rejected, event_type="unknown", reason="invalid") == 1
    assert value(middle, rejected, event_type="unknown", reason="malformed_json") == 1

    events = {"stream": "events", "group": "features"}
    assert value(middle, "rayrec_stream_length", stream="events") == 3
    assert value(middle, "rayrec_consumer_undelivered_entries", **events) == 2
    assert value(middle, "rayrec_consumer_lag_seconds", **events) >= 0.05
    assert value(after, "rayrec_consumer_lag_seconds", **events) == 0.0
    assert value(after, "rayrec_consumer_pending_entries", **events) == 0

    batches = "rayrec_consumer_batches_total"
    assert value(middle, batches, consumer="stream_processor") == 1
    assert value(after, batches, consumer="stream_processor") == 2
    busy = "rayrec_consumer_batch_seconds_total"
    assert (
        value(after, busy, consumer="stream_processor") > value(middle, busy, consumer="stream_processor") > 0
    )


# -- through Serve, with the real stream workers -------------------------------------------------------


@pytest.fixture(scope="module")
def serve_url(
    ray_cluster: None, redis_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    from ray import serve

    from deployments.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    home = str(tmp_path_factory.mktemp("metrics-lake"))
    app = build_app(
        {"namespace": redis_settings.namespace, "redis_url": redis_settings.redis_url, "home": home}
    )
    serve.run(app, name="rayrec-metrics-test", route_prefix="/")
    yield f"http://127.0.0.1:{PORT}"
    serve.delete("rayrec-metrics-test")
    serve.shutdown()  # type: ignore[no-untyped-call]
    # The consumers recreate their (empty) streams until they stop; leave nothing behind.
    leftover = RedisStore.from_settings(redis_settings)
    leftover.delete_namespace()
    leftover.close()


def test_serve_scrape_reports_the_stream_workers(serve_url: str, store: RedisStore) -> None:
    processors = [p.report_name for p in PARTITIONS]
    with httpx.Client(base_url=serve_url, timeout=30) as client:
        before = scrape(client.get("/metrics").text)
        assert (
            client.post("/api/events/batch", json={"events": [_like(n) for n in range(5)]}).status_code == 202
        )
        deadline = time.monotonic() + 60
        while True:
            now = scrape(client.get("/metrics").text)
            processed = {
                c: value(now, "rayrec_consumer_entries_total", consumer=c)
                - value(before, "rayrec_consumer_entries_total", consumer=c)
                for c in processors
            }
            lags = {
                p.group: value(now, "rayrec_consumer_lag_seconds", stream="events", group=p.group)
                for p in PARTITIONS
            }
            if min(processed.values()) >= 5 and max(lags.values()) == 0.0:
                break
            assert time.monotonic() < deadline, f"the processors did not catch up: {processed=} {lags=}"
            time.sleep(0.2)
    assert value(now, "rayrec_consumer_stats_up") == 1.0
    assert value(now, "rayrec_consumer_running", consumer="lake_writer") == 1.0
    cpu = "rayrec_consumer_cpu_seconds_total"
    for consumer in processors:
        assert value(now, "rayrec_consumer_running", consumer=consumer) == 1.0
        assert value(now, cpu, consumer=consumer) >= value(before, cpu, consumer=consumer) > 0
        assert value(now, "rayrec_consumer_batch_seconds_total", consumer=consumer) > 0
    assert (
        value(now, "rayrec_events_accepted_total", event_type="like")
        - value(before, "rayrec_events_accepted_total", event_type="like")
        == 5
    )
    assert value(now, "rayrec_stream_length", stream="events") >= 5
