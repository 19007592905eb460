"""Prometheus metrics of the write path: event intake, stream consumers, lake writes, trimming.

The metrics live on a :class:`prometheus_client.CollectorRegistry` passed in, so tests and
several consumers in one process never clash over metric names. Production code shares one set
registered on the default registry through :func:`default_metrics`; an exporter (``start_http_server``
or a Serve route) publishes it.

Label values are bounded: event types, consumer group names, stream kinds (``events``,
``impressions``), lake table names and a short list of rejection reasons.

Stream lengths and consumer lag are facts about Redis, not about one process, so an exporter
reads them when it is scraped (:func:`read_stream_status`) instead of trusting gauges that some
consumer process last set.

Inside a Ray worker (a Serve replica, the stream consumers' actors) the process registry is also
mirrored into Ray's metrics (:class:`RayMetricsBridge`), which each node's metrics agent exports
for Prometheus as ``ray_<name>``: one scrape target per node covers every replica and actor on
it, however many there are and wherever Serve placed them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import redis.asyncio as aredis
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from redis.exceptions import ResponseError

from core.tables import EDGES, ITEMS, USERS
from features.keys import RedisKeys
from features.stream_codec import entry_ms

logger = logging.getLogger(__name__)

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
    """The process-wide metrics on ``prometheus_client.REGISTRY``, created on first use.

    In a Ray worker the registry is mirrored into Ray's metrics from then on (:func:`export_to_ray`).
    """
    global _default
    with _default_lock:
        if _default is None:
            _default = StreamMetrics(REGISTRY)
    export_to_ray(REGISTRY)
    return _default


# -- export through Ray's metrics agent -----------------------------------------------------------

EXPORTED_PREFIX: Final = "rayrec_"
"""Only the project's families are mirrored; Ray and Serve export their own."""
RAY_EXPORT_INTERVAL_S: Final = 5.0
"""How often the mirror pushes; Ray's agent exports what it holds every 10 s anyway."""

_LabelKey = tuple[tuple[str, str], ...]


def _bucket_points(bounds: list[float]) -> list[float]:
    """A value inside each bucket (midpoints; past the last bound for ``+Inf``).

    A midpoint lands in the same bucket whichever side of a boundary Ray's buckets include.
    """
    points: list[float] = []
    lower = 0.0
    for bound in bounds:
        points.append((lower + bound) / 2.0 if bound > lower else bound)
        lower = bound
    points.append(lower * 1.5 + 1.0)
    return points


