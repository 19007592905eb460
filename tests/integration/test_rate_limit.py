"""Per-client rate limiting of the event routes, in-process against the real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.settings import MIN_RATE_LIMIT_BURST, Settings, SettingsError
from deployments.api.app import create_app
from deployments.api.events import MAX_BATCH_EVENTS
from deployments.api.services import ApiServices
from features.metrics import StreamMetrics
from features.rate_limiter import EventRateLimiter
from features.redis_store import RedisStore

pytestmark = pytest.mark.integration

BURST = MIN_RATE_LIMIT_BURST
SLOW = 0.1
"""Events/s low enough that no token comes back while a test runs (one every 10 s)."""


def _event(n: int = 0, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"userId": "u1", "itemId": f"i{n}", "eventType": "click"}
    body.update(overrides)
    return body


def _batch(size: int) -> dict[str, Any]:
    return {"events": [_event(n) for n in range(size)]}


class Api:
    """One app over its own services (a replica), with a private metrics registry."""

    def __init__(self, settings: Settings, client: tuple[str, int] = ("10.0.0.1", 5000)) -> None:
        self.services = ApiServices.from_settings(settings)
        self.metrics = StreamMetrics()
        self.client = TestClient(
            create_app(self.services, stream_metrics=self.metrics),
            raise_server_exceptions=False,
            client=client,
        )
        # One event loop for all calls: the asyncio Redis pool belongs to the loop that opened it.
        self.client.__enter__()

    def rejected(self, event_type: str = "click") -> float:
        value = self.metrics.registry.get_sample_value(
            "rayrec_events_rejected_total", {"event_type": event_type, "reason": "rate_limited"}
        )
        return value or 0.0

    def unchecked(self) -> float:
        return self.metrics.registry.get_sample_value("rayrec_rate_limit_unchecked_total") or 0.0

    def close(self) -> None:
        self.client.__exit__(None, None, None)
        self.services.close()


@pytest.fixture
def limited(redis_settings: Settings, store: RedisStore) -> Settings:
    return redis_settings.replace(rate_limit_events_per_s=SLOW, rate_limit_events_burst=BURST)


@pytest.fixture
def api(limited: Settings) -> Iterator[Api]:
    app = Api(limited)
    yield app
    app.close()


def test_the_burst_admits_the_largest_batch() -> None:
    assert MIN_RATE_LIMIT_BURST >= MAX_BATCH_EVENTS
    with pytest.raises(SettingsError, match="RAYREC_RATE_LIMIT_EVENTS_BURST"):
        Settings.from_env({"RAYREC_RATE_LIMIT_EVENTS_BURST": "999"})
    with pytest.raises(SettingsError, match="RAYREC_RATE_LIMIT_EVENTS_PER_S"):
        Settings.from_env({"RAYREC_RATE_LIMIT_EVENTS_PER_S": "-1"})


def test_a_batch_costs_its_events_and_the_next_call_gets_429(api: Api, store: RedisStore) -> None:
    full = api.client.post("/api/events/batch", json=_batch(BURST))
    assert full.status_code == 202, full.text
    for path, body in [
        ("/api/events", _event()),
        ("/api/events/batch", _batch(1)),
        ("/api/recommendations/feedback", {"userId": "u1", "itemId": "i1", "feedback": "hide"}),
    ]:
        refused = api.client.post(path, json=body)
        assert refused.status_code == 429, (path, refused.text)
        assert int(refused.headers["retry-after"]) >= 1
        error = refused.json()
        assert error["error"] == "rate_limited"
        assert "RAYREC_RATE_LIMIT_EVENTS_PER_S" in error["message"]
        assert f"{SLOW:g} events/s" in error["message"]
    assert store.client.xlen(store.keys.stream_events()) == BURST, "a refused call stores nothing"
    assert not store.client.sismember(store.keys.exclusions("u1"), "i1"), "refused feedback does not hold"
    assert api.rejected("click") == 2 and api.rejected("hide") == 1


def test_refusal_takes_nothing_and_retry_after_tells_when_it_fits(limited: Settings) -> None:
    api = Api(limited.replace(rate_limit_events_per_s=100.0))
    try:
        assert api.client.post("/api/events/batch", json=_batch(BURST - 500)).status_code == 202
        refused = api.client.post("/api/events/batch", json=_batch(MAX_BATCH_EVENTS))
        assert refused.status_code == 429
        # 500 tokens left, 1,000 needed: 500 more at 100/s is about 5 s.
        assert 3 <= int(refused.headers["retry-after"]) <= 6
        assert api.client.post("/api/events/batch", json=_batch(400)).status_code == 202
    finally:
        api.close()


def test_buckets_are_per_client_address(limited: Settings) -> None:
    first, second = Api(limited, ("10.0.0.1", 1)), Api(limited, ("10.0.0.2", 1))
    try:
        assert first.client.post("/api/events/batch", json=_batch(BURST)).status_code == 202
        assert first.client.post("/api/events", json=_event()).status_code == 429
        assert second.client.post("/api/events", json=_event()).status_code == 202
    finally:
        first.close()
        second.close()


def test_buckets_are_per_api_key_and_never_name_it(limited: Settings, store: RedisStore) -> None:
    api = Api(limited.replace(client_api_keys=("key-alpha", "key-beta")))
    alpha, beta = {"X-API-Key": "key-alpha"}, {"X-API-Key": "key-beta"}
    try:
        assert api.client.post("/api/events/batch", json=_batch(BURST), headers=alpha).status_code == 202
        assert api.client.post("/api/events", json=_event(), headers=alpha).status_code == 429
        assert api.client.post("/api/events", json=_event(), headers=beta).status_code == 202
        # A key that is not configured names no bucket of its own: it draws on the address's
        # bucket, and the route refuses it.
        assert (
            api.client.post("/api/events", json=_event(), headers={"X-API-Key": "made-up"}).status_code == 403
        )
        names = list(store.client.scan_iter(match=store.keys.rate_limit_events("*")))
        assert len(names) == 3, names
        assert not any("key-alpha" in name or "key-beta" in name for name in names)
    finally:
        api.close()


def test_replicas_share_one_bucket(limited: Settings) -> None:
    one, two = Api(limited), Api(limited)
    try:
        assert one.client.post("/api/events/batch", json=_batch(BURST)).status_code == 202
        assert two.client.post("/api/events", json=_event()).status_code == 429
    finally:
        one.close()
        two.close()


def test_an_over_limit_client_is_refused_before_validation(api: Api) -> None:
    assert api.client.post("/api/events/batch", json=_batch(BURST)).status_code == 202
    invalid = api.client.post("/api/events", json=_event(eventType="teleport"))
    assert invalid.status_code == 429
    assert api.rejected("unknown") == 1


def test_forwarded_for_counts_only_behind_trusted_proxies(limited: Settings) -> None:
    trusting = Api(limited.replace(rate_limit_trusted_proxies=1))
    naive = Api(limited)
    try:
        forwarded = {"X-Forwarded-For": "198.51.100.7"}
        assert (
            trusting.client.post("/api/events/batch", json=_batch(BURST), headers=forwarded).status_code
            == 202
        )
        assert trusting.client.post("/api/events", json=_event(), headers=forwarded).status_code == 429
        other = {"X-Forwarded-For": "198.51.100.8"}
        assert trusting.client.post("/api/events", json=_event(), headers=other).status_code == 202
        # Without trusted proxies the header is the client's word and is ignored: the connection
        # address is what counts, so forging a new address per call does not help.
        assert (
            naive.client.post("/api/events/batch", json=_batch(BURST), headers=forwarded).status_code == 202
        )
        assert naive.client.post("/api/events", json=_event(), headers=other).status_code == 429
    finally:
        trusting.close()
        naive.close()


def test_zero_rate_disables_the_limit(redis_settings: Settings, store: RedisStore) -> None:
    api = Api(redis_settings.replace(rate_limit_events_per_s=0.0))
    try:
        for _ in range(3):
            assert api.client.post("/api/events/batch", json=_batch(MAX_BATCH_EVENTS)).status_code == 202
        assert list(store.client.scan_iter(match=store.keys.rate_limit_events("*"))) == []
    finally:
        api.close()


def test_other_routes_are_not_limited(api: Api) -> None:
    assert api.client.post("/api/events/batch", json=_batch(BURST)).status_code == 202
    assert api.client.get("/healthz").status_code == 200
    assert api.client.put("/api/users/u1", json={"userId": "u1"}).status_code == 200


def test_redis_down_fails_open_and_the_intake_answers_503(redis_settings: Settings) -> None:
    dead = redis_settings.replace(
        redis_url="redis://127.0.0.1:6399/0", redis_timeout_s=0.5, rate_limit_events_per_s=SLOW
    )
    api = Api(dead)
    try:
        started = time.monotonic()
        answers = [api.client.post("/api/events", json=_event()) for _ in range(3)]
        elapsed_s = time.monotonic() - started
    finally:
        api.close()
    assert [a.status_code for a in answers] == [503, 503, 503]
    assert answers[0].json()["error"] == "store_unreachable"
    assert api.unchecked() == 3
    assert elapsed_s < 10, "the limiter must not add waits of its own to the outage"


def test_a_hung_check_lets_the_call_through_and_backs_off(store: RedisStore) -> None:
    calls = 0

    async def hung(**_: Any) -> list[str]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(5)
        return ["1", "0", "0"]

    async def run() -> list[bool]:
        limiter = EventRateLimiter(store, 1.0, BURST, budget_s=0.05, fail_open_s=30.0)
        limiter._script = hung
        started = time.monotonic()
        decisions = [await limiter.acquire("addr:10.0.0.9", 1) for _ in range(5)]
        assert time.monotonic() - started < 2.0, "only the first check waits, and only its budget"
        return [d.allowed and not d.checked for d in decisions]

    assert asyncio.run(run()) == [True] * 5
    assert calls == 1


def test_buckets_refill_at_the_rate_and_expire_when_full(store: RedisStore) -> None:
    async def run() -> None:
        limiter = EventRateLimiter(store, 1000.0, BURST)
        assert (await limiter.acquire("addr:10.0.0.5", BURST)).allowed
        refused = await limiter.acquire("addr:10.0.0.5", BURST)
        assert not refused.allowed and 0 < refused.retry_after_s <= 1.0
        await asyncio.sleep(1.1)
        assert (await limiter.acquire("addr:10.0.0.5", BURST)).allowed
        ttl_ms = store.client.pttl(store.keys.rate_limit_events("addr:10.0.0.5"))
        assert 0 < ttl_ms <= 2100, "an empty bucket is full again after burst/rate seconds"
        await store.aclient.aclose()

    asyncio.run(run())
