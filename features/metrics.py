"""Prometheus metrics of the write path: event intake, stream consumers, lake writes, trimming.

The metrics live on a :class:`prometheus_client.CollectorRegistry` passed in, so tests and
several consumers in one process never clash over metric names. Production code shares one set
registered on the default registry through :func:`default_metrics`; an exporter (``start_http_server``
or a Serve route) publishes it.

Label values are bounded: event types, consumer group names, stream kinds (``events``,
``impressions``), lake table names and a short list of rejection reasons.
"""

from __future__ import annotations

import threading
from typing import Final

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

BATCH_BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class StreamMetrics:
    """The write-path metrics, registered on one registry.

    Args:
        registry: Where to register; a fresh private registry when omitted.

    Attributes:
        registry: The registry the metrics are on.
        events_accepted: Events accepted by the API, by ``event_type``.
        events_rejected: Events refused (API validation or undecodable stream entries), by
            ``event_type`` (``unknown`` when it could not be read) and ``reason``.
        entries_processed: Stream entries a consumer finished, by ``group`` and ``outcome``
            (``applied``, ``duplicate``, ``skipped``, ``invalid``, ``written``).
        stream_length: Entries in a stream, by ``stream``.
        consumer_lag_s: Age of the oldest entry a group has not finished, by ``stream`` and ``group``.
        batch_seconds: Time to process one batch, by ``group``.
        lake_rows: Rows appended to the lake, by ``table``.
        trimmed_entries: Entries trimmed from a stream after every group acknowledged them.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True) if registry is None else registry
        r = self.registry
        self.events_accepted = Counter(
            "rayrec_events_accepted", "Events accepted by the API.", ["event_type"], registry=r
        )
        self.events_rejected = Counter(
            "rayrec_events_rejected", "Events refused.", ["event_type", "reason"], registry=r
        )
        self.entries_processed = Counter(
            "rayrec_stream_entries_processed",
            "Stream entries a consumer group finished.",
            ["group", "outcome"],
            registry=r,
        )
        self.stream_length = Gauge("rayrec_stream_length", "Entries in a stream.", ["stream"], registry=r)
        self.consumer_lag_s = Gauge(
            "rayrec_consumer_lag_seconds",
            "Age of the oldest entry a consumer group has not finished (0 when caught up).",
            ["stream", "group"],
            registry=r,
        )
        self.batch_seconds = Histogram(
            "rayrec_stream_batch_seconds",
            "Time to process one batch of stream entries.",
            ["group"],
            buckets=BATCH_BUCKETS_S,
            registry=r,
        )
        self.lake_rows = Counter(
            "rayrec_lake_rows_written", "Rows appended to the lake.", ["table"], registry=r
        )
        self.trimmed_entries = Counter(
            "rayrec_stream_trimmed_entries",
            "Entries trimmed after every consumer group acknowledged them.",
            ["stream"],
            registry=r,
        )


_default: StreamMetrics | None = None
_default_lock = threading.Lock()


def default_metrics() -> StreamMetrics:
    """The process-wide metrics on ``prometheus_client.REGISTRY``, created on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = StreamMetrics(REGISTRY)
        return _default
