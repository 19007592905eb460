"""How many requests' pipelines one replica runs at once, and how long the others may wait.

Every stage budget is wall-clock time, and one event loop runs all of a replica's requests. When
several pipelines interleave, each one's wall time stretches by the others' CPU, so budgets run
out on work that was never slow: measured in one process on the 100k-item benchmark world, four
requests at a time had the model-backed sources of 548 of 600 requests skipped (two at a time:
261), against none when the same requests ran one after another, at the same CPU per request.
The answers were served without a fallback, but without their personal candidates.

:class:`PipelineSlots` admits a bounded number of pipelines and queues the rest in arrival
order, so an admitted request runs its stages nearly alone and its budgets measure its own work.
A request that waited longer than ``max_wait_ms`` is not run at all: the service answers it from
its fallbacks (the user's last list, then popular items), which cost a fraction of a pipeline, so
an overloaded replica sheds work instead of queueing without end.
"""

from __future__ import annotations

import asyncio


class PipelineSlots:
    """A bounded number of concurrent pipelines, admitted in arrival order.

    Args:
        concurrency: Pipelines run at once; 0 admits every request at once (no limit).
        max_wait_ms: Longest wait for a slot; a request that waited longer is refused.
    """

    def __init__(self, concurrency: int, max_wait_ms: float) -> None:
        if concurrency < 0:
            raise ValueError(f"concurrency must be at least 0, not {concurrency}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be at least 0, not {max_wait_ms}")
        self.concurrency = concurrency
        self.max_wait_s = max_wait_ms / 1000.0
        self._slots = asyncio.Semaphore(concurrency) if concurrency else None
        self.running = 0
        self.waiting = 0
        self.refused = 0

    async def enter(self) -> bool:
        """Wait for a slot.

        Returns:
            True when admitted (call :meth:`leave` when the pipeline is done); False when the
            wait ran past ``max_wait_ms`` (no slot is held).
        """
        slots = self._slots
        if slots is not None and slots.locked():
            self.waiting += 1
            try:
                # A cancelled acquire never keeps a slot (asyncio.Semaphore gives it back).
                await asyncio.wait_for(slots.acquire(), self.max_wait_s)
            except TimeoutError:
                self.refused += 1
                return False
            finally:
                self.waiting -= 1
        elif slots is not None:
            await slots.acquire()  # free: returns at once
        self.running += 1
        return True

    def leave(self) -> None:
        """Give back the slot :meth:`enter` admitted into."""
        self.running -= 1
        if self._slots is not None:
            self._slots.release()
