"""``GET /metrics``: the write path in the Prometheus text format.

One scrape reports three kinds of series:

- this process's counters (:class:`features.metrics.StreamMetrics` of the app): events accepted
  by type, events refused by type and reason (``invalid`` and ``malformed_json`` for 422/400,
  ``stream_full`` and ``store_unreachable`` for 503), plus whatever else is registered there;
- read from Redis at scrape time: each stream's length and each consumer group's lag, pending
  and undelivered entries (:func:`features.metrics.read_stream_status`), and
  ``rayrec_store_up``, which is 0 when Redis did not answer (the counters are still served);
- the stream consumers' own totals, when this process can reach them (``services.stream_stats``):
  batches, entries, time spent processing, errors, whether the loop runs, and
  ``rayrec_consumer_stats_up``.

The process registry also holds the read path's series (:mod:`deployments.recommender.metrics`).
Behind the Serve proxy a scrape reaches one ingress replica, so with several replicas the
counters and histograms are read from Ray's metrics export instead, where every replica mirrors
them (:class:`features.metrics.RayMetricsBridge`); the Redis-backed series are the same from
every replica, so any one scrape has them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from redis.exceptions import RedisError

from deployments.api.auth import services_of
from features.metrics import StreamMetrics, StreamStatus, read_stream_status, watched_streams
from features.partitions import PARTITIONS

logger = logging.getLogger(__name__)

STATS_TIMEOUT_S: Final = 2.0
"""Longest a scrape waits for the consumers' report; a slow consumer must not stall the scrape."""

_CONSUMERS: Final = {
    **{p.report_name: "batches" for p in PARTITIONS},
    "stream_processor": "batches",
    "lake_writer": "files",
}
"""Consumer report key to the total that counts its batches (the lake writer's are files).

One processor per feature partition (``stream_processor_users``, ``stream_processor_items``),
or one for all of them (``stream_processor``), and the lake writer.
"""

router = APIRouter(tags=["health"])


def metrics_of(request: Request) -> StreamMetrics:
    """The metrics the app counts into, attached at creation."""
    metrics: StreamMetrics = request.app.state.metrics
    return metrics


async def app_metrics(request: Request) -> StreamMetrics:
    """The metrics the app counts into (a dependency; a coroutine so it runs without a thread hop)."""
    return metrics_of(request)


class _Scrape:
    """A collector yielding the process's families, with scrape-time families replacing namesakes.

    The process registry holds gauges of the same names (``rayrec_stream_length``, …) that only a
    consumer running in this process would set; the values read from Redis win.
    """

    def __init__(self, process: CollectorRegistry, computed: Iterable[Metric]) -> None:
        self._process = process
        self._computed = list(computed)

    def collect(self) -> Iterator[Metric]:
        replaced = {family.name for family in self._computed}
        for family in self._process.collect():
            if family.name not in replaced:
                yield family
        yield from self._computed


def stream_families(statuses: Iterable[StreamStatus] | None) -> list[Metric]:
    """Families of stream lengths and group lag; ``statuses`` is ``None`` when Redis did not answer."""
    up = GaugeMetricFamily("rayrec_store_up", "Whether Redis answered this scrape (1) or not (0).")
    up.add_metric([], 0.0 if statuses is None else 1.0)
    length = GaugeMetricFamily("rayrec_stream_length", "Entries in a stream.", labels=["stream"])
    lag = GaugeMetricFamily(
        "rayrec_consumer_lag_seconds",
        "Age of the oldest entry a consumer group has not finished (0 when caught up).",
        labels=["stream", "group"],
    )
    pending = GaugeMetricFamily(
        "rayrec_consumer_pending_entries",
        "Entries delivered to a consumer of the group and not yet acknowledged.",
        labels=["stream", "group"],
    )
    undelivered = GaugeMetricFamily(
        "rayrec_consumer_undelivered_entries",
        "Entries not yet delivered to the group (absent when Redis cannot tell).",
        labels=["stream", "group"],
    )
    for status in statuses or ():
        length.add_metric([status.name], float(status.length))
        for group in status.groups:
            labels = [status.name, group.group]
            lag.add_metric(labels, group.lag_s)
            pending.add_metric(labels, float(group.pending))
            if group.undelivered is not None:
                undelivered.add_metric(labels, float(group.undelivered))
    return [up, length, lag, pending, undelivered]


