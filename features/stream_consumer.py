"""One consumer of one Redis consumer group: what to read next, acknowledging, dead letters, lag.

Delivery is at-least-once. :meth:`StreamConsumer.next_batch` hands out, in this order:

1. this consumer's own pending entries (read once after start): a consumer restarted under the
   same name, as a restarted Ray actor is, finishes what it had been given before it died;
2. entries of other consumers idle for longer than ``claim_idle_ms``, taken over with
   ``XAUTOCLAIM``, on start and then every ``claim_every_s``: a consumer that died for good
   cannot strand entries;
3. new entries (``XREADGROUP >``), waiting up to ``block_ms`` for some.

The caller acknowledges with :meth:`StreamConsumer.ack` only once an entry's effects are durable,
and must be idempotent, because an entry is delivered again whenever a consumer dies between
doing the work and acknowledging it.

``claim_idle_ms`` must exceed the longest time a live consumer holds an entry unacknowledged
(batch processing time; for buffering consumers such as the lake writer, the flush interval),
or live consumers steal each other's entries; correctness holds either way (idempotency), only
work is wasted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import redis

from features.redis_store import PendingReply, send_command
from features.stream_codec import entry_key, entry_ms

logger = logging.getLogger(__name__)

_BUSYGROUP: Final = "BUSYGROUP"


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """One delivered stream entry.

    Attributes:
        entry_id: The Redis entry id (``"<ms>-<seq>"``).
        fields: The entry's fields; ``None`` when the entry was deleted (trimmed) while pending.
    """

    entry_id: str
    fields: Mapping[str, str] | None

    @property
    def ms(self) -> int:
        """Milliseconds since the epoch at which the entry was added."""
        return entry_ms(self.entry_id)


def _entries(raw: Sequence[Any]) -> list[StreamEntry]:
    """Entries as redis-py parses them (fields as a dict) or as a raw reply holds them (a flat list)."""
    out: list[StreamEntry] = []
    for entry_id, fields in raw:
        if not fields:
            # A pending entry deleted from the stream comes back with no fields (nil or empty, by version).
            out.append(StreamEntry(str(entry_id), None))
        elif isinstance(fields, dict):
            out.append(StreamEntry(str(entry_id), fields))
        else:
            pairs = iter(fields)
            out.append(StreamEntry(str(entry_id), dict(zip(pairs, pairs, strict=True))))
    return out


def _read_entries(reply: Any) -> list[StreamEntry]:
    """The entries of an ``XREADGROUP`` reply, parsed by redis-py or raw."""
    if not reply:
        return []
    # RESP2 answers [[stream, entries]]; RESP3 answers {stream: entries}.
    batches = list(reply.values()) if isinstance(reply, dict) else [entries for _, entries in reply]
    return [entry for entries in batches for entry in _entries(entries)]


class StreamConsumer:
    """Reads one stream as one named consumer of one group.

    Args:
        client: A sync Redis client decoding replies to ``str``.
        stream: Full key of the stream.
        group: Consumer group name; created (from the start of the stream) when missing.
        consumer: This consumer's name, unique within the group and stable across restarts.
        claim_idle_ms: Idle time after which another consumer's pending entry is taken over.
        claim_every_s: How often a full ``XAUTOCLAIM`` pass runs after the first, at start.
        clock: Monotonic clock in seconds (injectable for tests).
        create_group: Creates the group when it is missing, answering whether it exists now
            (``False``: not yet, try again later); by default it is created at the stream's start.
    """

    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        group: str,
        consumer: str,
        *,
        claim_idle_ms: int = 60_000,
        claim_every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        create_group: Callable[[], bool] | None = None,
    ) -> None:
        if not consumer:
            raise ValueError("a consumer needs a non-empty name")
        self.client = client
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.claim_idle_ms = claim_idle_ms
        self.claim_every_s = claim_every_s
        self._clock = clock
        self._create_group = create_group
        self._ready = False
        self._own_cursor: str | None = "0"
        self._claim_cursor: str | None = None
        self._next_claim_at = 0.0
        self._prefetched: PendingReply | None = None

    def __repr__(self) -> str:
        return f"StreamConsumer({self.stream!r}, group={self.group!r}, consumer={self.consumer!r})"

    def ensure_group(self) -> bool:
        """Create the group (and the stream) unless it exists; returns whether it exists now."""
        if self._create_group is not None:
            self._ready = self._create_group()
            return self._ready
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if _BUSYGROUP not in str(exc):
                raise
        self._ready = True
        return True

    def rewind(self) -> None:
        """Read this consumer's own pending entries again from the start on the next batch.

        Called after a failed batch so its entries are retried without waiting to be claimed.
        A read ahead (:meth:`prefetch`) is dropped: whatever it delivered is among those entries.
        """
        self._own_cursor = "0"
        self._drop_prefetch()

    def prefetch(self, count: int) -> bool:
        """Ask Redis for the next new entries now; the next :meth:`next_batch` collects them.

        A consumer that is about to keep Redis busy (a long script) reads ahead this way: Redis
        answers the read before it runs the script, and the next batch need not wait for the
        script to end before its entries arrive. Nothing is read ahead while own pending entries
        or claims are due, which :meth:`next_batch` hands out first. The entries are delivered
        to this consumer when Redis runs the read; a consumer that dies before processing them
        finds them among its own pending entries, as any delivered entry.

        Args:
            count: Most entries to read.

        Returns:
            Whether a read was sent.
        """
        if (
            self._prefetched is not None
            or not self._ready
            or self._own_cursor is not None
            or self._claim_cursor is not None
            or self._clock() >= self._next_claim_at
        ):
            return False
        self._prefetched = send_command(
            self.client,
            "XREADGROUP",
            "GROUP",
            self.group,
            self.consumer,
            "COUNT",
            count,
            "STREAMS",
            self.stream,
            ">",
        )
        return True

    def _drop_prefetch(self) -> None:
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None:
            prefetched.drop()

    def close(self) -> None:
        """Give back the connection of a read ahead that was never collected."""
        self._drop_prefetch()

    def next_batch(self, count: int, block_ms: int) -> list[StreamEntry]:
        """The next entries to process (own pending, then claimed, then new); see the module doc.

        Args:
            count: Most entries to return.
            block_ms: How long to wait for new entries when nothing else is due; 0 means not at all.

        Returns:
            Entries in id order within each source; empty when nothing arrived in time.
        """
        if not self._ready and not self.ensure_group():
            # The group cannot be made yet; wait as a read would have, rather than spin.
            time.sleep(min(block_ms, 1000) / 1000)
            return []
        try:
            return self._next_batch(count, block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The stream or its group vanished: Redis restarted without persistence, or the
            # namespace was reset. Recreate the group on the next call and start over from the
            # stream's beginning; consumers are idempotent, so rereading is safe.
            self._ready = False
            self._own_cursor = "0"
            self._claim_cursor = None
            self._drop_prefetch()
            return []

    def _next_batch(self, count: int, block_ms: int) -> list[StreamEntry]:
        if self._prefetched is not None:
            prefetched, self._prefetched = self._prefetched, None
            ahead = _read_entries(prefetched.result())
            if ahead:
                return ahead
        if self._own_cursor is not None:
            own = self._read(self._own_cursor, count, None)
            if own:
                self._own_cursor = own[-1].entry_id
                return own
            self._own_cursor = None
        claimed = self._claim_step(count)
        if claimed:
            return claimed
        return self._read(">", count, block_ms if block_ms > 0 else None)

    def _read(self, from_id: str, count: int, block_ms: int | None) -> list[StreamEntry]:
        return _read_entries(
            self.client.xreadgroup(
                self.group, self.consumer, {self.stream: from_id}, count=count, block=block_ms
            )
        )

    def _claim_step(self, count: int) -> list[StreamEntry]:
        now = self._clock()
        if self._claim_cursor is None:
            if now < self._next_claim_at:
                return []
            self._claim_cursor = "0-0"
        reply = self.client.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            self.claim_idle_ms,
            start_id=self._claim_cursor,
            count=count,
        )
        cursor, claimed = str(reply[0]), reply[1]
        if cursor == "0-0":
            self._claim_cursor = None
            self._next_claim_at = now + self.claim_every_s
        else:
            self._claim_cursor = cursor
        entries = _entries(claimed)
        if entries:
            logger.info("%r claimed %d idle entries from other consumers", self, len(entries))
        return entries

    def ack(self, entry_ids: Sequence[str]) -> int:
        """Acknowledge finished entries.

        Args:
            entry_ids: Ids of entries whose effects are durable.

        Returns:
            How many were pending and are now acknowledged.
        """
        if not entry_ids:
            return 0
        return int(self.client.xack(self.stream, self.group, *entry_ids))

    def dead_letter(self, dead_letters: str, entry: StreamEntry, error: str) -> None:
        """Copy an undecodable entry to the dead-letter stream (the caller then acknowledges it).

        Args:
            dead_letters: Full key of the dead-letter stream.
            entry: The entry.
            error: Why it could not be processed.
        """
        fields: dict[Any, Any] = dict(entry.fields or {})
        fields.update(
            {
                "source_stream": self.stream,
                "source_id": entry.entry_id,
                "group": self.group,
                "error": error[:1000],
            }
        )
        self.client.xadd(dead_letters, fields, maxlen=100_000, approximate=True)

    def length(self) -> int:
        """Entries in the stream (0 when it does not exist)."""
        return int(self.client.xlen(self.stream))

    def lag_s(self, now_s: float | None = None) -> float:
        """Age of the oldest entry this group has not finished; 0 when it is caught up.

        The oldest unfinished entry is the group's oldest pending entry, or, when nothing is
        pending, the first entry after its last-delivered id.

        Args:
            now_s: Wall-clock instant in epoch seconds; the current time when omitted.

        Returns:
            Seconds; 0 when the group or the stream does not exist yet.
        """
        now_s = time.time() if now_s is None else now_s
        try:
            groups = self.client.xinfo_groups(self.stream)
        except redis.ResponseError:
            return 0.0
        info = next((g for g in groups if g["name"] == self.group), None)
        if info is None:
            return 0.0
        oldest = self.client.xpending(self.stream, self.group)["min"] if int(info["pending"]) > 0 else None
        if oldest is None:
            # Nothing pending, or another consumer acknowledged the last of it since XINFO.
            after = self.client.xrange(self.stream, min=f"({info['last-delivered-id']}", max="+", count=1)
            if not after:
                return 0.0
            oldest = after[0][0]
        return max(0.0, now_s - entry_ms(str(oldest)) / 1000.0)


def sorted_ids(entry_ids: Sequence[str]) -> list[str]:
    """Entry ids in stream order."""
    return sorted(entry_ids, key=entry_key)
