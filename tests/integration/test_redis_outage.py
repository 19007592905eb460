"""Redis stops and comes back: event routes answer 503, and nothing acknowledged is lost.

The shared Redis of the other integration tests keeps nothing on disk, so a restart of it loses
everything by design. This module runs its own ``redis-server`` with the persistence an operator
would use for the event hand-off (append-only file, ``appendfsync always``) and kills it with
SIGKILL, the harshest stop: every write Redis acknowledged is in the AOF before the reply left.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from core.lake import Lake
from core.schema import EntityType
from core.settings import Settings
from deployments.api.app import create_app
from deployments.api.services import ApiServices
from features.lake_writer import LakeWriter
from features.metrics import StreamMetrics
from features.online_store import OnlineFeatureStore, marker_bucket
from features.partitions import PARTITIONS
from features.redis_store import RedisStore
from features.stream_codec import decode_event
from features.stream_processor import StreamProcessor

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class DurableRedis:
    """A ``redis-server`` of the test's own, persisting every write to an AOF before answering."""

    port: int
    data_dir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                HOST,
                "--port",
                str(self.port),
                "--dir",
                str(self.data_dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host=HOST, port=self.port, socket_connect_timeout=0.5, socket_timeout=2)
        deadline = time.monotonic() + 20
        try:
            while time.monotonic() < deadline:
                try:
                    # PING answers while the AOF is still being replayed (other commands get
                    # LOADING then), so ready means the server says it has finished loading.
                    if client.ping() and int(client.info("persistence")["loading"]) == 0:
                        return
                except redis.RedisError:
                    pass
                time.sleep(0.05)
            raise RuntimeError(f"redis-server on port {self.port} did not answer within 20 s")
        finally:
            client.close()

    def crash(self) -> None:
        """SIGKILL: no shutdown save, no flush beyond what ``appendfsync always`` already did."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[DurableRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    data_dir = tmp_path / "redis"
    data_dir.mkdir()
    server = DurableRedis(_free_port(), data_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _event(n: int, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "eventId": f"ev-{n}",
        "userId": f"user-{n % 7}",
        "itemId": f"item-{n % 11}",
        "eventType": ("view", "click", "like", "hide")[n % 4],
        "context": {"surface": "home", "region": "eu"},
    }
    body.update(overrides)
    return body


def _acknowledge(client: TestClient, numbers: range) -> list[str]:
    """Send events (singles and a batch) and return the ids of those answered 202."""
    numbers_list = list(numbers)
    singles, batch = numbers_list[:10], numbers_list[10:]
    acked: list[str] = []
    for n in singles:
        response = client.post("/api/events", json=_event(n))
        assert response.status_code == 202, response.text
        acked.append(response.json()["eventId"])
    if batch:
        response = client.post("/api/events/batch", json={"events": [_event(n) for n in batch]})
        assert response.status_code == 202, response.text
        acked.extend(response.json()["eventIds"])
    return acked


def _drain(settings: Settings, lake_home: Path) -> None:
    """What the stream workers do, in-process, on fresh connections."""
    store = RedisStore.from_settings(settings)
    try:
        for partition in PARTITIONS:
            StreamProcessor(
                store, f"processor-{partition.name}", partition=partition, metrics=StreamMetrics()
            ).drain()
        LakeWriter(store, Lake(str(lake_home)), "lake-0", metrics=StreamMetrics()).drain()
    finally:
        store.close()


def _rejected(metrics: StreamMetrics, reason: str) -> float:
    return sum(
        sample.value
        for family in metrics.registry.collect()
        if family.name == "rayrec_events_rejected"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels["reason"] == reason
    )


def test_acknowledged_events_survive_a_redis_crash_and_the_api_recovers(
    durable_redis: DurableRedis, tmp_path: Path
) -> None:
    settings = Settings.from_env(
        redis_url=durable_redis.url, namespace="outage", home=str(tmp_path / "home"), redis_timeout_s=0.5
    )
    lake_home = tmp_path / "lake"
    metrics = StreamMetrics()
    services = ApiServices.from_settings(settings)
    with TestClient(create_app(services, stream_metrics=metrics), raise_server_exceptions=False) as client:
        # Some events are processed before the crash (the consumer groups' state must survive
        # too), some are only acknowledged.
        processed_before = _acknowledge(client, range(0, 40))
        _drain(settings, lake_home)
        only_acked = _acknowledge(client, range(40, 100))

        durable_redis.crash()

        refused = [
            client.post("/api/events", json=_event(1000)),
            client.post("/api/events/batch", json={"events": [_event(1001), _event(1002)]}),
            client.post(
                "/api/recommendations/feedback", json={"userId": "u1", "itemId": "i1", "feedback": "hide"}
            ),
        ]
        for response in refused:
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "2"
            assert response.json()["error"] == "store_unreachable"
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200
        scrape = client.get("/metrics")
        assert scrape.status_code == 200 and "rayrec_store_up 0.0" in scrape.text
        assert _rejected(metrics, "store_unreachable") == 4  # 1 + 2 + 1 refused events

        durable_redis.start()

        # The same services, pools and app: no rebuild. Stale pooled connections are replaced on
        # the first call.
        assert client.get("/readyz").status_code == 200
        after = _acknowledge(client, range(100, 130))
        assert "rayrec_store_up 1.0" in client.get("/metrics").text
    services.close()

    acked = processed_before + only_acked + after
    assert len(set(acked)) == 130
    store = RedisStore.from_settings(settings)
    try:
        entries: Any = store.client.xrange(store.keys.stream_events())
        stored_events = [decode_event(fields) for _, fields in entries]
        stored = [event.event_id for event in stored_events]
        assert sorted(stored) == sorted(acked), "every acknowledged event is in the stream, once"
        assert not {"ev-1000", "ev-1001", "ev-1002"} & set(stored), "a refused event was stored"

        _drain(settings, lake_home)

        # Features: every acknowledged event folded exactly once.
        sent = {n: _event(n) for n in range(130)}
        by_item = Counter(body["itemId"] for body in sent.values())
        records = OnlineFeatureStore(store).get_serving(EntityType.ITEM, list(by_item))
        assert {
            item: (record or {}).get("item_engagement:event_count_total")
            for item, record in zip(by_item, records, strict=True)
        } == dict(by_item)
        time_of = {event.event_id: event.timestamp.timestamp() for event in stored_events}
        for p in PARTITIONS:
            for event_id in acked:
                marker_set = store.keys.processed_events(p.name, marker_bucket(time_of[event_id]))
                assert store.client.sismember(marker_set, event_id), (p.name, event_id)
        hidden = {
            body["itemId"]
            for body in sent.values()
            if body["eventType"] == "hide" and body["userId"] == "user-3"
        }
        assert store.client.smembers(store.keys.exclusions("user-3")) == hidden
    finally:
        store.close()

    # The lake: every acknowledged event written once, none twice.
    written = Counter(Lake(str(lake_home)).read("events").column("event_id").to_pylist())
    assert written == Counter(acked)
