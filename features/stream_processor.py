"""The stream processor: applies the events stream to the online features, exactly once in effect.

Input: the events stream ``{ns}:stream:events``. Each entry has one field ``"e"`` holding a
:class:`core.schema.UserEvent` as camelCase JSON; a producer adds one with
``XADD {ns}:stream:events * e <json>`` (:func:`features.stream_codec.encode_event` builds the
fields). A processor folds one feature partition (see :mod:`features.partitions`) and reads the
stream as a member of that partition's consumer group (``features-users``, ``features-items``);
the deployment runs one processor per partition, side by side. A processor made without a
partition folds all of them, as a member of the group ``"features"`` (tests, small setups).

Each batch: read (own pending entries after a restart, idle entries of dead consumers, then new
ones; see :mod:`features.stream_consumer`) → decode (directly for entries the intake wrote, with
full validation for anything else, see :meth:`EventRecord.from_event_json`) →
:meth:`OnlineFeatureStore.apply_events` (one transaction for the whole batch, idempotent on
``event_id``) → ``XACK``. Undecodable entries go to ``{ns}:stream:dead-letters`` and are
acknowledged, so one bad entry cannot stall the group.
A crash anywhere before ``XACK`` leads to redelivery, which the processed-event markers turn into
a no-op for everything already applied.

:class:`StreamProcessor` holds the logic and runs in-process (tests, CLI);
:class:`StreamProcessorActor` runs it in a Ray actor that Ray restarts when it dies.
"""

from __future__ import annotations

import functools
import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

import ray

from core.settings import Settings
from features.consumer_loop import ConsumerLoop, relax_gc
from features.metrics import StreamMetrics, default_metrics
from features.online_store import ApplyResult, InFlightApply, OnlineFeatureStore
from features.params import DEFAULT_PARAMS, FeatureParams
from features.partitions import PARTITIONS, FeaturePartition
from features.partitions import groups as partition_groups
from features.partitions import partition as partition_named
from features.records import EventRecord
from features.redis_store import RedisStore
from features.stream_codec import FEATURES_GROUP, EntryDecodeError, decode_event_record
from features.stream_consumer import StreamConsumer, StreamEntry
from features.stream_groups import ensure_partition_group

logger = logging.getLogger(__name__)

GROUP: Final = FEATURES_GROUP
"""Consumer group of a processor that folds every partition."""

ACTOR_NAME: Final = "rayrec-stream-processor"
"""Default name of the processor actor, for ``ray.get_actor``."""

STATE_CACHE_SIZE: Final = 10_000
"""Entity states a processor keeps in memory after writing them (see :class:`OnlineFeatureStore`).

Hot items and creators recur in nearly every batch; keeping their states saves reading and
decoding them again. A user's state is the largest (up to 50 recent events, some 10-15 KB in
memory), which bounds this to tens of megabytes.
"""


@dataclass(slots=True)
class ProcessorStats:
    """Running totals of one processor.

    Attributes:
        batches: Batches handled.
        entries: Stream entries acknowledged.
        applied: Events folded into features.
        duplicates: Events already applied before (redeliveries, repeats).
        skipped: Events of erased users.
        invalid: Undecodable entries sent to the dead-letter stream.
        retries: Transactions retried after a concurrent write.
        busy_s: Seconds spent processing batches (decode, apply, acknowledge), in total. With
            ``overlap``, a batch's time leaves out the previous batch's finish, which runs
            within it, so the total is not counted twice.
        last_batch_s: Seconds the latest batch took.
    """

    batches: int = 0
    entries: int = 0
    applied: int = 0
    duplicates: int = 0
    skipped: int = 0
    invalid: int = 0
    retries: int = 0
    busy_s: float = 0.0
    last_batch_s: float = 0.0


