"""``GET /metrics``: the series move with the events posted and the consumers' progress."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from core.schema import Item, ItemType
from core.settings import Settings
from deployments.api.app import create_app
from deployments.api.services import ApiServices
from features.catalog import CatalogStore
from features.metrics import StreamMetrics
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
    with httpx.Client(base_url=serve_url, timeout=30) as client:
        before = scrape(client.get("/metrics").text)
        assert (
            client.post("/api/events/batch", json={"events": [_like(n) for n in range(5)]}).status_code == 202
        )
        deadline = time.monotonic() + 60
        while True:
            now = scrape(client.get("/metrics").text)
            processed = value(now, "rayrec_consumer_entries_total", consumer="stream_processor") - value(
                before, "rayrec_consumer_entries_total", consumer="stream_processor"
            )
            lag = value(now, "rayrec_consumer_lag_seconds", stream="events", group="features")
            if processed >= 5 and lag == 0.0:
                break
            assert time.monotonic() < deadline, f"the processor did not catch up: {processed=} {lag=}"
            time.sleep(0.2)
    assert value(now, "rayrec_consumer_stats_up") == 1.0
    assert value(now, "rayrec_consumer_running", consumer="stream_processor") == 1.0
    assert value(now, "rayrec_consumer_running", consumer="lake_writer") == 1.0
    cpu = "rayrec_consumer_cpu_seconds_total"
    assert value(now, cpu, consumer="stream_processor") >= value(before, cpu, consumer="stream_processor") > 0
    assert (
        value(now, "rayrec_events_accepted_total", event_type="like")
        - value(before, "rayrec_events_accepted_total", event_type="like")
        == 5
    )
    assert value(now, "rayrec_consumer_batch_seconds_total", consumer="stream_processor") > 0
    assert value(now, "rayrec_stream_length", stream="events") >= 5


# -- Ray's metrics export and the Grafana dashboard ------------------------------------------------

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "rayrec-dashboard.json"
SELECTOR = re.compile(r"\b(ray_[a-zA-Z0-9_]+)\s*(\{[^}]*\})?")
MATCHER = re.compile(r'(\w+)\s*(=~|=)\s*"([^"]*)"')
MAY_STAY_ZERO = {
    "ray_rayrec_ranker_circuit_state": "0 is the closed breaker, the healthy state",
    "ray_rayrec_ranker_circuit_opened": "the breaker does not open without ranker failures",
    "ray_rayrec_consumer_lag_seconds": "0 when the consumers have caught up",
    "ray_rayrec_recommendation_fallbacks_total": "healthy traffic falls back only when the machine is slow; "
    "tests/faults and test_serving_graph.py make every fallback kind move",
}
"""Series that may show 0 (or be absent) after healthy traffic; every other one must have moved."""
CATEGORIES = ("music", "sport", "news")


@dataclass(frozen=True)
class Selector:
    """One series a dashboard expression reads: a name and its label matchers."""

    name: str
    matchers: tuple[tuple[str, str, str], ...]

    def matches(self, labels: dict[str, str]) -> bool:
        for label, op, wanted in self.matchers:
            got = labels.get(label)
            if got is None or (got != wanted if op == "=" else re.fullmatch(wanted, got) is None):
                return False
        return True


def dashboard_selectors(dashboard: dict[str, Any]) -> set[Selector]:
    """Every series selector in the PromQL of every panel."""
    selectors: set[Selector] = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            for name, braces in SELECTOR.findall(target["expr"]):
                matchers = tuple(sorted(MATCHER.findall(braces or "")))
                selectors.add(Selector(name, matchers))
    return selectors


def ray_export(metrics_port: int) -> list[tuple[str, dict[str, str], float]]:
    """The samples Ray's metrics agent of this node exports."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    return [
        (sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def total(samples: list[tuple[str, dict[str, str], float]], selector: Selector) -> float | None:
    """Sum of the matching samples (every replica and actor), ``None`` when there is none."""
    values = [v for name, labels, v in samples if name == selector.name and selector.matches(labels)]
    return sum(values) if values else None


def test_dashboard_panels_read_series_of_the_app() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    names = {s.name for s in dashboard_selectors(dashboard)}
    for wanted in (
        "ray_rayrec_recommendation_latency_ms_bucket",
        "ray_rayrec_pipeline_stage_latency_ms_bucket",
        "ray_rayrec_candidate_source_latency_ms_bucket",
        "ray_rayrec_candidate_source_candidates_sum",
        "ray_rayrec_filter_removed_total",
        "ray_rayrec_recommendation_fallbacks_total",
        "ray_rayrec_ranker_circuit_state",
        "ray_rayrec_cache_lookups_total",
        "ray_rayrec_model_version_info",
        "ray_rayrec_consumer_lag_seconds",
        "ray_rayrec_events_accepted_total",
        "ray_rayrec_quality_ctr",
        "ray_rayrec_quality_negative_feedback_rate",
        "ray_rayrec_quality_coverage",
        "ray_rayrec_quality_intra_list_diversity",
        "ray_serve_num_http_requests_total",
        "ray_serve_num_http_error_requests_total",
    ):
        assert wanted in names, f"no panel reads {wanted}"


def _seed_catalog(store: RedisStore, n: int) -> list[str]:
    catalog = CatalogStore(store)
    ids = [f"obs-{k}" for k in range(n)]
    for k, item_id in enumerate(ids):
        catalog.put_item(
            Item(
                item_id=item_id,
                item_type=ItemType.VIDEO,
                title=f"item {k}",
                category=CATEGORIES[k % len(CATEGORIES)],
                creator_id=f"creator-{k % 5}",
            )
        )
    return ids


def test_every_dashboard_series_moves_in_rays_export_after_traffic(serve_url: str, store: RedisStore) -> None:
    import ray

    metrics_port = int(ray.nodes()[0]["MetricsExportPort"])  # type: ignore[no-untyped-call]
    selectors = dashboard_selectors(json.loads(DASHBOARD.read_text()))
    before = ray_export(metrics_port)
    items = _seed_catalog(store, 30)
    users = [f"obs-u{k}" for k in range(6)]
    kinds = ["view", "click", "view", "like", "click", "hide", "not_interested", "report", "view"]
    with httpx.Client(base_url=serve_url, timeout=30) as client:
        events = [
            {
                "userId": u,
                "itemId": items[(k * 7 + j) % len(items)],
                "eventType": kind,
                "context": {"surface": "home"},
            }
            for k, u in enumerate(users)
            for j, kind in enumerate(kinds)
        ]
        assert client.post("/api/events/batch", json={"events": events}).status_code == 202
        for round_ in range(3):
            for user in users:
                answer = client.get("/api/recommendations", params={"userId": user, "limit": 10})
                assert answer.status_code == 200, answer.text
                assert answer.json()["items"], f"empty list for {user} in round {round_}"
        teleport = {"events": [{"userId": users[0], "itemId": items[0], "eventType": "teleport"}]}
        assert client.post("/api/events/batch", json=teleport).status_code == 422
        refused = client.get("/api/recommendations", params={"userId": users[0], "limit": 0})
        assert refused.status_code == 422
        assert "limit" in refused.text
        replica = scrape(client.get("/metrics").text)

    # The replica's own registry: the new series, before Ray's export has them.
    assert value(replica, "rayrec_impressions_total", surface="home") > 0
    assert value(replica, "rayrec_cache_lookups_total", cache="catalog", outcome="hit") > 0
    assert value(replica, "rayrec_quality_ctr") > 0
    assert value(replica, "rayrec_quality_negative_feedback_rate") > 0
    assert 0 < value(replica, "rayrec_quality_coverage") <= 1
    assert 0 < value(replica, "rayrec_quality_intra_list_diversity") <= 1

    # The mirror pushes every 5 s and Ray's agent exports every 10 s.
    deadline = time.monotonic() + 45
    while True:
        after = ray_export(metrics_port)
        missing: list[str] = []
        for selector in sorted(selectors, key=lambda s: s.name):
            now, then = total(after, selector), total(before, selector) or 0.0
            if selector.name in MAY_STAY_ZERO:
                continue
            if now is None:
                missing.append(f"{selector} absent")
            elif selector.name.endswith(("_total", "_count", "_sum", "_bucket")):
                if now <= then:
                    missing.append(f"{selector} did not move ({then} -> {now})")
            elif now <= 0:
                missing.append(f"{selector} is {now}")
        if not missing:
            break
        assert time.monotonic() < deadline, "\n".join(missing)
        time.sleep(2)
