"""Per-client token buckets in Redis, shared by every ingress replica.

Each client has a bucket of ``burst`` tokens that refills at ``rate_per_s``; a call that costs
``n`` (one per event, so a batch of 1,000 costs 1,000) passes when the bucket holds ``n`` tokens
and takes them. The whole step is one Lua script (:data:`BUCKET_SCRIPT`) rather than an ``INCR``
on a per-second window key:

- it is exact: a fixed window lets twice the rate through around each window edge, and with
  batches of 1,000 a per-second window says nothing useful about a rate below 1,000/s;
- it is one round trip and atomic, so replicas serving the same client never spend the same
  tokens twice;
- it reads the time from Redis (``TIME``), so replicas whose clocks disagree still agree on
  every bucket;
- a bucket's key expires once the bucket would be full again, so idle clients cost no memory.

The limiter fails open. Redis is also where events are stored, so when it does not answer the
intake already answers 503; the limiter must not add its own wait on top of that, nor turn the
outage into 429s. A check therefore gets a short budget (:data:`CHECK_BUDGET_S`), and after a
failed check the limiter lets every call through unchecked for :data:`FAIL_OPEN_S` before asking
Redis again, so during an outage at most one call per window per process pays the budget.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from redis.exceptions import RedisError

from features.redis_store import RedisStore

CHECK_BUDGET_S: Final = 0.25
"""Longest a check waits for Redis before letting the call through unchecked."""

FAIL_OPEN_S: Final = 1.0
"""How long calls pass unchecked after a failed check, before Redis is asked again."""

BUCKET_SCRIPT: Final = """
-- KEYS[1]: the bucket (a hash of tokens and at_s). ARGV: rate per second, burst, cost.
-- Answers {allowed (0|1), tokens left, seconds until the cost would fit}.
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now_s = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at_s')
local tokens = tonumber(state[1])
local at_s = tonumber(state[2])
if tokens == nil or at_s == nil then
  tokens = burst
else
  tokens = math.min(burst, tokens + math.max(0, now_s - at_s) * rate)
end
if cost > tokens then
  return {0, string.format('%.6f', tokens), string.format('%.6f', (cost - tokens) / rate)}
end
tokens = tokens - cost
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'at_s', string.format('%.6f', now_s))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return {1, string.format('%.6f', tokens), '0'}
"""
"""Refill, check and take of one bucket, atomically (see the module docstring)."""


@dataclass(frozen=True, slots=True)
class RateDecision:
    """The outcome of one check.

    Attributes:
        allowed: Whether the call may proceed.
        remaining: Tokens left in the bucket after the call (``inf`` when it was not checked).
        retry_after_s: When refused, seconds until the bucket holds the call's cost.
        checked: False when Redis did not answer and the call was let through unchecked.
    """

    allowed: bool
    remaining: float
    retry_after_s: float
    checked: bool = True


_UNCHECKED: Final = RateDecision(allowed=True, remaining=float("inf"), retry_after_s=0.0, checked=False)


class EventRateLimiter:
    """Token buckets per client, in Redis (see the module docstring).

    Args:
        store: The online store; the buckets live under its namespace.
        rate_per_s: Tokens each bucket gains per second; must be positive.
        burst: Size of each bucket; a cost above it can never pass.
        budget_s: Longest a check waits for Redis.
        fail_open_s: How long calls pass unchecked after a failed check.
        clock: Monotonic seconds, for the fail-open window.

    Raises:
        ValueError: ``rate_per_s`` or ``burst`` is not positive.
    """

    def __init__(
        self,
        store: RedisStore,
        rate_per_s: float,
        burst: int,
        *,
        budget_s: float = CHECK_BUDGET_S,
        fail_open_s: float = FAIL_OPEN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError(f"a rate limit needs a positive rate and burst, not {rate_per_s}/s, {burst}")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._keys = store.keys
        self._budget_s = budget_s
        self._fail_open_s = fail_open_s
        self._clock = clock
        self._unchecked_until = float("-inf")
        # EVALSHA, loading the script again after NOSCRIPT (a restarted Redis has an empty cache).
        self._script: Callable[..., Awaitable[Any]] = store.aclient.register_script(BUCKET_SCRIPT)

    @property
    def failing_open(self) -> bool:
        """Whether calls currently pass unchecked because a recent check failed."""
        return self._clock() < self._unchecked_until

    async def acquire(self, client_id: str, cost: int) -> RateDecision:
        """Take ``cost`` tokens from the client's bucket, if it holds them.

        Args:
            client_id: Who is calling (``key:<digest>`` or ``addr:<address>``).
            cost: Tokens the call needs (events in it), at least 1.

        Returns:
            Whether the call may proceed; a refused call takes nothing from the bucket.
        """
        if self.failing_open:
            return _UNCHECKED
        try:
            allowed, remaining, wait_s = await asyncio.wait_for(
                self._script(
                    keys=[self._keys.rate_limit_events(client_id)],
                    args=[repr(self.rate_per_s), self.burst, max(1, cost)],
                ),
                self._budget_s,
            )
        except (RedisError, OSError, TimeoutError):
            self._unchecked_until = self._clock() + self._fail_open_s
            return _UNCHECKED
        return RateDecision(
            allowed=bool(int(allowed)), remaining=float(remaining), retry_after_s=float(wait_s)
        )
