"""Scenario 3: the online store stops (SIGKILL) and starts again under traffic.

The application's Redis is the fault suite's own, with an append-only file written before every
reply, so what was acknowledged before the stop is still there after the restart.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.faults.harness import FaultApp, TrafficDriver

# The first scenario of a run also waits for the shared application (a smoke training run).
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(2400)]

RECONNECT_GRACE_S = 2.0
DOWN_CALLS = 20
"""Recommendation requests answered while Redis is down before it is started again."""


def test_a_redis_restart_refuses_events_serves_fallbacks_and_recovers_by_itself(fault_app: FaultApp) -> None:
    with TrafficDriver(fault_app, "redis-restart") as traffic:
        traffic.wait_calls(20)
        with traffic.outage():
            fault_app.redis.crash()
            traffic.wait_calls(DOWN_CALLS)
            traffic.wait_calls(3, "events")
            with httpx.Client(base_url=fault_app.url, timeout=30) as client:
                assert client.get("/readyz").status_code == 503
                assert client.get("/healthz").status_code == 200
            down = traffic.recent("recommend", DOWN_CALLS)
            refused_while_down = len(traffic.refused)
            fault_app.redis.start()
            # A replica's pooled connection from before the stop fails its next call once
            # (503, nothing stored, the client retries); past this grace a refusal is an error.
            time.sleep(RECONNECT_GRACE_S)
        # From here on an event refused is an error: the replicas must reconnect by themselves.
        traffic.wait_calls(10, "events")
        fault_app.wait_serving()
        traffic.wait_calls(10)
    assert all(c.outcome == "200" for c in down), down
    # The pipeline cannot read the user or the candidate state: every answer names its fallback.
    assert all(c.fallback != "none" for c in down), [c.fallback for c in down]
    assert refused_while_down > 0, "no event call was refused while Redis was down"
    report = traffic.finish(down_fallbacks=sorted({str(c.fallback) for c in down}))
    # Calls in flight when Redis stopped are refused after the count above was taken.
    assert report.events_refused >= refused_while_down
