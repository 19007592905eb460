"""Event intake: the durable hand-off between the HTTP API and everything downstream.

An event is acknowledged only once it is in the Redis events stream. Negative feedback that must
hold on the very next request (``hide``, ``not_interested``, ``report``; seed section 18) is also
added to the user's exclusion set by the same atomic step, so the two can never disagree: either
both are stored, or neither is and the client is told to retry.

The step is one Lua script (:data:`INTAKE_SCRIPT`): it checks the stream's capacity and appends
the whole call, so a batch costs one round trip and one command to pack and parse rather than a
``MULTI`` with a queued reply per event. Scripts run atomically and their effects reach the AOF
and replicas like a ``MULTI``/``EXEC`` block, so "acknowledged" still means "in the stream".

What survives a crash of Redis itself is Redis' persistence setting, so run the event store with
``appendonly yes``. With ``appendfsync always`` Redis syncs the AOF before it answers, so no
acknowledged event is ever lost; it syncs once per event-loop turn for all clients, and one call
here is one script however many events it carries, so batches stay cheap. With
``appendfsync everysec`` Redis syncs once a second, so a crash can lose up to about a second of
acknowledged events (two when the disk stalls). Without an AOF a restart loses the stream; the
consumers then start over on an empty one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from redis.exceptions import RedisError

from core.schema import NEGATIVE_FEEDBACK, UserEvent
from features.redis_store import RedisStore
from features.stream_codec import ENTRY_FIELD, event_payload

_RETRY_AFTER_FULL_S = 5
_RETRY_AFTER_DOWN_S = 2

INTAKE_SCRIPT: Final = """
-- KEYS[1]: the events stream; KEYS[2..]: the exclusion sets of the negative feedback events.
-- ARGV: capacity, entry field, event count n, the n payloads joined by newlines, then one item
-- id per exclusion set.
local n = tonumber(ARGV[3])
local length = redis.call('XLEN', KEYS[1])
if length + n > tonumber(ARGV[1]) then
  return {0, length}
end
for i = 2, #KEYS do
  redis.call('SADD', KEYS[i], ARGV[3 + i])
end
local payloads, start = ARGV[4], 1
for _ = 1, n - 1 do
  local stop = string.find(payloads, '\\n', start, true)
  redis.call('XADD', KEYS[1], '*', ARGV[2], string.sub(payloads, start, stop - 1))
  start = stop + 1
end
redis.call('XADD', KEYS[1], '*', ARGV[2], string.sub(payloads, start))
return {1, length + n}
"""
"""Capacity check, exclusions and appends of one call, atomically (see the module docstring)."""


class IntakeUnavailable(RuntimeError):
    """The events could not be stored; nothing of the call was acknowledged.

    Attributes:
        reason: ``"stream_full"`` or ``"store_unreachable"``.
        retry_after_s: Seconds a client should wait before retrying.
    """

    def __init__(self, reason: str, retry_after_s: int, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class IntakeResult:
    """What was stored: the event ids, in the order given."""

    event_ids: list[str]


class EventIntake:
    """Appends validated events to the events stream (at-least-once, idempotent downstream).

    Args:
        store: The online store.
        max_stream_len: Entries beyond which the stream counts as full (the consumers are
            behind); new events are then refused with ``stream_full`` rather than growing Redis
            without bound.
    """

    def __init__(self, store: RedisStore, max_stream_len: int) -> None:
        self._store = store
        self._max_len = max_stream_len
        # EVALSHA, loading the script again after NOSCRIPT (a restarted Redis has an empty cache).
        self._script = store.aclient.register_script(INTAKE_SCRIPT)

    async def accept(self, events: Sequence[UserEvent]) -> IntakeResult:
        """Store events in the stream; negative feedback also lands in the exclusion sets.

        Args:
            events: Validated events; all are stored or none is.

        Returns:
            The ids of the stored events.

        Raises:
            IntakeUnavailable: The stream is at capacity or Redis did not answer.
        """
        if not events:
            return IntakeResult(event_ids=[])
        keys = self._store.keys
        stream = keys.stream_events()
        # One argument for the whole call: redis-py encodes and packs each argument in Python,
        # which cost more than the script itself. Compact JSON escapes every control character
        # inside its strings, so a newline can only be a separator.
        payloads = "\n".join([event_payload(event) for event in events])
        negative = [e for e in events if e.event_type in NEGATIVE_FEEDBACK]
        try:
            stored, length = await self._script(
                keys=[stream, *(keys.exclusions(e.user_id) for e in negative)],
                args=[self._max_len, ENTRY_FIELD, len(events), payloads, *(e.item_id for e in negative)],
            )
            if not stored:
                raise IntakeUnavailable(
                    "stream_full",
                    _RETRY_AFTER_FULL_S,
                    f"the event stream holds {int(length):,} entries, at its capacity of {self._max_len:,}",
                )
        except RedisError as exc:
            detail = f"the event store did not answer: {type(exc).__name__}"
            raise IntakeUnavailable("store_unreachable", _RETRY_AFTER_DOWN_S, detail) from exc
        except OSError as exc:
            raise IntakeUnavailable(
                "store_unreachable", _RETRY_AFTER_DOWN_S, f"the event store did not answer: {exc}"
            ) from exc
        return IntakeResult(event_ids=[e.event_id for e in events])
