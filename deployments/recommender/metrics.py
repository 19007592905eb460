"""The read path's metrics: latencies, candidates, removals, fallbacks, hops, caches, models, quality.

Registered on the process's Prometheus registry in a replica, so ``GET /metrics`` reports them next
to the write path's, and mirrored into Ray's metrics from there (see :mod:`features.metrics`). A
short window of recent latencies is also kept in memory for the operator's status route (medians
without a Prometheus server).
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Final, Protocol

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from features.metrics import export_to_ray
from features.quality import QualityWindow, default_quality_window
from policies.circuit_breaker import BREAKER_STATE_VALUES, BreakerSnapshot

LATENCY_BUCKETS_MS = (1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 250, 500, 1000)
CANDIDATE_BUCKETS = (0, 1, 5, 10, 25, 50, 100, 200, 300, 500, 1000)
WINDOW = 512
"""Recent samples kept per series for the status route."""

LAST_LIST_HIT: Final = "cached_list"
LAST_LIST_MISS: Final = "popular"
"""Fallback kinds of a failed pipeline (``deployments.recommender.service``): the last-list cache
answered, or it had nothing and the popular list was served."""


class _ServedItem(Protocol):
    @property
    def item_id(self) -> str: ...


class ServedAnswer(Protocol):
    """What :meth:`ServingMetrics.served` reads of an answer."""

    @property
    def surface(self) -> str:
        """The surface served."""
        ...

    @property
    def fallback(self) -> str | None:
        """The first degraded mode of the answer, if any."""
        ...

    @property
    def items(self) -> Sequence[_ServedItem]:
        """The served items, in order."""
        ...


class ModelVersions(Protocol):
    """The versions the model deployments answered one request with (``None``: not called)."""

    @property
    def retrieval_version(self) -> str | None:
        """Release of the retrieval deployment."""
        ...

    @property
    def ranker_version(self) -> str | None:
        """Release of the ranker deployment."""
        ...


class _Categorised(Protocol):
    @property
    def category(self) -> str: ...


class HitCounting(Protocol):
    """A cache that counts its own hits and misses (``features.catalog_cache.CatalogCache``)."""

    @property
    def hits(self) -> int:
        """Lookups answered so far."""
        ...

    @property
    def misses(self) -> int:
        """Lookups not answered so far."""
        ...


class ServingMetrics:
    """The read path's metrics on one registry.

    Args:
        registry: Where to register; a private registry when omitted.

    Attributes:
        requests: Requests answered, by ``surface`` and ``outcome`` (``pipeline`` or ``fallback``).
        fallbacks: Degraded modes used, by ``surface`` and ``kind``.
        shed: Requests answered from the fallbacks without running their pipeline, because every
            pipeline slot of the replica stayed busy too long (``deployments.recommender.admission``),
            by ``surface``.
        total_ms: Whole request latency inside the replica, by ``surface``.
        stage_ms: Pipeline stage latency, by ``surface`` and ``stage``.
        source_ms: Candidate source latency, by ``source``.
        source_skipped: Sources skipped, by ``source`` and ``reason``.
        removed: Candidates removed, by ``filter``.
        hop_ms: Round trip of a ``DeploymentHandle`` call minus the time spent in the callee,
            by ``deployment``.
        log_entries: Served lists logged, by ``outcome`` (``written``, ``dropped``).
        breaker_state: State of the ranker's breaker (0 closed, 1 half-open, 2 open).
        breaker_opened: Times the ranker's breaker opened.
        candidates: Candidates a source produced for one request, by ``source``.
        cache_lookups: Cache lookups, by ``cache`` (``catalog``, ``last_list``) and ``outcome``
            (``hit``, ``miss``).
        model_version: 1 for the release each model ``deployment`` serves (``model_version``
            label), 0 for releases it served before.
        impressions: Items served, by ``surface``.
        quality: The window behind the ``rayrec_quality_*`` gauges.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, quality: QualityWindow | None = None
    ) -> None:
        r = CollectorRegistry(auto_describe=True) if registry is None else registry
        self.registry = r
        self.requests = Counter(
            "rayrec_recommendations", "Recommendation requests answered.", ["surface", "outcome"], registry=r
        )
        self.fallbacks = Counter(
            "rayrec_recommendation_fallbacks", "Degraded modes used.", ["surface", "kind"], registry=r
        )
        self.shed = Counter(
            "rayrec_recommendation_shed",
            "Requests answered from the fallbacks because no pipeline slot freed up in time.",
            ["surface"],
            registry=r,
        )
        self.total_ms = Histogram(
            "rayrec_recommendation_latency_ms",
            "Recommendation latency inside the ingress.",
            ["surface"],
            buckets=LATENCY_BUCKETS_MS,
            registry=r,
        )
        self.stage_ms = Histogram(
            "rayrec_pipeline_stage_latency_ms",
            "Pipeline stage latency.",
            ["surface", "stage"],
            buckets=LATENCY_BUCKETS_MS,
            registry=r,
        )
        self.source_ms = Histogram(
            "rayrec_candidate_source_latency_ms",
            "Candidate source latency.",
            ["source"],
            buckets=LATENCY_BUCKETS_MS,
            registry=r,
        )
        self.source_skipped = Counter(
            "rayrec_candidate_source_skipped",
            "Sources skipped (fail open).",
            ["source", "reason"],
            registry=r,
        )
        self.removed = Counter(
            "rayrec_filter_removed", "Candidates removed by filters.", ["filter"], registry=r
        )
        self.hop_ms = Histogram(
            "rayrec_deployment_hop_ms",
            "DeploymentHandle round trip minus the callee's own time.",
            ["deployment"],
            buckets=LATENCY_BUCKETS_MS,
            registry=r,
        )
        self.log_entries = Counter(
            "rayrec_recommendation_log_entries", "Served lists appended to the log.", ["outcome"], registry=r
        )
        self.breaker_state = Gauge(
            "rayrec_ranker_circuit_state",
            "Ranker circuit breaker: 0 closed, 1 half-open, 2 open.",
            registry=r,
        )
        self.breaker_opened = Gauge(
            "rayrec_ranker_circuit_opened",
            "Times the ranker circuit breaker opened in this replica.",
            registry=r,
        )
        self.candidates = Histogram(
            "rayrec_candidate_source_candidates",
            "Candidates a source produced for one request.",
            ["source"],
            buckets=CANDIDATE_BUCKETS,
            registry=r,
        )
        self.cache_lookups = Counter(
            "rayrec_cache_lookups", "Cache lookups by outcome.", ["cache", "outcome"], registry=r
        )
        self.model_version = Gauge(
            "rayrec_model_version_info",
            "1 for the release a model deployment serves, 0 for releases it served before.",
            ["deployment", "model_version"],
            registry=r,
        )
        self.impressions = Counter("rayrec_impressions", "Items served.", ["surface"], registry=r)
        self.quality = QualityWindow() if quality is None else quality
        r.register(_QualityCollector(self.quality))
        self._lock = threading.Lock()
        self._recent: dict[str, deque[float]] = {}
        self._versions: dict[str, str] = {}
        self._cache_seen: dict[int, tuple[int, int]] = {}

    def sample(self, series: str, value_ms: float) -> None:
        """Keep a latency in the in-memory window of ``series``."""
        with self._lock:
            window = self._recent.get(series)
            if window is None:
                window = self._recent[series] = deque(maxlen=WINDOW)
            window.append(value_ms)

    def medians(self) -> dict[str, dict[str, float]]:
        """Median and 90th percentile of every series in the window, with the sample count."""
        with self._lock:
            windows = {k: list(v) for k, v in self._recent.items()}
        out: dict[str, dict[str, float]] = {}
        for name, values in sorted(windows.items()):
            ordered = sorted(values)
            out[name] = {
                "p50": round(statistics.median(ordered), 3),
                "p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 3),
                "n": float(len(ordered)),
            }
        return out

    def breaker(self, snapshot: BreakerSnapshot) -> None:
        """Export the breaker's state."""
        self.breaker_state.set(BREAKER_STATE_VALUES[snapshot.state])
        self.breaker_opened.set(snapshot.opened_total)

    def hops(self, hop_ms: Mapping[str, float]) -> None:
        """Record the hops of one request."""
        for deployment, ms in hop_ms.items():
            self.hop_ms.labels(deployment).observe(ms)
            self.sample(f"hop.{deployment}", ms)

    def served(
        self,
        answer: ServedAnswer,
        versions: ModelVersions,
        catalogue: Mapping[str, _Categorised],
        catalog_cache: HitCounting,
    ) -> None:
        """Record what one answer served: impressions, quality, model versions, cache lookups.

        Args:
            answer: The answer.
            versions: The versions the model deployments answered this request with.
            catalogue: The active catalogue by item id (categories for diversity; its size for
                coverage).
            catalog_cache: The replica's catalog cache; its hits and misses since the previous
                call are counted.
        """
        ids = [item.item_id for item in answer.items]
        self.impressions.labels(answer.surface).inc(len(ids))
        categories = [entry.category if (entry := catalogue.get(i)) is not None else None for i in ids]
        self.quality.set_catalogue_size(len(catalogue))
        self.quality.record_list(ids, categories)
        self.models({"retrieval": versions.retrieval_version, "ranker": versions.ranker_version})
        if answer.fallback in (LAST_LIST_HIT, LAST_LIST_MISS):
            self.cache_lookups.labels(
                "last_list", "hit" if answer.fallback == LAST_LIST_HIT else "miss"
            ).inc()
        self.cache_counts("catalog", catalog_cache)

    def models(self, versions: Mapping[str, str | None]) -> None:
        """Mark the release each deployment served (``None``: it was not called)."""
        with self._lock:
            for deployment, version in versions.items():
                if version is None:
                    continue
                previous = self._versions.get(deployment)
                if previous == version:
                    continue
                if previous is not None:
                    self.model_version.labels(deployment, previous).set(0)
                self.model_version.labels(deployment, version).set(1)
                self._versions[deployment] = version

    def cache_counts(self, cache: str, counting: HitCounting) -> None:
        """Count the hits and misses ``counting`` made since the previous call for it."""
        with self._lock:
            hits, misses = counting.hits, counting.misses
            seen_hits, seen_misses = self._cache_seen.get(id(counting), (0, 0))
            self._cache_seen[id(counting)] = (hits, misses)
        if hits > seen_hits:
            self.cache_lookups.labels(cache, "hit").inc(hits - seen_hits)
        if misses > seen_misses:
            self.cache_lookups.labels(cache, "miss").inc(misses - seen_misses)

    def observer(self, surface: str) -> PipelineMetricsObserver:
        """A pipeline observer that records into these metrics under ``surface``."""
        return PipelineMetricsObserver(self, surface)


