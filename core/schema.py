"""The data model of seed section 4, as strict pydantic models.

These are the shapes that cross a boundary: HTTP bodies, the event stream, the lake and the
catalog in Redis. Every model refuses bad values with an error whose ``loc`` names the field, so
the HTTP layer can answer 422 with that name. JSON uses camelCase (``userId``), Python uses
snake_case (``user_id``); both are accepted on input.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

MAX_ID_LEN = 128
MAX_CONTEXT_BYTES = 2048
MAX_METADATA_BYTES = 8192
MAX_TAGS = 32
MAX_INTERESTS = 64
MAX_FUTURE_SKEW = timedelta(minutes=5)
"""How far ahead of the server clock an event may be stamped (client clocks drift)."""
MIN_EVENT_TIME = datetime(1970, 1, 1, tzinfo=UTC)
"""Earliest event timestamp: features key time by epochs counted from the Unix epoch."""

Id = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_ID_LEN, pattern=r"^[A-Za-z0-9_\-:.@/+=]+$"),
]
"""An entity id: 1-128 printable characters without spaces or quotes."""

Label = Annotated[str, StringConstraints(min_length=1, max_length=64, strip_whitespace=True)]
"""A short categorical value: category, tag, region, surface name."""


def _json_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), default=str).encode())


def _bounded_json(limit: int) -> AfterValidator:
    def check(value: dict[str, Any]) -> dict[str, Any]:
        if not value:
            return value  # "{}": nothing to measure, and most events carry no extra keys
        size = _json_size(value)
        if size > limit:
            raise ValueError(f"is {size} bytes as JSON, more than the limit of {limit}")
        return value

    return AfterValidator(check)


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


def _aware(value: datetime) -> datetime:
    # Naive timestamps are taken as UTC: clients that omit the offset almost always mean it.
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        # 0001-01-01T00:00+01:00 or 9999-12-31T23:59-01:00: valid text, but no UTC instant exists.
        raise ValueError("is outside the years 1-9999 once converted to UTC") from None


def _event_time(value: datetime) -> datetime:
    value = _aware(value)
    if value > utcnow() + MAX_FUTURE_SKEW:
        raise ValueError(f"is in the future (more than {int(MAX_FUTURE_SKEW.total_seconds())} s ahead)")
    if value < MIN_EVENT_TIME:
        # Such an event would reach the stream processor with a negative trending epoch, fail
        # its whole batch, and be retried forever.
        raise ValueError("is before 1970-01-01T00:00:00Z")
    return value


PastTimestamp = Annotated[datetime, AfterValidator(_event_time)]
Timestamp = Annotated[datetime, AfterValidator(_aware)]


class Model(BaseModel):
    """Base for every boundary model: strict about unknown fields, camelCase in JSON."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        str_strip_whitespace=True,
        validate_default=True,
    )


class EventType(StrEnum):
    """Every behaviour signal the platform accepts."""

    CLICK = "click"
    VIEW = "view"
    LIKE = "like"
    SHARE = "share"
    PURCHASE = "purchase"
    HIDE = "hide"
    SKIP = "skip"
    REPORT = "report"
    NOT_INTERESTED = "not_interested"
    WATCH = "watch"


NEGATIVE_FEEDBACK: frozenset[EventType] = frozenset(
    {EventType.HIDE, EventType.NOT_INTERESTED, EventType.REPORT}
)
"""Feedback that must hold on the very next request (seed section 18): written synchronously."""


class FeedbackType(StrEnum):
    """Values of ``feedback`` on ``POST /api/recommendations/feedback``."""

    NOT_INTERESTED = "not_interested"
    HIDE = "hide"
    REPORT = "report"
    LIKE = "like"
    SKIP = "skip"


class Device(StrEnum):
    """Device classes; anything else is ``other``."""

    MOBILE = "mobile"
    DESKTOP = "desktop"
    TABLET = "tablet"
    TV = "tv"
    OTHER = "other"


class ItemType(StrEnum):
    """Kinds of items the catalog holds."""

    VIDEO = "video"
    PRODUCT = "product"
    ARTICLE = "article"
    MOVIE = "movie"
    MUSIC = "music"
    POST = "post"


class ItemStatus(StrEnum):
    """Whether an item may be served."""

    ACTIVE = "active"
    REMOVED = "removed"


class AgeGroup(StrEnum):
    """Coarse age bands; exact ages are never stored."""

    UNDER_18 = "under_18"
    AGE_18_24 = "18_24"
    AGE_25_34 = "25_34"
    AGE_35_44 = "35_44"
    AGE_45_54 = "45_54"
    AGE_55_PLUS = "55_plus"
    UNKNOWN = "unknown"


class EventContext(Model):
    """Where an event happened. ``extra`` carries client-specific keys, bounded in size."""

    surface: Label | None = None
    device: Device | None = None
    region: Label | None = None
    request_id: Id | None = None
    """The ``requestId`` of the recommendation response the item came from, when it did."""
    position: Annotated[int, Field(ge=0, le=10_000)] | None = None
    extra: Annotated[dict[str, Any], _bounded_json(MAX_CONTEXT_BYTES)] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _bounded(self) -> EventContext:
        # Without ``extra`` the fields' own bounds keep a context under the limit (1,753 bytes at
        # most, every label 64 astral characters escaped to 12 bytes each; a unit test checks
        # it), so only a context with extra keys is measured: dumping and sizing every event's
        # context was a fifth of the batch route's CPU.
        if not self.extra:
            return self
        size = _json_size(self.model_dump(mode="json", exclude_none=True))
        if size > MAX_CONTEXT_BYTES:
            raise ValueError(f"context is {size} bytes as JSON, more than the limit of {MAX_CONTEXT_BYTES}")
        return self


