"""Event intake: the durable hand-off between the HTTP API and everything downstream.

An event is acknowledged only once it is in the Redis events stream. Negative feedback that must
hold on the very next request (``hide``, ``not_interested``, ``report``; seed section 18) is also
added to the user's exclusion set in the same ``MULTI``/``EXEC`` transaction, so the two can
never disagree: either both are stored, or neither is and the client is told to retry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from redis.exceptions import RedisError

from core.schema import NEGATIVE_FEEDBACK, UserEvent
from features.redis_store import RedisStore
from features.stream_codec import encode_event

_RETRY_AFTER_FULL_S = 5
_RETRY_AFTER_DOWN_S = 2


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
        client = self._store.aclient
        try:
            length = int(await client.xlen(stream))
            if length + len(events) > self._max_len:
                raise IntakeUnavailable(
                    "stream_full",
                    _RETRY_AFTER_FULL_S,
                    f"the event stream holds {length:,} entries, at its capacity of {self._max_len:,}",
                )
            async with client.pipeline(transaction=True) as pipe:
                for event in events:
                    if event.event_type in NEGATIVE_FEEDBACK:
                        pipe.sadd(keys.exclusions(event.user_id), event.item_id)
                    pipe.xadd(stream, encode_event(event))  # type: ignore[arg-type]
                await pipe.execute()
        except RedisError as exc:
            detail = f"the event store did not answer: {type(exc).__name__}"
            raise IntakeUnavailable("store_unreachable", _RETRY_AFTER_DOWN_S, detail) from exc
        except OSError as exc:
            raise IntakeUnavailable(
                "store_unreachable", _RETRY_AFTER_DOWN_S, f"the event store did not answer: {exc}"
            ) from exc
        return IntakeResult(event_ids=[e.event_id for e in events])