class RayMetricsBridge:
    """Mirrors the ``rayrec_*`` families of a registry into ``ray.util.metrics``.

    Counters are pushed as increments since the previous pass, gauges as their value, histograms
    as one observation per new sample at a point inside its bucket (so bucket counts, hence
    quantiles, are exact; ``_sum`` is approximated by those points). Ray's Prometheus names are
    ``ray_`` followed by the names served at ``/metrics``.

    Args:
        registry: The registry to mirror.
        interval_s: Seconds between passes of :meth:`start`'s thread.
    """

    def __init__(self, registry: CollectorRegistry, interval_s: float = RAY_EXPORT_INTERVAL_S) -> None:
        self.registry = registry
        self.interval_s = interval_s
        self._metrics: dict[str, Any] = {}
        self._counters: dict[tuple[str, _LabelKey], float] = {}
        self._buckets: dict[tuple[str, _LabelKey], list[float]] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _metric(self, kind: str, name: str, doc: str, labels: Iterable[str], bounds: list[float]) -> Any:
        metric = self._metrics.get(name)
        if metric is None:
            from ray.util import metrics as ray_metrics

            tags = tuple(sorted(labels))
            if kind == "counter":
                metric = ray_metrics.Counter(name, doc, tag_keys=tags)
            elif kind == "gauge":
                metric = ray_metrics.Gauge(name, doc, tag_keys=tags)
            else:
                metric = ray_metrics.Histogram(name, doc, boundaries=bounds, tag_keys=tags)
            self._metrics[name] = metric
        return metric

    def push(self) -> int:
        """Mirror the registry once.

        Returns:
            Samples pushed (increments, gauge values and observations).
        """
        pushed = 0
        for family in self.registry.collect():
            if not family.name.startswith(EXPORTED_PREFIX):
                continue
            # One family Ray refuses must not keep the others from being exported.
            try:
                if family.type == "counter":
                    pushed += self._push_counter(family)
                elif family.type == "gauge":
                    pushed += self._push_gauge(family)
                elif family.type == "histogram":
                    pushed += self._push_histogram(family)
            except Exception as exc:
                logger.warning("metric %s not pushed to Ray: %s", family.name, exc)
        return pushed

    def _push_counter(self, family: Any) -> int:
        pushed = 0
        for sample in family.samples:
            if sample.name != f"{family.name}_total":
                continue
            key = (family.name, tuple(sorted(sample.labels.items())))
            delta = sample.value - self._counters.get(key, 0.0)
            if delta > 0:
                metric = self._metric("counter", family.name, family.documentation, sample.labels, [])
                metric.inc(delta, tags=dict(sample.labels))
                self._counters[key] = sample.value
                pushed += 1
        return pushed

    def _push_gauge(self, family: Any) -> int:
        for sample in family.samples:
            metric = self._metric("gauge", family.name, family.documentation, sample.labels, [])
            metric.set(sample.value, tags=dict(sample.labels))
        return len(family.samples)

    def _push_histogram(self, family: Any) -> int:
        cumulative: dict[_LabelKey, list[tuple[float, float]]] = {}
        for sample in family.samples:
            if sample.name != f"{family.name}_bucket":
                continue
            le = float(sample.labels["le"])
            if le <= 0:
                # Ray takes positive boundaries only; the first positive bucket's cumulative
                # count already holds these samples.
                continue
            labels = {k: v for k, v in sample.labels.items() if k != "le"}
            cumulative.setdefault(tuple(sorted(labels.items())), []).append((le, sample.value))
        pushed = 0
        for label_key, rows in cumulative.items():
            rows.sort()
            bounds = [le for le, _ in rows if le != float("inf")]
            counts = [c - (rows[i - 1][1] if i else 0.0) for i, (_, c) in enumerate(rows)]
            key = (family.name, label_key)
            previous = self._buckets.get(key, [0.0] * len(counts))
            self._buckets[key] = counts
            metric = self._metric("histogram", family.name, family.documentation, dict(label_key), bounds)
            tags = dict(label_key)
            for point, now, before in zip(_bucket_points(bounds), counts, previous, strict=True):
                for _ in range(int(now - before)):
                    metric.observe(point, tags=tags)
                    pushed += 1
        return pushed

    def start(self) -> None:
        """Push every ``interval_s`` from a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="rayrec-ray-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread after its current pass."""
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.push()
            except Exception as exc:  # a failed pass must not end the mirror; the next one retries
                logger.warning("metrics not pushed to Ray: %s", exc)


_bridges: dict[int, RayMetricsBridge] = {}


def in_ray_worker() -> bool:
    """Whether this process is a Ray worker (a replica or an actor), not a driver or a plain process."""
    try:
        import ray
        from ray._private import worker
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    return bool(ray.is_initialized()) and worker.global_worker.mode == worker.WORKER_MODE


def export_to_ray(registry: CollectorRegistry, *, force: bool = False) -> RayMetricsBridge | None:
    """Start mirroring ``registry`` into Ray's metrics, once per registry and process.

    Args:
        registry: The registry to mirror.
        force: Start even outside a Ray worker (a driver connected to Ray).

    Returns:
        The running bridge, or ``None`` outside a Ray worker.
    """
    if not (force or in_ray_worker()):
        return None
    with _default_lock:
        bridge = _bridges.get(id(registry))
        if bridge is None:
            bridge = _bridges[id(registry)] = RayMetricsBridge(registry)
            bridge.start()
        return bridge


def watched_streams(keys: RedisKeys) -> dict[str, str]:
    """The streams an exporter reports, by the short name used as the ``stream`` label.

    Args:
        keys: The namespace's key builder.

    Returns:
        Label (``events``, ``impressions``, ``catalog:items``, …, ``dead-letters``) to stream key.
    """
    return {
        "events": keys.stream_events(),
        "impressions": keys.stream_impressions(),
        **{f"catalog:{table.name}": keys.stream_catalog(table.name) for table in (ITEMS, USERS, EDGES)},
        "dead-letters": keys.stream_dead_letters(),
    }


