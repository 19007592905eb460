"""The inputs every feature fold reads: one behaviour event and one catalog item, as plain records.

Feature definitions (see :mod:`features.definitions`) fold :class:`EventRecord` values and look
categories and creators up in :class:`ItemInfo` values. Both records can be built from what the
online path holds (a validated :class:`core.schema.UserEvent`, a catalog record read from Redis)
and from what the offline path holds (a row of the lake's ``events`` or ``items`` table), so the
same fold code runs in the stream processor and in Ray Data jobs.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TypeGuard

import numpy as np
import orjson

from core.schema import MAX_FUTURE_SKEW, MAX_ID_LEN, MIN_EVENT_TIME, Device, EventType, Item, UserEvent

# What an event written by the intake looks like (``UserEvent.model_dump_json(by_alias=True)``):
# the checks of EventRecord.from_event_json. The id pattern is core.schema.Id's.
_ID_RE: Final = re.compile(rf"[A-Za-z0-9_\-:.@/+=]{{1,{MAX_ID_LEN}}}")
_LABEL_RE: Final = re.compile(r"\S(?:.{0,62}\S)?", re.DOTALL)
_EVENT_FIELDS: Final = frozenset(
    {"eventId", "userId", "itemId", "eventType", "timestamp", "context", "watchTimeS"}
)
_CONTEXT_FIELDS: Final = frozenset({"surface", "device", "region", "requestId", "position", "extra"})
_EVENT_TYPES: Final = {t.value: t for t in EventType}
_DEVICES: Final = frozenset(d.value for d in Device)
_MAX_FUTURE_SKEW_S: Final = MAX_FUTURE_SKEW.total_seconds()
_MIN_EVENT_S: Final = MIN_EVENT_TIME.timestamp()


_KNOWN_LIMIT: Final = 100_000
# Ids and labels already found valid. Users, items, surfaces and regions recur in entry after
# entry, and a set lookup costs a tenth of the pattern match. Emptied when full, so it stays bounded.
_known_ids: set[str] = set()
_known_labels: set[str] = set()


def _matches(value: object, pattern: re.Pattern[str], known: set[str]) -> bool:
    """Whether ``value`` is a string ``pattern`` matches in full; those that are go into ``known``."""
    if type(value) is not str:
        return False
    if value in known:
        return True
    if pattern.fullmatch(value) is None:
        return False
    if len(known) >= _KNOWN_LIMIT:
        known.clear()
    known.add(value)
    return True


def _is_id(value: object) -> TypeGuard[str]:
    return _matches(value, _ID_RE, _known_ids)


def _is_unique_id(value: object) -> TypeGuard[str]:
    # Event and request ids (nearly) never recur: remembering them would push out the ids that do.
    return type(value) is str and _ID_RE.fullmatch(value) is not None


def _is_optional_label(value: object) -> bool:
    return value is None or _matches(value, _LABEL_RE, _known_labels)


def _is_number(value: object) -> TypeGuard[float]:
    return type(value) is float or type(value) is int


def _as_utc(value: object, field: str) -> datetime:
    """A timezone-aware UTC datetime from the ways a timestamp reaches us (datetime, numpy, ISO)."""
    if isinstance(value, datetime):  # pandas.Timestamp is a datetime subclass
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, np.datetime64):
        micros = int(value.astype("datetime64[us]").astype(np.int64))
        return datetime.fromtimestamp(micros / 1_000_000, tz=UTC)
    if isinstance(value, str):
        return _as_utc(datetime.fromisoformat(value), field)
    raise TypeError(f"{field} must be a datetime, numpy datetime64 or ISO string, not {type(value).__name__}")


def _optional_str(value: object) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)


def _optional_float(value: object) -> float | None:
    if value is None:
        return None
    number = float(value)  # type: ignore[arg-type]
    # Pandas and numpy carry nulls as NaN; a NaN watch time or rating means "absent".
    return None if math.isnan(number) else number


def _float32(value: float) -> float:
    """The value rounded to the nearest float32, as the lake's float32 columns store it."""
    return float(np.float32(value))


