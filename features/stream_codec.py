"""The entry format of the platform's Redis streams, shared by producers and consumers.

Every entry has one field, ``"e"``, holding a JSON document:

- ``{ns}:stream:events``: a :class:`core.schema.UserEvent` as camelCase JSON
  (``event.model_dump_json(by_alias=True)``), e.g.
  ``XADD rayrec:stream:events * e '{"eventId":"…","userId":"u1","itemId":"i9","eventType":"like",
  "timestamp":"2025-01-01T12:00:00Z","context":{…},"watchTimeS":null}'``;
- ``{ns}:stream:impressions``: a :class:`core.schema.RecommendationLogEntry` the same way.

Consumer groups: ``features`` (the stream processor) on the events stream; ``lake`` (the lake
writer) on both streams. Entry ids are Redis' own (``<ms>-<seq>``); consumers never rely on them
for identity, only on ``eventId`` (events) or ``requestId`` + position (impressions).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from pydantic import ValidationError
from redis.typing import EncodableT, FieldT

from core.schema import RecommendationLogEntry, UserEvent
from features.records import EventRecord

ENTRY_FIELD: Final = "e"
"""The one field of every stream entry."""

FEATURES_GROUP: Final = "features"
"""Consumer group of the stream processor on the events stream."""

LAKE_GROUP: Final = "lake"
"""Consumer group of the lake writer on the events and impressions streams."""


class EntryDecodeError(ValueError):
    """A stream entry does not hold what its stream promises; the message says why."""


def entry_ms(entry_id: str) -> int:
    """The millisecond timestamp part of a stream entry id (``"<ms>-<seq>"``)."""
    return int(entry_id.split("-", 1)[0])


def entry_key(entry_id: str) -> tuple[int, int]:
    """A stream entry id as a sortable ``(ms, seq)`` pair."""
    ms, _, seq = entry_id.partition("-")
    return (int(ms), int(seq or 0))


def event_payload(event: UserEvent) -> str:
    """One event as the events stream holds it: compact JSON (no raw newline, see the intake)."""
    return event.model_dump_json(by_alias=True)


def encode_event(event: UserEvent) -> dict[FieldT, EncodableT]:
    """The fields to ``XADD`` to the events stream for one event."""
    return {ENTRY_FIELD: event_payload(event)}


def encode_log_entry(entry: RecommendationLogEntry) -> dict[FieldT, EncodableT]:
    """The fields to ``XADD`` to the impressions stream for one served list."""
    return {ENTRY_FIELD: entry.model_dump_json(by_alias=True)}


def _payload(fields: Mapping[str, str] | None) -> str:
    if fields is None:
        raise EntryDecodeError("entry was deleted from the stream before it was processed")
    payload = fields.get(ENTRY_FIELD)
    if payload is None:
        raise EntryDecodeError(f"entry has no {ENTRY_FIELD!r} field (fields: {sorted(fields)})")
    return payload


def decode_event(fields: Mapping[str, str] | None) -> UserEvent:
    """The event of an events-stream entry.

    Args:
        fields: The entry's fields as read (``None`` when the entry is gone).

    Returns:
        The validated event.

    Raises:
        EntryDecodeError: The entry is missing, has no ``"e"`` field, or does not validate.
    """
    try:
        return UserEvent.model_validate_json(_payload(fields))
    except ValidationError as exc:
        raise EntryDecodeError(
            f"not a valid event: {exc.error_count()} errors; {exc.errors()[0]['msg']}"
        ) from exc


def decode_event_record(fields: Mapping[str, str] | None) -> EventRecord:
    """The fold and lake record of an events-stream entry.

    Entries the intake wrote take the direct path (:meth:`EventRecord.from_event_json`); any
    other payload is validated with the API's rules, which accept or reject it. The stream
    processors and the lake writer decode alike, so they agree on every entry.

    Args:
        fields: The entry's fields as read (``None`` when the entry is gone).

    Returns:
        The record.

    Raises:
        EntryDecodeError: The entry is missing, has no ``"e"`` field, or does not validate.
    """
    payload = None if fields is None else fields.get(ENTRY_FIELD)
    if payload is not None:
        record = EventRecord.from_event_json(payload)
        if record is not None:
            return record
    return EventRecord.from_event(decode_event(fields))


def decode_log_entry(fields: Mapping[str, str] | None) -> RecommendationLogEntry:
    """The served list of an impressions-stream entry.

    Args:
        fields: The entry's fields as read.

    Returns:
        The validated log entry.

    Raises:
        EntryDecodeError: The entry is missing, has no ``"e"`` field, or does not validate.
    """
    try:
        return RecommendationLogEntry.model_validate_json(_payload(fields))
    except ValidationError as exc:
        raise EntryDecodeError(f"not a valid log entry: {exc.error_count()} errors") from exc


def impression_rows(entry: RecommendationLogEntry) -> list[dict[str, Any]]:
    """The lake ``impressions`` rows of a served list: one per item, every column present."""
    return [
        {
            "request_id": entry.request_id,
            "user_id": entry.user_id,
            "surface": entry.surface,
            "item_id": item.item_id,
            "position": item.position,
            "score": item.score,
            "sources": list(item.sources),
            "propensity": item.propensity,
            "model_version": entry.model_version,
            "experiment_id": entry.experiment_id,
            "arm": entry.arm,
            "fallback": entry.fallback,
            "served_at": entry.served_at,
        }
        for item in entry.items
    ]