def consumer_families(report: Mapping[str, Any] | None) -> list[Metric]:
    """Families of the stream consumers' totals; ``report`` is ``None`` when it is unavailable.

    Args:
        report: What ``services.stream_stats`` answered: consumer name (``stream_processor_users``,
            ``stream_processor_items``, ``lake_writer``) to its totals and loop state.

    Returns:
        The families (empty ones, plus ``rayrec_consumer_stats_up 0``, without a report).
    """
    up = GaugeMetricFamily(
        "rayrec_consumer_stats_up", "Whether the stream consumers answered this scrape (1) or not (0)."
    )
    up.add_metric([], 0.0 if report is None else 1.0)
    batches = CounterMetricFamily(
        "rayrec_consumer_batches",
        "Batches a stream consumer finished (the lake writer's are the files it wrote).",
        labels=["consumer"],
    )
    entries = CounterMetricFamily(
        "rayrec_consumer_entries", "Stream entries a consumer handled.", labels=["consumer"]
    )
    busy = CounterMetricFamily(
        "rayrec_consumer_batch_seconds",
        "Seconds a consumer spent processing batches; divide its rate by the batches' rate for "
        "the mean time per batch.",
        labels=["consumer"],
    )
    last = GaugeMetricFamily(
        "rayrec_consumer_last_batch_seconds", "Seconds the consumer's latest batch took.", labels=["consumer"]
    )
    errors = CounterMetricFamily(
        "rayrec_consumer_errors", "Failed steps of a consumer's loop (each retried).", labels=["consumer"]
    )
    running = GaugeMetricFamily(
        "rayrec_consumer_running", "Whether a consumer's loop is running.", labels=["consumer"]
    )
    cpu = CounterMetricFamily(
        "rayrec_consumer_cpu_seconds",
        "CPU seconds of a consumer's process; against its entries' rate, the CPU per entry.",
        labels=["consumer"],
    )
    for consumer, batch_key in _CONSUMERS.items():
        stats = (report or {}).get(consumer)
        if not isinstance(stats, Mapping):
            continue
        labels = [consumer]
        batches.add_metric(labels, float(stats.get(batch_key, 0)))
        entries.add_metric(labels, float(stats.get("entries", 0)))
        errors.add_metric(labels, float(stats.get("errors", 0)))
        running.add_metric(labels, 1.0 if stats.get("running") else 0.0)
        if "cpu_s" in stats:
            cpu.add_metric(labels, float(stats["cpu_s"]))
        if "busy_s" in stats:
            busy.add_metric(labels, float(stats["busy_s"]))
            last.add_metric(labels, float(stats.get("last_batch_s", 0.0)))
    return [up, batches, entries, busy, last, errors, running, cpu]


async def _consumer_report(request: Request) -> Mapping[str, Any] | None:
    stream_stats = services_of(request).stream_stats
    if stream_stats is None:
        return None
    try:
        return await asyncio.wait_for(stream_stats(), STATS_TIMEOUT_S)
    except Exception as exc:  # any failure of the consumers must still leave a scrape
        logger.warning("metrics: the stream consumers did not report: %s", exc)
        return None


async def _stream_statuses(request: Request) -> list[StreamStatus] | None:
    store = services_of(request).store
    try:
        return await read_stream_status(store.aclient, watched_streams(store.keys))
    except (RedisError, OSError) as exc:
        logger.warning("metrics: Redis did not answer: %s", exc)
        return None


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format."}},
)
async def metrics(request: Request) -> Response:
    """The write path's metrics in the Prometheus text format (see the module docstring)."""
    statuses, report = await asyncio.gather(_stream_statuses(request), _consumer_report(request))
    registry = CollectorRegistry(auto_describe=False)
    computed = [*stream_families(statuses), *consumer_families(report)]
    registry.register(_Scrape(metrics_of(request).registry, computed))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
