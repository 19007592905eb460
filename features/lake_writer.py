"""The lake writer: appends the events, impressions and catalog streams to the lake in micro-batches.

It reads both streams as one consumer of group ``"lake"`` (entry format in
:mod:`features.stream_codec`), buffers rows per stream, and flushes a buffer to its table
(``events``: one row per event; ``impressions``: one row per served item) when it holds
``flush_entries`` entries or its oldest entry has waited ``flush_interval_s``. Entries are
acknowledged only after their file is in place.

File names are deterministic: ``stream-<first id>-<last id>-<count>``, so a batch written again
after a crash between write and acknowledge replaces its own file. A redelivered batch can still
differ from the first attempt (entries claimed by another consumer come in other batches); those
rows are then written twice, and readers drop the repeats by ``event_id``
(:meth:`core.lake.Lake.read_deduped`). Delivery to the lake is at-least-once; reads are
exactly-once.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import pyarrow as pa
import ray

from core.lake import Lake
from core.settings import Settings
from core.tables import EDGES, EVENTS, IMPRESSIONS, ITEMS, USERS, TableSpec
from features.catalog_changes import decode_change
from features.consumer_loop import ConsumerLoop, relax_gc
from features.metrics import StreamMetrics, default_metrics
from features.redis_store import RedisStore
from features.stream_codec import (
    LAKE_GROUP,
    EntryDecodeError,
    decode_event_record,
    decode_log_entry,
    impression_rows,
)
from features.stream_consumer import StreamConsumer, StreamEntry, sorted_ids
from features.stream_trim import trim_acknowledged

logger = logging.getLogger(__name__)

GROUP: Final = LAKE_GROUP
"""Consumer group of the lake writer on both streams."""

ACTOR_NAME: Final = "rayrec-lake-writer"
"""Default name of the lake writer actor, for ``ray.get_actor``."""

_UNSAFE_NAME_CHARS: Final = re.compile(r"[^A-Za-z0-9_.+@\-]")


def batch_file_name(entry_ids: Sequence[str]) -> str:
    """The deterministic file name of a micro-batch: ``stream-<first>-<last>-<count>``.

    Args:
        entry_ids: The batch's entry ids (any order, at least one).

    Returns:
        A name :meth:`core.lake.Lake.append` accepts.
    """
    ordered = sorted_ids(entry_ids)
    return _UNSAFE_NAME_CHARS.sub("_", f"stream-{ordered[0]}-{ordered[-1]}-{len(ordered)}")


def event_rows(fields: Any) -> list[dict[str, Any]]:
    """The ``events`` rows of one events-stream entry (always one)."""
    return [decode_event_record(fields).to_row()]


def log_entry_rows(fields: Any) -> list[dict[str, Any]]:
    """The ``impressions`` rows of one impressions-stream entry (one per served item)."""
    return impression_rows(decode_log_entry(fields))


def change_rows(fields: Any) -> list[dict[str, Any]]:
    """The change-log row of one catalog-stream entry (always one)."""
    return [decode_change(fields)]


@dataclass(slots=True)
class _Source:
    """One stream, its table and what is buffered from it."""

    name: str
    consumer: StreamConsumer
    table: TableSpec
    rows_of: Callable[[Any], list[dict[str, Any]]]
    buffered: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    oldest_at: float | None = None


@dataclass(slots=True)
class LakeWriterStats:
    """Running totals of one lake writer.

    Attributes:
        files: Micro-batches flushed (one ``Lake.append`` each).
        rows: Rows written.
        entries: Stream entries acknowledged.
        invalid: Undecodable entries sent to the dead-letter stream.
        trimmed: Stream entries trimmed after every group finished them.
    """

    files: int = 0
    rows: int = 0
    entries: int = 0
    invalid: int = 0
    trimmed: int = 0


class LakeWriter:
    """Appends the events and impressions streams to the lake as one consumer of group ``lake``.

    Args:
        store: The Redis store.
        lake: The lake to append to.
        consumer: This consumer's name: unique in the group, the same across restarts.
        flush_entries: Flush a stream's buffer once it holds this many entries.
        flush_interval_s: Flush a stream's buffer once its oldest entry waited this long.
        claim_idle_ms: Idle time after which other consumers' pending entries are taken over;
            must exceed ``flush_interval_s`` plus a write, or live writers steal each other's
            buffered entries (harmless, but written twice).
        claim_every_s: How often idle entries are looked for after the first time, at start.
        trim_every_s: Also trim both streams (see :mod:`features.stream_trim`) this often;
            ``None``: never (someone else trims).
        metrics: Where to count; the process-wide metrics when omitted.
        clock: Monotonic clock in seconds (injectable for tests).
    """

    def __init__(
        self,
        store: RedisStore,
        lake: Lake,
        consumer: str,
        *,
        flush_entries: int = 1000,
        flush_interval_s: float = 5.0,
        claim_idle_ms: int = 60_000,
        claim_every_s: float = 30.0,
        trim_every_s: float | None = None,
        metrics: StreamMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if claim_idle_ms <= flush_interval_s * 1000:
            raise ValueError("claim_idle_ms must exceed flush_interval_s, or writers steal buffered entries")
        self.store = store
        self.lake = lake
        self.flush_entries = flush_entries
        self.flush_interval_s = flush_interval_s
        self.trim_every_s = trim_every_s
        self.metrics = metrics or default_metrics()
        self.stats = LakeWriterStats()
        self._clock = clock
        self._next_trim_at = clock() + (trim_every_s or 0.0)
        keys = store.keys

        def consumer_of(stream: str) -> StreamConsumer:
            return StreamConsumer(
                store.client,
                stream,
                GROUP,
                consumer,
                claim_idle_ms=claim_idle_ms,
                claim_every_s=claim_every_s,
                clock=clock,
            )

        # Events last: the others are read without waiting, then the events read may block.
        self._sources = (
            _Source("impressions", consumer_of(keys.stream_impressions()), IMPRESSIONS, log_entry_rows),
            *(
                _Source(
                    f"catalog:{spec.name}", consumer_of(keys.stream_catalog(spec.name)), spec, change_rows
                )
                for spec in (ITEMS, USERS, EDGES)
            ),
            _Source("events", consumer_of(keys.stream_events()), EVENTS, event_rows),
        )

    def __repr__(self) -> str:
        return f"LakeWriter(consumer={self._sources[0].consumer.consumer!r}, lake={self.lake!r})"

    @property
    def buffered(self) -> int:
        """Entries read but not yet written."""
        return sum(len(s.buffered) for s in self._sources)

    def run_once(self, count: int = 500, block_ms: int = 1000) -> int:
        """Read one batch from each stream, then flush whatever buffer is due.

        Args:
            count: Most entries read per stream.
            block_ms: Longest wait for new events; shortened so a due flush is never late.

        Returns:
            How many entries were read.

        Raises:
            StoreUnavailable: Redis could not be reached; buffered entries stay pending.
        """
        read = 0
        with self.store.guard():
            for source in self._sources:
                wait_ms = block_ms if source is self._sources[-1] else 0
                wait_ms = min(wait_ms, self._ms_until_due())
                entries = source.consumer.next_batch(count, max(wait_ms, 0))
                self._buffer(source, entries)
                read += len(entries)
            self.flush()
            self._maybe_trim()
        return read

    def drain(self, count: int = 500, max_batches: int | None = None) -> int:
        """Read without waiting until both streams are exhausted, then flush everything.

        Args:
            count: Most entries per read.
            max_batches: Stop reading after this many rounds; no limit when omitted.

        Returns:
            How many entries were read.
        """
        total = rounds = 0
        while max_batches is None or rounds < max_batches:
            read = self.run_once(count, 0)
            total += read
            rounds += 1
            if not read:
                break
        self.flush(force=True)
        return total

    def _ms_until_due(self) -> int:
        ages = [s.oldest_at for s in self._sources if s.oldest_at is not None]
        if not ages:
            return 1 << 30
        return int((min(ages) + self.flush_interval_s - self._clock()) * 1000)

    def _buffer(self, source: _Source, entries: Sequence[StreamEntry]) -> None:
        for entry in entries:
            if entry.entry_id in source.buffered:
                continue  # claimed back while still buffered here
            try:
                rows = source.rows_of(entry.fields)
            except EntryDecodeError as exc:
                rows = []  # acknowledged with the batch, so it cannot stall the group
                self.stats.invalid += 1
                logger.warning("%r: %s entry %s is invalid: %s", self, source.name, entry.entry_id, exc)
                self.metrics.events_rejected.labels("unknown", f"undecodable_{source.name}_entry").inc()
                if entry.fields is not None:
                    source.consumer.dead_letter(self.store.keys.stream_dead_letters(), entry, str(exc))
            source.buffered[entry.entry_id] = rows
            if source.oldest_at is None:
                source.oldest_at = self._clock()

    def flush(self, *, force: bool = False) -> int:
        """Write every buffer that is due (every non-empty one when ``force``), then acknowledge.

        Args:
            force: Flush regardless of size and age (shutdown, tests).

        Returns:
            Rows written.

        Raises:
            StoreUnavailable: Redis could not be reached for the acknowledgement; the file is in
                place and the entries are redelivered, which the deterministic name absorbs.
        """
        written = 0
        now = self._clock()
        for source in self._sources:
            if not source.buffered:
                continue
            due = (
                force
                or len(source.buffered) >= self.flush_entries
                or (source.oldest_at is not None and now - source.oldest_at >= self.flush_interval_s)
            )
            if due:
                written += self._flush(source)
        return written

    def _flush(self, source: _Source) -> int:
        started = time.perf_counter()
        ids = sorted_ids(list(source.buffered))
        rows = [row for entry_id in ids for row in source.buffered[entry_id]]
        if rows:
            table = pa.Table.from_pylist(rows, schema=source.table.schema)
            self.lake.append(source.table, table, name=batch_file_name(ids))
            self.stats.files += 1
            self.stats.rows += len(rows)
            self.metrics.lake_rows.labels(source.table.name).inc(len(rows))
        with self.store.guard():
            source.consumer.ack(ids)
        self.stats.entries += len(ids)
        self.metrics.entries_processed.labels(GROUP, "written").inc(len(ids))
        self.metrics.batch_seconds.labels(GROUP).observe(time.perf_counter() - started)
        source.buffered.clear()
        source.oldest_at = None
        return len(rows)

    def _maybe_trim(self) -> None:
        if self.trim_every_s is None or self._clock() < self._next_trim_at:
            return
        self._next_trim_at = self._clock() + self.trim_every_s
        self.stats.trimmed += trim_acknowledged(self.store, metrics=self.metrics)
        for source in self._sources:
            self.metrics.stream_length.labels(source.name).set(source.consumer.length())
            self.metrics.consumer_lag_s.labels(source.name, GROUP).set(source.consumer.lag_s())


@ray.remote(max_restarts=-1, max_task_retries=-1)
class LakeWriterActor:
    """A :class:`LakeWriter` in a Ray actor, looping in a background thread.

    Restarted by Ray when it dies; the new instance resumes by itself under the same consumer
    name and first rewrites what its predecessor had buffered. ``stop`` flushes what is buffered.

    Args:
        settings: Redis URL, namespace and data home (the lake).
        consumer: Consumer name in group ``lake``; keep it stable across restarts.
        batch_size: Most entries per read.
        block_ms: How long one read waits for new events.
        flush_entries: See :class:`LakeWriter`.
        flush_interval_s: See :class:`LakeWriter`.
        claim_idle_ms: See :class:`LakeWriter`.
        trim_every_s: See :class:`LakeWriter`.
        autostart: Start looping at construction, which is what makes restarts resume.
    """

    def __init__(
        self,
        settings: Settings,
        consumer: str = "lake-0",
        *,
        batch_size: int = 500,
        block_ms: int = 1000,
        flush_entries: int = 1000,
        flush_interval_s: float = 5.0,
        claim_idle_ms: int = 60_000,
        trim_every_s: float | None = 60.0,
        autostart: bool = True,
    ) -> None:
        relax_gc()  # the actor has its process to itself
        self._store = RedisStore.from_settings(settings)
        self._writer = LakeWriter(
            self._store,
            Lake(settings.home),
            consumer,
            flush_entries=flush_entries,
            flush_interval_s=flush_interval_s,
            claim_idle_ms=claim_idle_ms,
            trim_every_s=trim_every_s,
        )
        self._loop = ConsumerLoop(
            f"lake-writer[{consumer}]",
            lambda: self._writer.run_once(batch_size, block_ms),
            on_stop=self._final_flush,
        )
        if autostart:
            self._loop.start()

    def _final_flush(self) -> None:
        self._writer.flush(force=True)

    def start(self) -> bool:
        """Start looping; returns False when the loop was running already."""
        return self._loop.start()

    def stop(self) -> dict[str, Any]:
        """Stop looping, flush what is buffered, and return the final :meth:`stats`."""
        self._loop.stop()
        return self.stats()

    def stats(self) -> dict[str, Any]:
        """Totals of the writer and state of the loop.

        ``entries`` counts the entries acknowledged, their files in place; ``taken`` counts those
        the loop has read, ``buffered`` included.
        """
        loop = self._loop.stats()
        totals = asdict(self._writer.stats)
        return {"buffered": self._writer.buffered, **loop, "taken": loop["entries"], **totals}


def start_lake_writer(
    settings: Settings, *, name: str = ACTOR_NAME, consumer: str = "lake-0", **options: Any
) -> Any:
    """Get the named lake writer actor, creating it when it does not exist.

    Args:
        settings: Redis URL, namespace and data home.
        name: Actor name.
        consumer: Consumer name in group ``lake``.
        **options: Further ``.options(...)`` for the actor (``lifetime="detached"``, resources).

    Returns:
        The actor handle.
    """
    return LakeWriterActor.options(name=name, get_if_exists=True, **options).remote(  # type: ignore[attr-defined]
        settings, consumer
    )
