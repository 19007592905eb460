"""Quality of the served lists over a sliding window: CTR, negative feedback, coverage, diversity.

The ingress that serves a list and accepts the events about it records both here, so the
figures come from what was really served and really clicked, not from a sample: impressions
(items served), clicks and negative feedback (``hide``, ``not_interested``, ``report``) per
impression, catalogue coverage (distinct items served over the active catalogue) and intra-list
diversity (the share of item pairs of a list whose categories differ, averaged over lists).

Why here and not from the Redis streams: the lake writer trims both streams once it has written
them (every minute), so a window read back from the streams would cover whatever happened to be
left in them. The window keeps counts in time buckets, so memory is bounded by the number of
buckets plus the distinct items served (at most the catalogue).

Each ingress replica reports its own window. CTR and the negative-feedback rate are unbiased per
replica because the proxy spreads both requests and events over the replicas; the exact
cluster-wide ratios come from the counters (``rayrec_impressions_total`` and
``rayrec_events_accepted_total``). Coverage per replica is a lower bound of the cluster's.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

CLICK_TYPES: Final = frozenset({"click"})
"""Event types counted as a click of an impression."""
NEGATIVE_TYPES: Final = frozenset({"hide", "not_interested", "report"})
"""Event types counted as negative feedback on an impression."""

DEFAULT_WINDOW_S: Final = 900.0
DEFAULT_BUCKET_S: Final = 10.0


def intra_list_diversity(categories: Sequence[str | None]) -> float | None:
    """Share of item pairs of one list whose categories differ.

    Args:
        categories: Category of each served item, in list order; ``None`` when unknown.

    Returns:
        A value in [0, 1] (0: one category, 1: every item in its own), or ``None`` when fewer
        than two items have a known category.
    """
    known = [c for c in categories if c is not None]
    n = len(known)
    if n < 2:
        return None
    same = sum(k * (k - 1) // 2 for k in Counter(known).values())
    pairs = n * (n - 1) // 2
    return (pairs - same) / pairs


@dataclass(slots=True)
class _Bucket:
    start_s: float
    impressions: int = 0
    lists: int = 0
    diversity_sum: float = 0.0
    diversity_lists: int = 0
    events: Counter[str] = field(default_factory=Counter)
    items: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class QualitySnapshot:
    """The window's figures.

    Attributes:
        impressions: Items served in the window.
        lists: Lists served in the window.
        clicks: Click events accepted in the window.
        negatives: Negative-feedback events accepted in the window.
        ctr: Clicks per impression (0 without impressions).
        negative_rate: Negative-feedback events per impression (0 without impressions).
        coverage: Distinct items served over the active catalogue (0 when its size is unknown).
        diversity: Mean intra-list diversity of the lists it could be measured on (0 without one).
    """

    impressions: int
    lists: int
    clicks: int
    negatives: int
    ctr: float
    negative_rate: float
    coverage: float
    diversity: float


class QualityWindow:
    """Served lists and accepted events over the last ``window_s`` seconds (thread-safe).

    Args:
        window_s: Length of the window.
        bucket_s: Granularity: the window slides by whole buckets.
        clock: Monotonic seconds.

    Raises:
        ValueError: ``bucket_s`` is not positive or longer than ``window_s``.
    """

    def __init__(
        self,
        window_s: float = DEFAULT_WINDOW_S,
        bucket_s: float = DEFAULT_BUCKET_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < bucket_s <= window_s:
            raise ValueError(f"bucket_s must be in (0, window_s], got {bucket_s} for window {window_s}")
        self.window_s = window_s
        self.bucket_s = bucket_s
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: deque[_Bucket] = deque()
        self._catalogue_size = 0

    def _current(self) -> _Bucket:
        # Called with the lock held.
        now = self._clock()
        start = now - now % self.bucket_s
        if not self._buckets or self._buckets[-1].start_s != start:
            self._buckets.append(_Bucket(start))
        self._expire(now)
        return self._buckets[-1]

    def _expire(self, now: float) -> None:
        while self._buckets and self._buckets[0].start_s + self.bucket_s <= now - self.window_s:
            self._buckets.popleft()

    def record_list(self, item_ids: Sequence[str], categories: Sequence[str | None]) -> None:
        """Record one served list.

        Args:
            item_ids: The items served, in order.
            categories: Their categories (``None`` when unknown), same length.
        """
        diversity = intra_list_diversity(categories)
        with self._lock:
            bucket = self._current()
            bucket.impressions += len(item_ids)
            bucket.lists += 1
            bucket.items.update(item_ids)
            if diversity is not None:
                bucket.diversity_sum += diversity
                bucket.diversity_lists += 1

    def record_events(self, event_types: Iterable[str]) -> None:
        """Record accepted events by type (one entry per event)."""
        counted = Counter(event_types)
        with self._lock:
            self._current().events.update(counted)

    def set_catalogue_size(self, n: int) -> None:
        """The number of active items, the denominator of coverage."""
        with self._lock:
            self._catalogue_size = max(0, n)

    def snapshot(self) -> QualitySnapshot:
        """The figures over the buckets still in the window."""
        with self._lock:
            self._expire(self._clock())
            buckets = list(self._buckets)
            catalogue = self._catalogue_size
            impressions = sum(b.impressions for b in buckets)
            lists = sum(b.lists for b in buckets)
            events: Counter[str] = Counter()
            served: set[str] = set()
            for b in buckets:
                events.update(b.events)
                served |= b.items
            diversity_sum = sum(b.diversity_sum for b in buckets)
            diversity_lists = sum(b.diversity_lists for b in buckets)
        clicks = sum(events[t] for t in CLICK_TYPES)
        negatives = sum(events[t] for t in NEGATIVE_TYPES)
        return QualitySnapshot(
            impressions=impressions,
            lists=lists,
            clicks=clicks,
            negatives=negatives,
            ctr=clicks / impressions if impressions else 0.0,
            negative_rate=negatives / impressions if impressions else 0.0,
            coverage=min(1.0, len(served) / catalogue) if catalogue else 0.0,
            diversity=diversity_sum / diversity_lists if diversity_lists else 0.0,
        )


_default: QualityWindow | None = None
_default_lock = threading.Lock()


def default_quality_window() -> QualityWindow:
    """The process-wide window shared by the event routes and the recommendation service."""
    global _default
    with _default_lock:
        if _default is None:
            _default = QualityWindow()
        return _default
