"""Keeping the serving process' long-lived heap out of the cyclic collector's full passes.

A read-path replica accumulates long-lived objects as it serves: decoded feature records, the
combined per-item feature maps, catalog entries, the content index, last lists (hundreds of
thousands of objects at a 100k-item catalog). Python's full collection walks every one of them,
and at 100k items it took 150-300 ms each time, every few seconds under load: the whole
request tail (in-process, p99 20 ms, max 301 ms, every slow request a full collection).

So the service periodically collects and then ``gc.freeze``-s what survived: frozen objects are
left out of later collections, and the full passes that remain walk only what was allocated since
(7-21 ms a pass measured, max request 37 ms). Frozen objects are still freed by reference
counting when dropped, which is how the records and maps leave their memos. A reference cycle
that was alive when frozen and dies later is not, so every ``full_every``-th pass first unfreezes
everything and collects the whole heap once.

The young generation is also collected less often (:data:`GEN0_THRESHOLD` allocations instead of
700): a request allocates tens of thousands of objects, and at Python's default the collector
ran about five times per request (in-process at 100k items: 2.4 s of collection in a 20 s run,
0.8 s with both changes, request p99 21.8 ms).
"""

from __future__ import annotations

import gc
import time
from typing import Final

from features.consumer_loop import relax_gc

GEN0_THRESHOLD: Final = 10_000
"""Allocations between young-generation collections in a serving process."""


class HeapFreezer:
    """Collects, then freezes what survived; every ``full_every``-th pass collects the whole heap.

    Args:
        full_every: Passes between full collections of everything (frozen objects included).
    """

    def __init__(self, full_every: int = 30) -> None:
        if full_every < 1:
            raise ValueError(f"full_every must be at least 1, got {full_every}")
        self.full_every = full_every
        self.passes = 0

    def relax(self) -> None:
        """Raise this process' young-generation threshold to :data:`GEN0_THRESHOLD` (once, at start)."""
        relax_gc(GEN0_THRESHOLD)

    def run(self) -> float:
        """One pass (blocking; it holds the interpreter for its duration).

        Returns:
            Milliseconds it took.
        """
        started = time.perf_counter()
        self.passes += 1
        if self.passes % self.full_every == 0:
            gc.unfreeze()
        gc.collect()
        gc.freeze()
        return (time.perf_counter() - started) * 1000.0
