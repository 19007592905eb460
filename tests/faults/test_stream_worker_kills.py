"""Scenario 2: the stream processors and the lake writer are killed in the middle of a burst."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from features.partitions import PARTITIONS
from tests.faults.harness import FaultApp, TrafficDriver, consumer_actor, until

# The first scenario of a run also waits for the shared application (a smoke training run).
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(2400)]

BURST_BATCHES = 30
BURST_SIZE = 50


def _stats(actor: Any) -> dict[str, Any]:
    import ray

    stats: dict[str, Any] = ray.get(actor.stats.remote(), timeout=30)
    return stats


def _past(actor: Any, entries: int) -> Callable[[], bool]:
    return lambda: bool(_stats(actor)["entries"] >= entries)


def test_killed_stream_consumers_lose_nothing_and_count_nothing_twice(fault_app: FaultApp) -> None:
    import ray

    processors = [consumer_actor(fault_app, f"stream-processor-{p.name}") for p in PARTITIONS]
    writer = consumer_actor(fault_app, "lake-writer")
    with TrafficDriver(fault_app, "consumer-kills") as traffic:
        traffic.wait_calls(5, "events")
        processed = [_stats(processor)["entries"] for processor in processors]
        burst = threading.Thread(target=traffic.burst, args=(BURST_BATCHES, BURST_SIZE), daemon=True)
        burst.start()
        # Mid-burst: each processor has folded part of the burst, not all of it.
        for processor, before in zip(processors, processed, strict=True):
            until(_past(processor, before + 3 * BURST_SIZE), 60, "the burst being processed")
            ray.kill(processor, no_restart=False)
        # The lake writer holds read, unacknowledged entries in its buffer when it dies.
        until(lambda: _stats(writer)["buffered"] > 0, 60, "the lake writer buffering the burst")
        ray.kill(writer, no_restart=False)
        burst.join(timeout=120)
        assert not burst.is_alive(), "the burst did not finish"
        traffic.wait_calls(10)
        after_processors, after_writer = [_stats(p) for p in processors], _stats(writer)
    assert all(stats["running"] for stats in after_processors) and after_writer["running"]
    traffic.finish(
        burst_events=BURST_BATCHES * BURST_SIZE,
        processors_after_restart=[stats["entries"] for stats in after_processors],
        writer_after_restart=after_writer["entries"],
    )
