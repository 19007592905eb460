"""Prometheus metrics of the write path: event intake, stream consumers, lake writes, trimming.

The metrics live on a :class:`prometheus_client.CollectorRegistry` passed in, so tests and
several consumers in one process never clash over metric names. Production code shares one set
registered on the default registry through :func:`default_metrics`; an exporter (``start_http_server``
or a Serve route) publishes it.

Label values are bounded: event types, consumer group names, stream kinds (``events``,
``impressions``), lake table names and a short list of rejection reasons.

Stream lengths and consumer lag are facts about Redis, not about one process, so an exporter
reads them when it is scraped (:func:`read_stream_status`) instead of trusting gauges that some
consumer process last set.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Final

import redis.asyncio as aredis
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from redis.exceptions import ResponseError

from core.tables import EDGES, ITEMS, USERS
from features.keys import RedisKeys
from features.stream_codec import entry_ms

BATCH_BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class StreamMetrics:
    """The write-path metrics, registered on one registry.

    Args:
        registry: Where to register; a fresh private registry when omitted.

    Attributes:
        registry: The registry the metrics are on.
        events_accepted: Events accepted by the API, by ``event_type``.
        events_rejected: Events refused (API validation or undecodable stream entries), by
            ``event_type`` (``unknown`` when it could not be read) and ``reason``.
        entries_processed: Stream entries a consumer finished, by ``group`` and ``outcome``
            (``applied``, ``duplicate``, ``skipped``, ``invalid``, ``written``).
        stream_length: Entries in a stream, by ``stream``.
        consumer_lag_s: Age of the oldest entry a group has not finished, by ``stream`` and ``group``.
        batch_seconds: Time to process one batch, by ``group``.
        lake_rows: Rows appended to the lake, by ``table``.
        trimmed_entries: Entries trimmed from a stream after every group acknowledged them.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True) if registry is None else registry
        r = self.registry
        self.events_accepted = Counter(
            "rayrec_events_accepted", "Events accepted by the API.", ["event_type"], registry=r
        )
        self.events_rejected = Counter(
            "rayrec_events_rejected", "Events refused.", ["event_type", "reason"], registry=r
        )
        self.entries_processed = Counter(
            "rayrec_stream_entries_processed",
            "Stream entries a consumer group finished.",
            ["group", "outcome"],
            registry=r,
        )
        self.stream_length = Gauge("rayrec_stream_length", "Entries in a stream.", ["stream"], registry=r)
        self.consumer_lag_s = Gauge(
            "rayrec_consumer_lag_seconds",
            "Age of the oldest entry a consumer group has not finished (0 when caught up).",
            ["stream", "group"],
            registry=r,
        )
        self.batch_seconds = Histogram(
            "rayrec_stream_batch_seconds",
            "Time to process one batch of stream entries.",
            ["group"],
            buckets=BATCH_BUCKETS_S,
            registry=r,
        )
        self.lake_rows = Counter(
            "rayrec_lake_rows_written", "Rows appended to the lake.", ["table"], registry=r
        )
        self.trimmed_entries = Counter(
            "rayrec_stream_trimmed_entries",
            "Entries trimmed after every consumer group acknowledged them.",
            ["stream"],
            registry=r,
        )


_default: StreamMetrics | None = None
_default_lock = threading.Lock()


