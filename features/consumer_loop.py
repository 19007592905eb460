"""A background thread that runs a stream consumer's ``run_once`` until stopped.

Ray actor wrappers (stream processor, lake writer) use it so their methods (``stats``, ``stop``)
stay responsive while the loop blocks on Redis. A failing step is logged, counted and retried
after an exponential backoff; the loop never dies of an error, only of :meth:`ConsumerLoop.stop`.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Final

logger = logging.getLogger(__name__)

GC_GEN0_THRESHOLD: Final = 100_000
"""Net allocations between two young-generation collections in a consumer's process.

Python's default, 700, suits processes whose live objects come and go a few at a time. A
consumer's batch holds tens of thousands of objects at once (decoded events, entity states) and
the stream processor keeps thousands of states cached, so the collector ran over a thousand
times per 20,000 events and promoted the cache into full collections that scanned all of it:
40 of the processor's 100 us of CPU per event. The states and records are trees without cycles,
which reference counting frees as soon as they are dropped, so collecting less often keeps
nothing alive that would otherwise be freed, only the rare cycle for longer.
"""


def relax_gc(gen0_threshold: int = GC_GEN0_THRESHOLD) -> None:
    """Raise this process' young-generation collection threshold (see :data:`GC_GEN0_THRESHOLD`).

    Call it in a process that runs stream consumers (the consumer actors do at start); the older
    generations keep their thresholds, relative to the young one's collections.

    Args:
        gen0_threshold: The new threshold; a higher current one is kept.
    """
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, gen0_threshold), gen1, gen2)


class ConsumerLoop:
    """Runs ``step`` repeatedly in a daemon thread.

    Args:
        name: Thread name, used in logs.
        step: One unit of work (e.g. ``lambda: processor.run_once(500, 1000)``); returns how
            many entries it handled. It should block briefly when idle, or the loop spins.
        on_stop: Called in the loop thread after the last step (e.g. a final flush).
        backoff_s: First and longest wait after a failing step.
    """

    def __init__(
        self,
        name: str,
        step: Callable[[], int],
        *,
        on_stop: Callable[[], None] | None = None,
        backoff_s: tuple[float, float] = (0.1, 5.0),
    ) -> None:
        self.name = name
        self._step = step
        self._on_stop = on_stop
        self._backoff_s = backoff_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.entries = 0
        self.errors = 0
        self.last_error: str | None = None

    @property
    def running(self) -> bool:
        """Whether the thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> bool:
        """Start the thread unless it runs already.

        Returns:
            True when this call started it.
        """
        if self.running:
            return False
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return True

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask the loop to finish its current step, run ``on_stop`` and end; wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        delay = self._backoff_s[0]
        while not self._stop.is_set():
            try:
                self.entries += self._step()
                self.steps += 1
                delay = self._backoff_s[0]
            except Exception as exc:  # a consumer loop must outlive any single failure
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                logger.exception("%s: step failed; retrying in %.1f s", self.name, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, self._backoff_s[1])
        if self._on_stop is not None:
            try:
                self._on_stop()
            except Exception:
                logger.exception("%s: on_stop failed", self.name)

    def stats(self) -> dict[str, Any]:
        """Counters of the loop, and the CPU seconds of its whole process (``cpu_s``).

        Each consumer actor has a process of its own, so ``cpu_s`` is what its consumer costs,
        whatever the share of a core the machine gives it.
        """
        return {
            "cpu_s": time.process_time(),
            "running": self.running,
            "steps": self.steps,
            "entries": self.entries,
            "errors": self.errors,
            "last_error": self.last_error,
            "at": time.time(),
        }
