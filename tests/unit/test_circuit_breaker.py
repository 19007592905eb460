"""The circuit breaker's state machine, on a fake clock."""

from __future__ import annotations

import pytest

from policies.circuit_breaker import BreakerState, CircuitBreaker, CircuitBreakerConfig


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def state(b: CircuitBreaker) -> BreakerState:
    # A call, not the property: each read may move the machine (open -> half-open).
    return b.state


def breaker(clock: Clock, **config: float) -> CircuitBreaker:
    settings = {"failure_threshold": 3, "window_s": 10.0, "cooldown_s": 5.0, **config}
    return CircuitBreaker(CircuitBreakerConfig.model_validate(settings), clock=clock)


def test_opens_after_threshold_failures_within_the_window(clock: Clock) -> None:
    b = breaker(clock)
    for _ in range(2):
        assert b.allow()
        b.record_failure()
    assert state(b) is BreakerState.CLOSED
    assert b.allow()
    b.record_failure()
    assert state(b) is BreakerState.OPEN
    assert not b.allow() and not b.allow()
    snapshot = b.snapshot()
    assert snapshot.opened_total == 1 and snapshot.rejected_total == 2


def test_failures_outside_the_window_do_not_count(clock: Clock) -> None:
    b = breaker(clock)
    b.record_failure()
    b.record_failure()
    clock.now += 11
    b.record_failure()
    assert state(b) is BreakerState.CLOSED
    assert b.snapshot().recent_failures == 1


def test_a_burst_of_failures_among_many_successes_does_not_open(clock: Clock) -> None:
    # A stall of the caller makes every call in flight late at once: a few failures in a row
    # among many good calls is a busy moment, not a failing dependency.
    b = breaker(clock)
    for _ in range(20):
        b.record_success()
    for _ in range(8):
        b.record_failure()
    assert state(b) is BreakerState.CLOSED
    assert (b.snapshot().recent_failures, b.snapshot().recent_calls) == (8, 28)


def test_opens_once_failures_reach_the_ratio(clock: Clock) -> None:
    b = breaker(clock, failure_ratio=0.5)
    for _ in range(6):
        b.record_success()
    for _ in range(5):
        b.record_failure()
    assert state(b) is BreakerState.CLOSED
    b.record_failure()  # 6 of 12
    assert state(b) is BreakerState.OPEN


def test_successes_outside_the_window_do_not_dilute(clock: Clock) -> None:
    b = breaker(clock)
    for _ in range(50):
        b.record_success()
    clock.now += 11
    for _ in range(3):
        b.record_failure()
    assert state(b) is BreakerState.OPEN


def test_half_open_after_cooldown_lets_one_probe_through(clock: Clock) -> None:
    b = breaker(clock)
    for _ in range(3):
        b.record_failure()
    clock.now += 4.9
    assert state(b) is BreakerState.OPEN
    clock.now += 0.2
    assert state(b) is BreakerState.HALF_OPEN
    assert b.allow()
    assert not b.allow(), "one probe at a time"
    b.record_success()
    assert state(b) is BreakerState.CLOSED
    assert b.allow() and b.allow()


def test_a_failed_probe_opens_again_for_a_full_cooldown(clock: Clock) -> None:
    b = breaker(clock)
    for _ in range(3):
        b.record_failure()
    clock.now += 5
    assert b.allow()
    b.record_failure()
    assert state(b) is BreakerState.OPEN
    assert b.snapshot().opened_total == 2
    clock.now += 4
    assert not b.allow()
    clock.now += 1
    assert b.allow()


def test_a_released_probe_frees_its_slot(clock: Clock) -> None:
    b = breaker(clock)
    for _ in range(3):
        b.record_failure()
    clock.now += 5
    assert b.allow()
    b.release_probe()
    assert b.allow()


def test_config_is_strict() -> None:
    with pytest.raises(ValueError):
        CircuitBreakerConfig.model_validate({"failure_threshold": 0})
    with pytest.raises(ValueError):
        CircuitBreakerConfig.model_validate({"cooldown": 1})