class StreamProcessor:
    """Applies the events stream to the online feature store as one consumer of group ``features``.

    Args:
        store: The Redis store.
        consumer: This consumer's name: unique in the group, the same across restarts.
        partition: The feature partition it folds, in that partition's group; every partition,
            in group :data:`GROUP`, when omitted.
        online: The feature store to apply to, covering exactly ``partition``; one on ``store``
            with default parameters and a state cache of :data:`STATE_CACHE_SIZE` when omitted.
        claim_idle_ms: Idle time after which other consumers' pending entries are taken over.
        claim_every_s: How often idle entries are looked for after the first time, at start.
        metrics: Where to count; the process-wide metrics when omitted.
        metrics_every_s: How often stream length and lag are measured.
        overlap: Fold each batch while the previous one's write runs in Redis (see
            :meth:`run_once`); :meth:`process` and :meth:`drain` still return only once their
            entries are acknowledged.
    """

    def __init__(
        self,
        store: RedisStore,
        consumer: str,
        *,
        partition: FeaturePartition | None = None,
        online: OnlineFeatureStore | None = None,
        claim_idle_ms: int = 60_000,
        claim_every_s: float = 30.0,
        metrics: StreamMetrics | None = None,
        metrics_every_s: float = 5.0,
        overlap: bool = False,
    ) -> None:
        covered = (partition,) if partition is not None else PARTITIONS
        if online is not None and online.partitions != covered:
            raise ValueError(
                f"the feature store covers partitions {[p.name for p in online.partitions]}, "
                f"the processor {[p.name for p in covered]}"
            )
        self.store = store
        self.partition = partition
        self.group = GROUP if partition is None else partition.group
        self.online = online or OnlineFeatureStore(
            store, partitions=covered, state_cache_size=STATE_CACHE_SIZE
        )
        stream = store.keys.stream_events()
        create_group = None
        if partition is not None:
            create_group = functools.partial(
                ensure_partition_group,
                store.client,
                stream,
                self.group,
                partition_groups=partition_groups(),
                idle_ms=claim_idle_ms,
            )
        self.consumer = StreamConsumer(
            store.client,
            stream,
            self.group,
            consumer,
            claim_idle_ms=claim_idle_ms,
            claim_every_s=claim_every_s,
            create_group=create_group,
        )
        self.metrics = metrics or default_metrics()
        self.metrics_every_s = metrics_every_s
        self.stats = ProcessorStats()
        self._next_metrics_at = 0.0
        self.overlap = overlap
        # The batch whose write runs in Redis: its entries, undecodable count, write, and the
        # seconds spent on it so far (its reads, folds and send; not the previous batch's finish).
        self._in_flight: tuple[Sequence[StreamEntry], int, InFlightApply, float] | None = None
        self._count = 500  # the latest batch size asked for, which a read ahead uses too

    def __repr__(self) -> str:
        return f"StreamProcessor(consumer={self.consumer.consumer!r}, stream={self.consumer.stream!r})"

    def run_once(self, count: int = 500, block_ms: int = 1000) -> int:
        """Process one batch.

        With ``overlap``, the batch's write is only started: Redis runs it while the next call
        reads and folds the next batch, and that call acknowledges it once the write is done
        (a call that finds no new entries finishes it before it waits for any). The next
        batch's entries are asked for just before the write goes out
        (:meth:`StreamConsumer.prefetch`), so they need not wait for the script to end. A batch
        is staged on the states the previous one is writing; the commit script checks them as
        always, so when that write fails the next is read and folded again (see
        :meth:`OnlineFeatureStore.stage_events`).

        Args:
            count: Most entries in the batch.
            block_ms: How long to wait for new entries when nothing is pending; 0: do not wait.

        Returns:
            How many entries were processed, or with ``overlap`` taken on (0 when none arrived).

        Raises:
            StoreUnavailable: Redis could not be reached; the batch stays pending and is retried.
            ApplyConflict: The batch kept conflicting with another consumer; retried likewise.
        """
        self._count = count
        with self.store.guard():
            if not self.overlap:
                entries = self.consumer.next_batch(count, block_ms)
                handled = self.process(entries) if entries else 0
            else:
                entries = self.consumer.next_batch(count, 0 if self._in_flight else block_ms)
                if entries:
                    handled = self._take_on(entries)
                else:
                    self.flush()  # counted when taken on
                    handled = 0
            self._refresh_gauges()
        return handled

    def drain(self, count: int = 500, max_batches: int | None = None) -> int:
        """Process batches without waiting until none is left (tests, backfills, the CLI).

        Args:
            count: Most entries per batch.
            max_batches: Stop after this many batches; no limit when omitted.

        Returns:
            How many entries were processed.
        """
        total = batches = 0
        while max_batches is None or batches < max_batches:
            handled = self.run_once(count, 0)
            if not handled:
                break
            total += handled
            batches += 1
        self.flush()  # counted when taken on
        return total

    def flush(self) -> int:
        """Finish the batch whose write is in flight (``overlap``), acknowledging it.

        Returns:
            How many entries it held (0 when none was in flight).
        """
        flight, self._in_flight = self._in_flight, None
        if flight is None:
            return 0
        entries, invalid, write, spent_s = flight
        since = time.perf_counter()
        try:
            result = self.online.finish(write)
        except Exception:
            self.consumer.rewind()
            raise
        return self._acknowledge(entries, invalid, result, since, spent_s)

    def _take_on(self, entries: Sequence[StreamEntry]) -> int:
        """Stage a batch while the previous write runs, finish that one, then start this one's."""
        started = time.perf_counter()
        records, invalid = self._records(entries)
        try:
            staged = self.online.stage_events(records)
            spent_s = time.perf_counter() - started
            self.flush()
            sending = time.perf_counter()
            # Read ahead before the write goes out, so Redis answers the read first.
            self.consumer.prefetch(self._count)
            write = self.online.send(staged)  # stages again if the flushed write failed
            spent_s += time.perf_counter() - sending
        except Exception:
            self._abandon()
            raise
        self._in_flight = (entries, invalid, write, spent_s)
        return len(entries)

    def _abandon(self) -> None:
        """After a failure: drop the write in flight, forget cached states, reread own entries."""
        flight, self._in_flight = self._in_flight, None
        if flight is not None and flight[2].reply is not None:
            flight[2].reply.drop()
        self.online.forget()
        self.consumer.rewind()

    def process(self, entries: Sequence[StreamEntry]) -> int:
        """Apply some delivered entries and acknowledge them.

        Args:
            entries: Entries delivered to this consumer.

        Returns:
            How many entries were acknowledged.
        """
        self.flush()
        started = time.perf_counter()
        records, invalid = self._records(entries)
        try:
            result = self.online.apply_events(records)
        except Exception:
            # Retry the batch promptly instead of waiting for it to be claimed as idle.
            self.consumer.rewind()
            raise
        return self._acknowledge(entries, invalid, result, started)

    def _records(self, entries: Sequence[StreamEntry]) -> tuple[list[EventRecord], int]:
        """The decoded records of some entries, and how many were undecodable (dead-lettered)."""
        records: list[EventRecord] = []
        invalid = 0
        for entry in entries:
            record = _decode(entry)
            if isinstance(record, EventRecord):
                records.append(record)
            else:
                invalid += 1
                self._reject(entry, record)
        return records, invalid

    def _acknowledge(
        self,
        entries: Sequence[StreamEntry],
        invalid: int,
        result: ApplyResult,
        since: float,
        spent_s: float = 0.0,
    ) -> int:
        """Acknowledge a batch whose effects are written, and count it.

        Its processing time is ``spent_s`` plus the time since ``since`` (``perf_counter``).
        """
        acked = self.consumer.ack([e.entry_id for e in entries])
        elapsed = spent_s + time.perf_counter() - since
        stats, counter = self.stats, self.metrics.entries_processed
        # Time first: a concurrent ``stats`` read that sees the entries also sees their time.
        stats.busy_s += elapsed
        stats.last_batch_s = elapsed
        stats.batches += 1
        stats.entries += len(entries)
        stats.applied += result.applied
        stats.duplicates += result.duplicates
        stats.skipped += result.skipped
        stats.invalid += invalid
        stats.retries += result.retries
        for outcome, n in (
            ("applied", result.applied),
            ("duplicate", result.duplicates),
            ("skipped", result.skipped),
            ("invalid", invalid),
        ):
            if n:
                counter.labels(self.group, outcome).inc(n)
        self.metrics.batch_seconds.labels(self.group).observe(elapsed)
        if acked != len(entries):
            # Another consumer claimed and acknowledged some of them meanwhile; effects are still once.
            logger.info(
                "%r: %d of %d entries were acknowledged elsewhere", self, len(entries) - acked, len(entries)
            )
        return len(entries)

    def _reject(self, entry: StreamEntry, error: str) -> None:
        logger.warning("%r: entry %s is not a valid event: %s", self, entry.entry_id, error)
        self.metrics.events_rejected.labels("unknown", "undecodable_stream_entry").inc()
        if entry.fields is not None:
            self.consumer.dead_letter(self.store.keys.stream_dead_letters(), entry, error)

    def _refresh_gauges(self) -> None:
        now = time.monotonic()
        if now < self._next_metrics_at:
            return
        self._next_metrics_at = now + self.metrics_every_s
        self.metrics.stream_length.labels("events").set(self.consumer.length())
        self.metrics.consumer_lag_s.labels("events", self.group).set(self.consumer.lag_s())


