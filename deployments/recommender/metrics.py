"""The read path's metrics: stage and source latencies, skips, removals, fallbacks, hops, the breaker.

Registered on the process's Prometheus registry in a replica, so ``GET /metrics`` reports them next
to the write path's. A short window of recent latencies is also kept in memory for the operator's
status route (medians without a Prometheus server).
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from collections.abc import Iterable, Mapping

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from policies.circuit_breaker import BREAKER_STATE_VALUES, BreakerSnapshot

LATENCY_BUCKETS_MS = (1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 250, 500, 1000)
WINDOW = 512
"""Recent samples kept per series for the status route."""


class ServingMetrics:
    """The read path's metrics on one registry.

    Args:
        registry: Where to register; a private registry when omitted.

    Attributes:
        requests: Requests answered, by ``surface`` and ``outcome`` (``pipeline`` or ``fallback``).
        fallbacks: Degraded modes used, by ``surface`` and ``kind``.
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
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = CollectorRegistry(auto_describe=True) if registry is None else registry
        self.registry = r
        self.requests = Counter(
            "rayrec_recommendations", "Recommendation requests answered.", ["surface", "outcome"], registry=r
        )
        self.fallbacks = Counter(
            "rayrec_recommendation_fallbacks", "Degraded modes used.", ["surface", "kind"], registry=r
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
        self._lock = threading.Lock()
        self._recent: dict[str, deque[float]] = {}

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

    def on_removed(self, filter_name: str, n: int) -> None:
        """Count removals."""
        if n:
            self._m.removed.labels(filter_name).inc(n)

    def on_fallback(self, kind: str) -> None:
        """Count a fallback of the pipeline (the service counts its own)."""
        self._m.fallbacks.labels(self._surface, kind).inc()


_default: ServingMetrics | None = None
_default_lock = threading.Lock()


def default_serving_metrics() -> ServingMetrics:
    """The process-wide read-path metrics on ``prometheus_client.REGISTRY``, created on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = ServingMetrics(REGISTRY)
        return _default


def fallback_kinds(kinds: Iterable[str]) -> list[str]:
    """Kinds in first-seen order, each once."""
    return list(dict.fromkeys(kinds))
