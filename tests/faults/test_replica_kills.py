"""Scenario 1: a replica of each deployment is killed under traffic and Serve replaces it."""

from __future__ import annotations

import pytest

from features.partitions import PARTITIONS
from tests.faults.conftest import REPLICAS
from tests.faults.harness import FaultApp, TrafficDriver, consumer_actor, kill_replica, wait_replaced

# The first scenario of a run also waits for the shared application (a smoke training run).
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(2400)]

DEPLOYMENTS = ("ingress", "retrieval", "ranker", "stream_workers")


def _consumer_actor_ids(fault_app: FaultApp) -> set[str]:
    roles = [*(f"stream-processor-{p.name}" for p in PARTITIONS), "lake-writer"]
    return {consumer_actor(fault_app, role)._actor_id.hex() for role in roles}


def test_a_killed_replica_of_each_deployment_is_replaced_and_nothing_is_lost(fault_app: FaultApp) -> None:
    killed: dict[str, str] = {}
    consumers = _consumer_actor_ids(fault_app)
    with TrafficDriver(fault_app, "replica-kills") as traffic:
        traffic.wait_calls(10)
        for deployment in DEPLOYMENTS:
            # Only calls in flight on the killed replica may need a retry; the window closes
            # once Serve runs a replacement.
            with traffic.retries_tolerated():
                killed[deployment] = kill_replica(deployment)
                wait_replaced(deployment, killed[deployment], REPLICAS.get(deployment, 1))
            traffic.wait_calls(10)
        fault_app.wait_serving()
        traffic.wait_calls(10)
        for call in traffic.recent("recommend", 5):
            assert call.outcome == "200" and call.fallback == "none", call
    # The stream workers replica owns both consumer actors: they died with it and its
    # replacement started new ones.
    assert not consumers & _consumer_actor_ids(fault_app)
    report = traffic.finish(killed=killed)
    assert report.events_accepted > 0