@dataclass(frozen=True, slots=True)
class GroupStatus:
    """Where one consumer group stands on one stream.

    Attributes:
        group: The group's name.
        pending: Entries delivered to a consumer and not yet acknowledged.
        undelivered: Entries not yet delivered to any consumer (``None`` when Redis cannot tell,
            e.g. after entries were deleted from the middle of the stream).
        lag_s: Age of the oldest entry the group has not finished (pending, or else the first
            undelivered one); 0 when it is caught up.
        delivered: Entries delivered to the group since it was created (``None`` when Redis
            cannot tell); less ``pending``, what the group finished.
    """

    group: str
    pending: int
    undelivered: int | None
    lag_s: float
    delivered: int | None = None


@dataclass(frozen=True, slots=True)
class StreamStatus:
    """One stream's length and its consumer groups.

    Attributes:
        name: Short name (the ``stream`` label).
        key: Full Redis key.
        length: Entries in the stream (0 when it does not exist).
        groups: One status per consumer group, by group name.
    """

    name: str
    key: str
    length: int
    groups: tuple[GroupStatus, ...]


async def read_stream_status(
    client: aredis.Redis, streams: dict[str, str], now_s: float | None = None
) -> list[StreamStatus]:
    """Lengths and consumer-group lag of some streams, in two pipelined round trips.

    The oldest unfinished entry of a group is its oldest pending entry (``XPENDING``) or, when
    nothing is pending, the first entry after its last-delivered id (``XINFO GROUPS``); lag is
    that entry's age, read from its id. ``pending`` is as of the second round trip.

    Args:
        client: An asyncio client decoding replies to ``str``.
        streams: Short name to stream key (see :func:`watched_streams`).
        now_s: Wall-clock instant in epoch seconds; the current time when omitted.

    Returns:
        One status per stream, in the order given.

    Raises:
        redis.exceptions.RedisError: Redis could not be reached (connection and timeout errors).
    """
    now_s = time.time() if now_s is None else now_s
    names = list(streams)
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.xlen(streams[name])
        pipe.xinfo_groups(streams[name])
    replies = await pipe.execute(raise_on_error=False)
    lengths: dict[str, int] = {}
    infos: dict[str, list[dict[str, Any]]] = {}
    for i, name in enumerate(names):
        length, group_infos = replies[2 * i], replies[2 * i + 1]
        if isinstance(length, Exception):
            raise length
        if isinstance(group_infos, Exception) and not isinstance(group_infos, ResponseError):
            raise group_infos
        lengths[name] = int(length)
        # A stream that does not exist answers XINFO with an error: no groups yet.
        infos[name] = [] if isinstance(group_infos, ResponseError) else list(group_infos)
    # Both candidates for every group: a consumer may acknowledge its last pending entries
    # between the two round trips, and the first undelivered entry is then the oldest one left.
    oldest = client.pipeline(transaction=False)
    for name in names:
        for info in infos[name]:
            oldest.xpending(streams[name], info["name"])
            oldest.xrange(streams[name], min=f"({info['last-delivered-id']}", max="+", count=1)
    answers = iter(await oldest.execute() if any(infos.values()) else [])
    out: list[StreamStatus] = []
    for name in names:
        groups: list[GroupStatus] = []
        for info in infos[name]:
            summary, after = next(answers), next(answers)
            if summary["min"] is not None:
                oldest_id: str | None = str(summary["min"])
            else:
                oldest_id = str(after[0][0]) if after else None
            lag_s = 0.0 if oldest_id is None else max(0.0, now_s - entry_ms(oldest_id) / 1000.0)
            undelivered, delivered = info.get("lag"), info.get("entries-read")
            groups.append(
                GroupStatus(
                    group=str(info["name"]),
                    pending=int(summary["pending"]),
                    undelivered=None if undelivered is None else int(undelivered),
                    lag_s=lag_s,
                    delivered=None if delivered is None else int(delivered),
                )
            )
        out.append(StreamStatus(name, streams[name], lengths[name], tuple(groups)))
    return out