def default_metrics() -> StreamMetrics:
    """The process-wide metrics on ``prometheus_client.REGISTRY``, created on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = StreamMetrics(REGISTRY)
        return _default


def watched_streams(keys: RedisKeys) -> dict[str, str]:
    """The streams an exporter reports, by the short name used as the ``stream`` label.

    Args:
        keys: The namespace's key builder.

    Returns:
        Label (``events``, ``impressions``, ``catalog:items``, …, ``dead-letters``) to stream key.
    """
    return {
        "events": keys.stream_events(),
        "impressions": keys.stream_impressions(),
        **{f"catalog:{table.name}": keys.stream_catalog(table.name) for table in (ITEMS, USERS, EDGES)},
        "dead-letters": keys.stream_dead_letters(),
    }


@dataclass(frozen=True, slots=True)
class GroupStatus:
    """Where one consumer group stands on one stream.

    Attributes:
        group: The group's name.
        pending: Entries delivered to a consumer and not yet acknowledged.
        undelivered: Entries not yet delivered to any consumer (``None`` when Redis cannot tell,
            e.g. after entries were deleted from the middle of the stream).
        lag_s: Age of the oldest entry the group has not finished (pending, or else the first
            undelivered one); 0 when it is caught up.
        delivered: Entries delivered to the group since it was created (``None`` when Redis
            cannot tell); less ``pending``, what the group finished.
    """

    group: str
    pending: int
    undelivered: int | None
    lag_s: float
    delivered: int | None = None


@dataclass(frozen=True, slots=True)
class StreamStatus:
    """One stream's length and its consumer groups.

    Attributes:
        name: Short name (the ``stream`` label).
        key: Full Redis key.
        length: Entries in the stream (0 when it does not exist).
        groups: One status per consumer group, by group name.
    """

    name: str
    key: str
    length: int
    groups: tuple[GroupStatus, ...]


async def read_stream_status(
    client: aredis.Redis, streams: dict[str, str], now_s: float | None = None
) -> list[StreamStatus]:
    """Lengths and consumer-group lag of some streams, in two pipelined round trips.

    The oldest unfinished entry of a group is its oldest pending entry (``XPENDING``) or, when
    nothing is pending, the first entry after its last-delivered id (``XINFO GROUPS``); lag is
    that entry's age, read from its id. ``pending`` is as of the second round trip.

    Args:
        client: An asyncio client decoding replies to ``str``.
        streams: Short name to stream key (see :func:`watched_streams`).
        now_s: Wall-clock instant in epoch seconds; the current time when omitted.

    Returns:
        One status per stream, in the order given.

    Raises:
        redis.exceptions.RedisError: Redis could not be reached (connection and timeout errors).
    """
    now_s = time.time() if now_s is None else now_s
    names = list(streams)
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.xlen(streams[name])
        pipe.xinfo_groups(streams[name])
    replies = await pipe.execute(raise_on_error=False)
    lengths: dict[str, int] = {}
    infos: dict[str, list[dict[str, Any]]] = {}
    for i, name in enumerate(names):
        length, group_infos = replies[2 * i], replies[2 * i + 1]
        if isinstance(length, Exception):
            raise length
        if isinstance(group_infos, Exception) and not isinstance(group_infos, ResponseError):
            raise group_infos
        lengths[name] = int(length)
        # A stream that does not exist answers XINFO with an error: no groups yet.
        infos[name] = [] if isinstance(group_infos, ResponseError) else list(group_infos)
    # Both candidates for every group: a consumer may acknowledge its last pending entries
    # between the two round trips, and the first undelivered entry is then the oldest one left.
    oldest = client.pipeline(transaction=False)
    for name in names:
        for info in infos[name]:
            oldest.xpending(streams[name], info["name"])
            oldest.xrange(streams[name], min=f"({info['last-delivered-id']}", max="+", count=1)
    answers = iter(await oldest.execute() if any(infos.values()) else [])
    out: list[StreamStatus] = []
    for name in names:
        groups: list[GroupStatus] = []
        for info in infos[name]:
            summary, after = next(answers), next(answers)
            if summary["min"] is not None:
                oldest_id: str | None = str(summary["min"])
            else:
                oldest_id = str(after[0][0]) if after else None
            lag_s = 0.0 if oldest_id is None else max(0.0, now_s - entry_ms(oldest_id) / 1000.0)
            undelivered, delivered = info.get("lag"), info.get("entries-read")
            groups.append(
                GroupStatus(
                    group=str(info["name"]),
                    pending=int(summary["pending"]),
                    undelivered=None if undelivered is None else int(undelivered),
                    lag_s=lag_s,
                    delivered=None if delivered is None else int(delivered),
                )
            )
        out.append(StreamStatus(name, streams[name], lengths[name], tuple(groups)))
    return out
