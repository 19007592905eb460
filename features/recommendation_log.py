"""The recommendation log: every served list appended to the impressions stream.

The lake writer consumes the stream into the ``impressions`` table, where training joins what was
shown (positions, scores, sources, propensities, model version, experiment arm) with what users
did next. Logging never fails a request: when Redis does not take the entry it is dropped and
counted, and the client still gets its list.
"""

from __future__ import annotations

import logging
from typing import Any

from core.schema import RecommendationLogEntry
from features.redis_store import RedisStore
from features.stream_codec import encode_log_entry

logger = logging.getLogger(__name__)


class RecommendationLog:
    """Appends served lists to ``{ns}:stream:impressions``.

    Args:
        store: The Redis store.
        max_stream_len: Approximate cap of the stream: a bound on Redis memory if the lake writer
            stops for long; the oldest entries go first.

    Attributes:
        written: Entries appended since start.
        dropped: Entries lost because Redis did not answer.
    """

    def __init__(self, store: RedisStore, *, max_stream_len: int) -> None:
        self._store = store
        self._max_stream_len = max_stream_len
        self.written = 0
        self.dropped = 0

    def queue(self, pipe: Any, entry: RecommendationLogEntry) -> None:
        """Add the entry's append to a pipeline (one command), so it shares a round trip.

        Args:
            pipe: An asyncio Redis pipeline, executed with ``raise_on_error=False``.
            entry: The served list.
        """
        pipe.xadd(
            self._store.keys.stream_impressions(),
            encode_log_entry(entry),
            maxlen=self._max_stream_len,
            approximate=True,
        )

    def settle(self, entry: RecommendationLogEntry, reply: object) -> bool:
        """Count the outcome of a queued append from its reply (an exception when it failed).

        Returns:
            True when stored; False when Redis failed (counted in :attr:`dropped`).
        """
        if isinstance(reply, BaseException):
            self.dropped += 1
            logger.warning("served list %s was not logged: %s", entry.request_id, reply)
            return False
        self.written += 1
        return True
