"""A circuit breaker: stop calling a dependency that keeps failing, and probe it back to health.

A pure state machine over a monotonic clock; the caller reports outcomes and asks before calling.

- ``closed``: calls go through. The breaker opens when, within ``window_s``, at least
  ``failure_threshold`` calls failed (errors or timeouts) and they are at least
  ``failure_ratio`` of the calls made. The ratio is what tells a failing dependency from a busy
  moment: one stall of the caller's event loop makes every call in flight late at once, a
  handful of consecutive timeouts among hundreds of good calls, and a breaker that counted
  only those opened for a whole cool-down several times a minute at 50 requests/s.
- ``open``: calls are refused at once (the caller takes its fallback without waiting for a
  timeout). After ``cooldown_s`` the breaker turns half-open.
- ``half_open``: up to ``half_open_probes`` calls go through; the first success closes the
  breaker, a failure opens it again for another cool-down.

Around the ranker this turns a dead or slow model service from "every request waits out the
ranking budget" into "requests serve the pre-score order immediately" (seed section 17).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class BreakerState(StrEnum):
    """States of a :class:`CircuitBreaker`."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


BREAKER_STATE_VALUES = {BreakerState.CLOSED: 0.0, BreakerState.HALF_OPEN: 1.0, BreakerState.OPEN: 2.0}
"""Numeric value of each state, for a gauge."""


class CircuitBreakerConfig(BaseModel):
    """When a breaker opens and how it recovers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    failure_threshold: Annotated[int, Field(ge=1)] = 5
    """Failures within ``window_s`` needed to open the breaker."""

    failure_ratio: Annotated[float, Field(gt=0, le=1)] = 0.5
    """Share of the calls within ``window_s`` that must have failed to open it."""

    window_s: Annotated[float, Field(gt=0)] = 10.0
    """How far back failures count."""

    cooldown_s: Annotated[float, Field(gt=0)] = 5.0
    """How long the breaker stays open before it lets a probe through."""

    half_open_probes: Annotated[int, Field(ge=1)] = 1
    """Calls let through at once while half-open."""


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """The exported state of a breaker.

    Attributes:
        state: Current state.
        recent_failures: Failures within the window (closed) that count towards opening.
        recent_calls: Calls within the window (closed), failed or not.
        opened_total: Times the breaker opened since it was created.
        rejected_total: Calls refused while open.
        open_for_s: Seconds since it last opened, when open or half-open.
    """

    state: BreakerState
    recent_failures: int
    recent_calls: int
    opened_total: int
    rejected_total: int
    open_for_s: float | None


class CircuitBreaker:
    """The breaker state machine (see the module docstring).

    Not thread-safe: one breaker belongs to one event loop, which is how a Serve replica runs
    its request handlers.

    Args:
        config: Thresholds and timings.
        clock: Monotonic clock in seconds (injectable for tests).
    """

    def __init__(
        self, config: CircuitBreakerConfig | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config or CircuitBreakerConfig()
        self._clock = clock
        self._state = BreakerState.CLOSED
        # Outcomes of the calls within the window, oldest first: (time, failed).
        self._outcomes: deque[tuple[float, bool]] = deque()
        self._failures = 0
        self._opened_at: float | None = None
        self._probes_in_flight = 0
        self.opened_total = 0
        self.rejected_total = 0

    @property
    def state(self) -> BreakerState:
        """The state now; an open breaker whose cool-down has passed reads as half-open."""
        if self._state is BreakerState.OPEN and self._cooled_down():
            self._state = BreakerState.HALF_OPEN
            self._probes_in_flight = 0
        return self._state

    def _cooled_down(self) -> bool:
        return self._opened_at is not None and self._clock() - self._opened_at >= self.config.cooldown_s

    def allow(self) -> bool:
        """Whether a call may go out now; a True while half-open reserves a probe slot.

        Returns:
            False when the caller must take its fallback instead of calling.
        """
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and self._probes_in_flight < self.config.half_open_probes:
            self._probes_in_flight += 1
            return True
        self.rejected_total += 1
        return False

    def record_success(self) -> None:
        """A call that was allowed succeeded."""
        if self._state is BreakerState.HALF_OPEN:
            self._close()
        elif self._state is BreakerState.CLOSED:
            self._record(self._clock(), failed=False)

    def record_failure(self) -> None:
        """A call that was allowed failed or was late."""
        now = self._clock()
        if self._state is BreakerState.HALF_OPEN:
            self._open(now)
            return
        if self._state is BreakerState.OPEN:
            return
        self._record(now, failed=True)
        config = self.config
        if self._failures >= config.failure_threshold and self._failures >= config.failure_ratio * len(
            self._outcomes
        ):
            self._open(now)

    def _record(self, now: float, *, failed: bool) -> None:
        self._outcomes.append((now, failed))
        self._failures += failed
        self._forget_before(now - self.config.window_s)

    def _forget_before(self, horizon: float) -> None:
        outcomes = self._outcomes
        while outcomes and outcomes[0][0] < horizon:
            _, failed = outcomes.popleft()
            self._failures -= failed

    def release_probe(self) -> None:
        """A half-open probe ended without an outcome (cancelled); free its slot."""
        if self._state is BreakerState.HALF_OPEN and self._probes_in_flight > 0:
            self._probes_in_flight -= 1

    def _open(self, now: float) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = now
        self._outcomes.clear()
        self._failures = 0
        self._probes_in_flight = 0
        self.opened_total += 1

    def _close(self) -> None:
        self._state = BreakerState.CLOSED
        self._opened_at = None
        self._outcomes.clear()
        self._failures = 0
        self._probes_in_flight = 0

    def snapshot(self) -> BreakerSnapshot:
        """The state for metrics and the status route."""
        state = self.state
        now = self._clock()
        self._forget_before(now - self.config.window_s)
        open_for = None if self._opened_at is None else now - self._opened_at
        return BreakerSnapshot(
            state=state,
            recent_failures=self._failures,
            recent_calls=len(self._outcomes),
            opened_total=self.opened_total,
            rejected_total=self.rejected_total,
            open_for_s=open_for,
        )