def _decode(entry: StreamEntry) -> EventRecord | str:
    """The record of an entry (see :func:`decode_event_record`), or why it has none."""
    try:
        return decode_event_record(entry.fields)
    except EntryDecodeError as exc:
        return str(exc)


def default_consumer_name() -> str:
    """A consumer name stable for one host: ``processor-<hostname>``."""
    return f"processor-{socket.gethostname()}"


@ray.remote(max_restarts=-1, max_task_retries=-1)
class StreamProcessorActor:
    """A :class:`StreamProcessor` in a Ray actor, looping in a background thread.

    It overlaps each batch's folds with the previous batch's write (``overlap``): the actor's
    throughput is then bounded by the larger of its own CPU and Redis' time per event rather
    than by their sum.

    Ray restarts the actor whenever it dies (``max_restarts=-1``); the new instance starts looping
    again by itself (``autostart``) under the same consumer name, so it first finishes the entries
    its predecessor had been given. Create it with a ``name`` (see :func:`start_stream_processor`)
    so other processes find it with ``ray.get_actor``.

    Args:
        settings: Redis URL and namespace.
        consumer: Consumer name in the group; keep it stable across restarts.
        partition: Name of the feature partition it folds (see :mod:`features.partitions`);
            every partition, in group ``features``, when omitted.
        batch_size: Most entries per batch.
        block_ms: How long one read waits for new entries.
        claim_idle_ms: Idle time after which other consumers' pending entries are taken over.
        params: Fold constants; the defaults when omitted.
        state_cache_size: Entity states kept in memory after writing them.
        autostart: Start looping at construction, which is what makes restarts resume.
    """

    def __init__(
        self,
        settings: Settings,
        consumer: str = "processor-0",
        *,
        partition: str | None = None,
        batch_size: int = 500,
        block_ms: int = 1000,
        claim_idle_ms: int = 60_000,
        params: FeatureParams | None = None,
        state_cache_size: int = STATE_CACHE_SIZE,
        autostart: bool = True,
    ) -> None:
        relax_gc()  # the actor has its process to itself
        self._store = RedisStore.from_settings(settings)
        share = None if partition is None else partition_named(partition)
        online = OnlineFeatureStore(
            self._store,
            params=params or DEFAULT_PARAMS,
            partitions=PARTITIONS if share is None else (share,),
            processed_ttl_s=settings.processed_ttl_s,
            state_cache_size=state_cache_size,
        )
        self._processor = StreamProcessor(
            self._store,
            consumer,
            partition=share,
            online=online,
            claim_idle_ms=claim_idle_ms,
            overlap=True,
        )
        self._loop = ConsumerLoop(
            f"stream-processor[{consumer}]",
            lambda: self._processor.run_once(batch_size, block_ms),
            on_stop=self._flush,
        )
        if autostart:
            self._loop.start()

    def _flush(self) -> None:
        # The last batch's write may still be in flight: acknowledge it rather than leave it
        # to be delivered again.
        self._processor.flush()
        self._processor.consumer.close()

    def start(self) -> bool:
        """Start looping; returns False when the loop was running already."""
        return self._loop.start()

    def stop(self) -> dict[str, Any]:
        """Stop looping after the current batch; returns the final :meth:`stats`."""
        self._loop.stop()
        return self.stats()

    def stats(self) -> dict[str, Any]:
        """Totals of the processor and state of the loop.

        ``entries`` counts the entries acknowledged, with their effects written; ``taken`` counts
        those the loop has taken on, which with overlapped batches runs one batch ahead.
        """
        loop = self._loop.stats()
        return {
            "consumer": self._processor.consumer.consumer,
            "group": self._processor.group,
            **loop,
            "taken": loop["entries"],
            **asdict(self._processor.stats),
        }


def start_stream_processor(
    settings: Settings,
    *,
    name: str = ACTOR_NAME,
    consumer: str = "processor-0",
    partition: str | None = None,
    batch_size: int = 500,
    state_cache_size: int = STATE_CACHE_SIZE,
    **options: Any,
) -> Any:
    """Get the named processor actor, creating it when it does not exist.

    Args:
        settings: Redis URL and namespace.
        name: Actor name.
        consumer: Consumer name in the group.
        partition: Name of the feature partition it folds; all of them when omitted.
        batch_size: Most entries per batch (see :class:`StreamProcessorActor`).
        state_cache_size: Entity states kept in memory after writing them.
        **options: Further ``.options(...)`` for the actor (``lifetime="detached"``, resources).

    Returns:
        The actor handle.
    """
    return StreamProcessorActor.options(name=name, get_if_exists=True, **options).remote(  # type: ignore[attr-defined]
        settings,
        consumer,
        partition=partition,
        batch_size=batch_size,
        state_cache_size=state_cache_size,
    )