class UserEvent(Model):
    """One behaviour event (seed ``user_event``). ``event_id`` makes every consumer idempotent."""

    event_id: Id = Field(default_factory=lambda: uuid.uuid4().hex)
    user_id: Id
    item_id: Id
    event_type: EventType
    timestamp: PastTimestamp = Field(default_factory=utcnow)
    context: EventContext = Field(default_factory=EventContext)
    watch_time_s: Annotated[float, Field(ge=0, le=86_400)] | None = None
    """Seconds watched; required for ``watch`` events, refused on others."""

    @model_validator(mode="after")
    def _watch_time(self) -> UserEvent:
        if self.event_type is EventType.WATCH and self.watch_time_s is None:
            raise ValueError("watchTimeS is required when eventType is 'watch'")
        if self.event_type is not EventType.WATCH and self.watch_time_s is not None:
            raise ValueError("watchTimeS is only allowed when eventType is 'watch'")
        return self


class FeedbackRequest(Model):
    """Body of ``POST /api/recommendations/feedback`` (seed section 3)."""

    user_id: Id
    item_id: Id
    feedback: FeedbackType
    request_id: Id | None = None
    timestamp: PastTimestamp = Field(default_factory=utcnow)

    def to_event(self) -> UserEvent:
        """The event this feedback is recorded as."""
        return UserEvent(
            user_id=self.user_id,
            item_id=self.item_id,
            event_type=EventType(self.feedback.value),
            timestamp=self.timestamp,
            context=EventContext(request_id=self.request_id),
        )


class UserProfile(Model):
    """A user (seed ``user_profile``), with onboarding interests and the privacy switch."""

    user_id: Id
    age_group: AgeGroup = AgeGroup.UNKNOWN
    region: Label | None = None
    language: Annotated[str, StringConstraints(pattern=r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})?$")] | None = None
    interests: Annotated[list[Label], Field(max_length=MAX_INTERESTS)] = Field(default_factory=list)
    personalization: bool = True
    """False: serve only non-personalised lists and keep no behaviour features for this user."""
    created_at: Timestamp = Field(default_factory=utcnow)
    updated_at: Timestamp = Field(default_factory=utcnow)


class Item(Model):
    """A catalog item (seed ``item``)."""

    item_id: Id
    item_type: ItemType
    title: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    category: Label
    tags: Annotated[list[Label], Field(max_length=MAX_TAGS)] = Field(default_factory=list)
    creator_id: Id
    status: ItemStatus = ItemStatus.ACTIVE
    created_at: Timestamp = Field(default_factory=utcnow)
    metadata: Annotated[dict[str, Any], _bounded_json(MAX_METADATA_BYTES)] = Field(default_factory=dict)

    @field_validator("tags")
    @classmethod
    def _dedupe_tags(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


class SocialEdge(Model):
    """``follower_id`` follows ``followee_id``; ``active=False`` records an unfollow."""

    follower_id: Id
    followee_id: Id
    active: bool = True
    created_at: Timestamp = Field(default_factory=utcnow)

    @model_validator(mode="after")
    def _no_self_loop(self) -> SocialEdge:
        if self.follower_id == self.followee_id:
            raise ValueError("followeeId must differ from followerId")
        return self


class EntityType(StrEnum):
    """Entities that carry features."""

    USER = "user"
    ITEM = "item"
    CREATOR = "creator"


class FeatureRow(Model):
    """One feature value (seed ``feature_store``); ``feature_name`` is a ``view:feature`` reference."""

    entity_id: Id
    entity_type: EntityType
    feature_name: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*:[a-z][a-z0-9_]*$")]
    feature_value: Any
    updated_at: Timestamp = Field(default_factory=utcnow)


class ServedItem(Model):
    """One item of a served list, as logged."""

    item_id: Id
    position: Annotated[int, Field(ge=0)]
    score: float
    sources: list[Label] = Field(default_factory=list)
    propensity: Annotated[float, Field(ge=0, le=1)] = 1.0
    """Probability the serving policy had of putting this item at this position."""


class ExperimentArm(Model):
    """One experiment a served list was assigned in, and the arm."""

    experiment_id: Label
    arm: Label


class RecommendationLogEntry(Model):
    """A served list (seed ``recommendation_log``): the join key between impressions and events."""

    request_id: Id
    user_id: Id
    surface: Label
    items: Annotated[list[ServedItem], Field(max_length=1000)]
    model_version: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    experiment_id: Label | None = None
    """The first experiment the list was assigned in (one per layer; see ``experiments``)."""
    arm: Label | None = None
    experiments: Annotated[list[ExperimentArm], Field(max_length=64)] = Field(default_factory=list)
    """Every experiment the list was assigned in, one per layer, in layer order."""
    fallback: Label | None = None
    served_at: Timestamp = Field(default_factory=utcnow)