def _optional_int(value: object) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return int(value)  # type: ignore[call-overload, no-any-return]


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One behaviour event, with the fields of the lake's ``events`` table.

    Attributes:
        event_id: Unique id; every consumer is idempotent on it.
        user_id: Who acted.
        item_id: On what.
        event_type: The kind of signal.
        ts: When, timezone-aware UTC.
        surface: Surface the item was shown on, when known.
        device: Device class, when known.
        region: Region of the user at the time, when known.
        request_id: Recommendation response the item came from, when it did.
        position: Position of the item in that response.
        watch_time_s: Seconds watched (``watch`` events only), rounded to float32.
        rating: Explicit rating kept from imports (MovieLens), rounded to float32; ``None`` otherwise.
        context_json: The event context's client-specific ``extra`` keys as JSON, or ``None``.
        ts_s: ``ts`` as seconds since the Unix epoch: the time unit of every feature state.
        sort_key: The fold order: by time, ties broken by ``event_id`` so every run picks the
            same order.
        kind: ``event_type``'s value (``"click"``, ...), the key feature states count by.
    """

    event_id: str
    user_id: str
    item_id: str
    event_type: EventType
    ts: datetime
    surface: str | None = None
    device: str | None = None
    region: str | None = None
    request_id: str | None = None
    position: int | None = None
    watch_time_s: float | None = None
    rating: float | None = None
    context_json: str | None = None
    # Derived once here rather than on every use: each fold reads them several times per event,
    # and converting a datetime or reading an enum's value costs more than the fold's own work.
    ts_s: float = field(init=False, repr=False, compare=False)
    sort_key: tuple[float, str] = field(init=False, repr=False, compare=False)
    kind: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The lake keeps these columns as float32. Rounding every record the same way makes the
        # record of an API event equal to the one read back from the lake, so the online and the
        # offline folds weigh a watch identically, to the last bit.
        if self.watch_time_s is not None:
            object.__setattr__(self, "watch_time_s", _float32(self.watch_time_s))
        if self.rating is not None:
            object.__setattr__(self, "rating", _float32(self.rating))
        ts_s = self.ts.timestamp()
        object.__setattr__(self, "ts_s", ts_s)
        object.__setattr__(self, "sort_key", (ts_s, self.event_id))
        object.__setattr__(self, "kind", self.event_type.value)

    @classmethod
    def from_event(cls, event: UserEvent) -> EventRecord:
        """The record of a validated API event.

        Args:
            event: A :class:`core.schema.UserEvent`.

        Returns:
            The record; the context's ``extra`` keys are kept as sorted, compact JSON.
        """
        context = event.context
        extra = (
            json.dumps(context.extra, sort_keys=True, separators=(",", ":"), default=str)
            if context.extra
            else None
        )
        return cls(
            event_id=event.event_id,
            user_id=event.user_id,
            item_id=event.item_id,
            event_type=event.event_type,
            ts=event.timestamp.astimezone(UTC),
            surface=context.surface,
            device=None if context.device is None else context.device.value,
            region=context.region,
            request_id=context.request_id,
            position=context.position,
            watch_time_s=event.watch_time_s,
            context_json=extra,
        )

    @classmethod
    def from_event_json(cls, payload: str | bytes) -> EventRecord | None:
        """The record of an event as the intake wrote it to the stream, without pydantic.

        The events stream holds events the API validated, serialised by
        ``UserEvent.model_dump_json(by_alias=True)``. Validating each again costs more than folding
        it, so this reads that exact shape directly and checks what the folds depend on: the field
        names, ids, event type, the timestamp (timezone-aware, from 1970 to 5 minutes ahead),
        the watch time and the context's types. Anything else (another shape, a value it does not
        vouch for) answers ``None``, and the caller validates the payload with
        :func:`features.stream_codec.decode_event` instead, which accepts or rejects it with the
        API's own rules. For every payload both accept, both give the same record.

        Args:
            payload: The ``"e"`` field of an events-stream entry.

        Returns:
            The record, or ``None`` when the payload must go through full validation.
        """
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return None
        if type(doc) is not dict or not doc.keys() <= _EVENT_FIELDS:
            return None
        event_id, user_id, item_id = doc.get("eventId"), doc.get("userId"), doc.get("itemId")
        event_type = _EVENT_TYPES.get(doc.get("eventType"))  # type: ignore[arg-type]
        stamp, context, watch = doc.get("timestamp"), doc.get("context"), doc.get("watchTimeS")
        if not (
            event_type is not None
            and _is_unique_id(event_id)
            and _is_id(user_id)
            and _is_id(item_id)
            and type(stamp) is str
            and type(context) is dict
            and context.keys() <= _CONTEXT_FIELDS
        ):
            return None
        if event_type is EventType.WATCH:
            if not (_is_number(watch) and 0 <= watch <= 86_400):
                return None
        elif watch is not None:
            return None
        try:
            ts = datetime.fromisoformat(stamp)
        except ValueError:
            return None
        if ts.tzinfo is not UTC:
            if ts.tzinfo is None:
                return None
            ts = ts.astimezone(UTC)
        ts_s = ts.timestamp()
        # The API's bounds (core.schema), compared as POSIX seconds rather than datetimes.
        if ts_s < _MIN_EVENT_S or ts_s > time.time() + _MAX_FUTURE_SKEW_S:
            return None
        surface, device, region = context.get("surface"), context.get("device"), context.get("region")
        request_id, position = context.get("requestId"), context.get("position")
        extra = context.get("extra", {})
        if not (
            _is_optional_label(surface)
            and _is_optional_label(region)
            and (device is None or device in _DEVICES)
            and (request_id is None or _is_unique_id(request_id))
            and (position is None or (type(position) is int and 0 <= position <= 10_000))
            and type(extra) is dict
        ):
            return None
        return _assemble(
            event_id,
            user_id,
            item_id,
            event_type,
            ts,
            surface,
            device,
            region,
            request_id,
            position,
            None if watch is None else _float32(watch),
            None,
            json.dumps(extra, sort_keys=True, separators=(",", ":"), default=str) if extra else None,
            ts_s,
        )

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> EventRecord:
        """The record of a lake ``events`` row (a dict from pyarrow, pandas or Ray Data).

        Args:
            row: Column name to value; columns beyond the five required ones may be missing.

        Returns:
            The record.

        Raises:
            KeyError: A required column is missing.
            ValueError: ``event_type`` is not a known event type.
        """
        return cls(
            event_id=str(row["event_id"]),
            user_id=str(row["user_id"]),
            item_id=str(row["item_id"]),
            event_type=EventType(row["event_type"]),
            ts=_as_utc(row["ts"], "ts"),
            surface=_optional_str(row.get("surface")),
            device=_optional_str(row.get("device")),
            region=_optional_str(row.get("region")),
            request_id=_optional_str(row.get("request_id")),
            position=_optional_int(row.get("position")),
            watch_time_s=_optional_float(row.get("watch_time_s")),
            rating=_optional_float(row.get("rating")),
            context_json=_optional_str(row.get("context_json")),
        )

    def to_row(self) -> dict[str, Any]:
        """The lake ``events`` row of this record: every column of :data:`core.tables.EVENTS`, in order."""
        return {
            "event_id": self.event_id,
            "user_id": self.user_id,
            "item_id": self.item_id,
            "event_type": self.event_type.value,
            "ts": self.ts,
            "surface": self.surface,
            "device": self.device,
            "region": self.region,
            "request_id": self.request_id,
            "position": self.position,
            "watch_time_s": self.watch_time_s,
            "rating": self.rating,
            "context_json": self.context_json,
        }


# The slots' own setters, for _assemble. A frozen dataclass's __init__ sets each field through
# object.__setattr__ by keyword, which cost more than the rest of decoding a stream entry (2.7 of
# 7 µs), and every entry is decoded by each stream processor and the lake writer.
(
    _set_event_id,
    _set_user_id,
    _set_item_id,
    _set_event_type,
    _set_ts,
    _set_surface,
    _set_device,
    _set_region,
    _set_request_id,
    _set_position,
    _set_watch_time_s,
    _set_rating,
    _set_context_json,
    _set_ts_s,
    _set_sort_key,
    _set_kind,
) = (EventRecord.__dict__[name].__set__ for name in EventRecord.__slots__)


def _assemble(
    event_id: str,
    user_id: str,
    item_id: str,
    event_type: EventType,
    ts: datetime,
    surface: str | None,
    device: str | None,
    region: str | None,
    request_id: str | None,
    position: int | None,
    watch_time_s: float | None,
    rating: float | None,
    context_json: str | None,
    ts_s: float,
) -> EventRecord:
    """The record ``EventRecord(...)`` builds from these fields, built without its ``__init__``.

    The caller has done what ``__post_init__`` does: ``ts`` is UTC, ``ts_s`` is its timestamp,
    and ``watch_time_s`` and ``rating`` are rounded to float32.
    """
    record = object.__new__(EventRecord)
    _set_event_id(record, event_id)
    _set_user_id(record, user_id)
    _set_item_id(record, item_id)
    _set_event_type(record, event_type)
    _set_ts(record, ts)
    _set_surface(record, surface)
    _set_device(record, device)
    _set_region(record, region)
    _set_request_id(record, request_id)
    _set_position(record, position)
    _set_watch_time_s(record, watch_time_s)
    _set_rating(record, rating)
    _set_context_json(record, context_json)
    _set_ts_s(record, ts_s)
    _set_sort_key(record, (ts_s, event_id))
    _set_kind(record, event_type.value)
    return record


def _pick(record: Mapping[str, Any], snake: str, camel: str) -> Any:
    # Catalog records may have been packed by field name or by alias; both spell the same field.
    return record[snake] if snake in record else record.get(camel)


@dataclass(frozen=True, slots=True)
class ItemInfo:
    """What feature folds need to know about an item: its category, creator and age.

    Attributes:
        item_id: The item.
        category: Its catalog category.
        creator_id: Who made it.
        item_type: Kind of item (``video``, ``product``, ...), when known.
        created_at: When it entered the catalog, when known.
        region: Region the item belongs to (``metadata["region"]``), when it has one.
    """

    item_id: str
    category: str
    creator_id: str
    item_type: str | None = None
    created_at: datetime | None = None
    region: str | None = None

    @classmethod
    def from_item(cls, item: Item) -> ItemInfo:
        """The info of a validated catalog item."""
        region = item.metadata.get("region")
        return cls(
            item_id=item.item_id,
            category=item.category,
            creator_id=item.creator_id,
            item_type=item.item_type.value,
            created_at=item.created_at,
            region=region if isinstance(region, str) else None,
        )

    @classmethod
    def from_catalog(cls, record: Mapping[str, Any]) -> ItemInfo:
        """The info of a packed catalog record as stored in Redis (``{ns}:item:{id}``).

        Args:
            record: The decoded JSON object; snake_case or camelCase keys.

        Returns:
            The info.

        Raises:
            KeyError: ``item_id``, ``category`` or ``creator_id`` is missing.
        """
        created = _pick(record, "created_at", "createdAt")
        metadata = record.get("metadata")
        region = metadata.get("region") if isinstance(metadata, Mapping) else None
        item_id, category, creator_id = (
            _pick(record, "item_id", "itemId"),
            record.get("category"),
            _pick(record, "creator_id", "creatorId"),
        )
        if item_id is None or category is None or creator_id is None:
            raise KeyError(f"catalog record lacks item_id, category or creator_id: {sorted(record)}")
        return cls(
            item_id=str(item_id),
            category=str(category),
            creator_id=str(creator_id),
            item_type=_optional_str(_pick(record, "item_type", "itemType")),
            created_at=None if created is None else _as_utc(created, "created_at"),
            region=region if isinstance(region, str) else None,
        )

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ItemInfo:
        """The info of a lake ``items`` row (latest per ``item_id``).

        Args:
            row: Column name to value.

        Returns:
            The info; ``region`` comes from ``metadata_json`` when it holds one.
        """
        raw = row.get("metadata_json")
        metadata = json.loads(raw) if isinstance(raw, str) and raw else {}
        region = metadata.get("region") if isinstance(metadata, dict) else None
        created = row.get("created_at")
        return cls(
            item_id=str(row["item_id"]),
            category=str(row["category"]),
            creator_id=str(row["creator_id"]),
            item_type=_optional_str(row.get("item_type")),
            created_at=None if created is None else _as_utc(created, "created_at"),
            region=region if isinstance(region, str) else None,
        )