class PipelineMetricsObserver:
    """A ``PipelineObserver`` bound to one surface.

    Args:
        metrics: Where to record.
        surface: The surface label.
    """

    def __init__(self, metrics: ServingMetrics, surface: str) -> None:
        self._m = metrics
        self._surface = surface

    def on_stage(self, name: str, ms: float) -> None:
        """Record a stage latency."""
        self._m.stage_ms.labels(self._surface, name).observe(ms)
        self._m.sample(f"stage.{name}", ms)

    def on_source(self, name: str, ms: float, count: int, error: str | None) -> None:
        """Record a source's latency, or its skip."""
        self._m.source_ms.labels(name).observe(ms)
        self._m.sample(f"source.{name}", ms)
        if error is not None:
            self._m.source_skipped.labels(name, error).inc()
        else:
            self._m.candidates.labels(name).observe(count)

    def on_removed(self, filter_name: str, n: int) -> None:
        """Count removals."""
        if n:
            self._m.removed.labels(filter_name).inc(n)

    def on_fallback(self, kind: str) -> None:
        """Count a fallback of the pipeline (the service counts its own)."""
        self._m.fallbacks.labels(self._surface, kind).inc()


class _QualityCollector:
    """The ``rayrec_quality_*`` gauges, computed from the window when collected."""

    def __init__(self, window: QualityWindow) -> None:
        self._window = window

    def collect(self) -> Iterator[Metric]:
        q = self._window.snapshot()
        window = f"over the last {self._window.window_s:g} s"
        for name, doc, v in (
            ("rayrec_quality_ctr", f"Clicks per impression {window}.", q.ctr),
            (
                "rayrec_quality_negative_feedback_rate",
                f"hide, not_interested and report events per impression {window}.",
                q.negative_rate,
            ),
            (
                "rayrec_quality_coverage",
                f"Distinct items served over the active catalogue {window}.",
                q.coverage,
            ),
            (
                "rayrec_quality_intra_list_diversity",
                f"Share of item pairs of a served list in different categories, mean over lists {window}.",
                q.diversity,
            ),
            ("rayrec_quality_window_impressions", f"Items served {window}.", float(q.impressions)),
        ):
            family = GaugeMetricFamily(name, doc)
            family.add_metric([], v)
            yield family


_default: ServingMetrics | None = None
_default_lock = threading.Lock()


def default_serving_metrics() -> ServingMetrics:
    """The process-wide read-path metrics on ``prometheus_client.REGISTRY``, created on first use.

    They share the process-wide quality window with the event routes, and in a Ray worker the
    registry is mirrored into Ray's metrics.
    """
    global _default
    with _default_lock:
        if _default is None:
            _default = ServingMetrics(REGISTRY, default_quality_window())
    export_to_ray(REGISTRY)
    return _default


def fallback_kinds(kinds: Iterable[str]) -> list[str]:
    """Kinds in first-seen order, each once."""
    return list(dict.fromkeys(kinds))
