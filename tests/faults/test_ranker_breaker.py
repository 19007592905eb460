"""Scenario 4: the ranker turns slow, then fails; the breaker in front of it opens and closes."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.faults.harness import FaultApp, TrafficDriver, until
from tests.integration.test_serving_graph import WIDEN

# The first scenario of a run also waits for the shared application (a smoke training run).
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(2400)]

SLOW_MS = 5 * 30 * WIDEN
"""Far past the (widened) ranking budget."""


def _breakers(fault_app: FaultApp, calls: int = 6) -> list[dict[str, Any]]:
    """The breaker of the ingress replicas the status calls reached (each replica has its own)."""
    return [fault_app.admin_status()["rankerBreaker"] for _ in range(calls)]


def test_a_slow_then_failing_ranker_opens_the_breaker_and_it_closes_again(fault_app: FaultApp) -> None:
    opened_before = max(b["openedTotal"] for b in _breakers(fault_app))
    with TrafficDriver(fault_app, "ranker-breaker") as traffic:
        traffic.wait_calls(10)
        try:
            fault_app.set_fault("ranker", "slow", SLOW_MS)
            until(
                lambda: any(b["openedTotal"] > opened_before for b in _breakers(fault_app)),
                60,
                "the breaker opening on a slow ranker",
            )
            traffic.wait_calls(10)
            slow = traffic.recent("recommend", 10)
            fault_app.set_fault("ranker", "raise")
            time.sleep(1.5)  # the breaker's cool-down: the probes now fail at once
            traffic.wait_calls(10)
            until(lambda: any(b["state"] != "closed" for b in _breakers(fault_app)), 60, "the breaker open")
            failing = traffic.recent("recommend", 10)
        finally:
            fault_app.set_fault("ranker", None)
        until(lambda: all(b["state"] == "closed" for b in _breakers(fault_app)), 60, "the breaker closing")
        fault_app.wait_serving()
        traffic.wait_calls(10)
        healthy = traffic.recent("recommend", 10)
    for call in slow + failing:
        assert call.outcome == "200" and call.fallback == "ranker_prescore", call
    assert all(c.fallback == "none" for c in healthy), healthy
    breakers = _breakers(fault_app)
    report = traffic.finish(opened_total=max(b["openedTotal"] for b in breakers) - opened_before)
    assert report.fallbacks.get("ranker_prescore", 0) >= len(slow + failing)
