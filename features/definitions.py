"""Every feature the platform serves, declared once as values.

Three views, one per entity type, each a :class:`features.spec.FeatureView` whose pure functions
live in the module named after it:

- ``user_activity`` (:mod:`features.user_activity`): recent events, the current session, decayed
  category affinities, last viewed category, counts by event type;
- ``item_engagement`` (:mod:`features.item_engagement`): windowed counts, smoothed CTR and like
  rate, a decayed trending score;
- ``creator_quality`` (:mod:`features.creator_quality`): smoothed positive rate minus penalties
  for hides and reports.

The trending sorted sets (global, per region, per category) are defined in
:mod:`features.trending`. The online store folds stream batches with these definitions and the
offline pipeline folds lake rows with the same ones, which is what keeps training and serving
features equal.

Served values reach the request path as one packed record per entity (positional, see
:mod:`features.serving_record`; read as a ``view:feature`` reference to value mapping plus
``updated_at``); :func:`serving_features` turns such a mapping into a
:class:`core.types.FeatureMap`, dropping values whose ``ttl_s`` has run out.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

from core.schema import EntityType, EventType
from core.types import FeatureMap, FeatureValue
from features import creator_quality, item_engagement, user_activity
from features.params import DAY_S, DEFAULT_PARAMS, HOUR_S
from features.serving_record import UPDATED_AT as UPDATED_AT  # re-exported for record readers
from features.serving_record import RecordLayout, layout_of
from features.spec import Dtype, FeatureSpec, FeatureView

_USER = EntityType.USER
_ITEM = EntityType.ITEM
_CREATOR = EntityType.CREATOR


def _user(
    name: str, dtype: Dtype, default: FeatureValue, ttl_s: float | None, description: str
) -> FeatureSpec:
    return FeatureSpec(name, _USER, "user_activity", dtype, default, ttl_s, description)


def _item(
    name: str, dtype: Dtype, default: FeatureValue, ttl_s: float | None, description: str
) -> FeatureSpec:
    return FeatureSpec(name, _ITEM, "item_engagement", dtype, default, ttl_s, description)


def _creator(
    name: str, dtype: Dtype, default: FeatureValue, ttl_s: float | None, description: str
) -> FeatureSpec:
    return FeatureSpec(name, _CREATOR, "creator_quality", dtype, default, ttl_s, description)


_SESSION_TTL_S: Final = 30 * 60.0
"""Session features go stale with the session: a record not updated for this long serves none."""

USER_ACTIVITY: Final = FeatureView(
    name="user_activity",
    entity=_USER,
    specs=(
        _user("recent_item_ids", Dtype.STRINGS, (), None, "Items of the last 50 events, newest first."),
        _user("recent_event_types", Dtype.STRINGS, (), None, "Event type of each recent_item_ids entry."),
        _user("recent_event_ts", Dtype.FLOATS, (), None, "Epoch seconds of each recent_item_ids entry."),
        _user(
            "session_item_ids",
            Dtype.STRINGS,
            (),
            _SESSION_TTL_S,
            "Distinct items of the current session (no gap over 30 min), newest first; "
            "negative feedback and skips excluded.",
        ),
        _user("session_event_count", Dtype.INT, 0, _SESSION_TTL_S, "Events in the current session."),
        _user(
            "session_duration_s",
            Dtype.FLOAT,
            0.0,
            _SESSION_TTL_S,
            "Seconds from the session's first to last event.",
        ),
        _user(
            "top_categories",
            Dtype.STRINGS,
            (),
            None,
            "Categories with positive affinity, strongest first (at most 20). Affinity: event "
            "weights by type, decayed with a 7-day half-life; negative feedback subtracts.",
        ),
        _user("top_category_affinities", Dtype.FLOATS, (), None, "Affinity of each top_categories entry."),
        _user("last_viewed_category", Dtype.STR, "", None, "Category of the latest item looked at."),
        _user("last_event_ts", Dtype.FLOAT, 0.0, None, "Epoch seconds of the latest event."),
        _user("event_count", Dtype.INT, 0, None, "Events of every type, all time."),
        *(_user(f"{t.value}_count", Dtype.INT, 0, None, f"'{t.value}' events, all time.") for t in EventType),
    ),
    update=user_activity.update,
    serve=user_activity.serve,
    entity_key=user_activity.entity_key,
    state_ttl_s=int(180 * DAY_S),
    description="What a user did recently and which categories they lean to.",
)

_WINDOW_TTL_S: Final[dict[str, float]] = {"1h": HOUR_S, "24h": DAY_S, "7d": 7 * DAY_S}
"""A windowed count not refreshed for a whole window is stale: the events it counted left it."""

ITEM_ENGAGEMENT: Final = FeatureView(
    name="item_engagement",
    entity=_ITEM,
    specs=(
        *(
            _item(
                f"{t.value}_count_{suffix}",
                Dtype.INT,
                0,
                _WINDOW_TTL_S[suffix],
                f"'{t.value}' events in the last {suffix}, to within one bucket (5 min for 1h, else 1 h).",
            )
            for suffix in item_engagement.WINDOWS
            for t in EventType
        ),
        _item(
            "ctr_7d",
            Dtype.FLOAT,
            DEFAULT_PARAMS.ctr_prior_mean,
            7 * DAY_S,
            "Clicks per view over 7 days, Beta-smoothed: (clicks + m*k) / (views + k).",
        ),
        _item(
            "like_rate_7d",
            Dtype.FLOAT,
            DEFAULT_PARAMS.like_prior_mean,
            7 * DAY_S,
            "Likes per view over 7 days, Beta-smoothed.",
        ),
        _item(
            "trending_score",
            Dtype.FLOAT,
            0.0,
            None,
            "Event weights decayed with a 6-hour half-life, as of updated_at.",
        ),
        _item("event_count_total", Dtype.INT, 0, None, "Events of every type, all time."),
        _item("last_event_ts", Dtype.FLOAT, 0.0, None, "Epoch seconds of the latest event."),
    ),
    update=item_engagement.update,
    serve=item_engagement.serve,
    entity_key=item_engagement.entity_key,
    state_ttl_s=int(90 * DAY_S),
    description="How much and how well an item engages, over sliding windows.",
)

CREATOR_QUALITY: Final = FeatureView(
    name="creator_quality",
    entity=_CREATOR,
    specs=(
        _creator(
            "quality_score",
            Dtype.FLOAT,
            DEFAULT_PARAMS.quality_prior_mean,
            None,
            "Smoothed positive-engagement rate minus hide and report penalties (can be negative).",
        ),
        _creator(
            "positive_rate",
            Dtype.FLOAT,
            DEFAULT_PARAMS.quality_prior_mean,
            None,
            "Smoothed share of positive events on the items.",
        ),
        _creator(
            "hide_rate", Dtype.FLOAT, 0.0, None, "Share of hides and not-interested (smoothed denominator)."
        ),
        _creator("report_rate", Dtype.FLOAT, 0.0, None, "Share of reports (smoothed denominator)."),
        _creator("event_count", Dtype.INT, 0, None, "Events on the creator's items, all time."),
        _creator("report_count", Dtype.INT, 0, None, "Reports on the creator's items, all time."),
        _creator("last_event_ts", Dtype.FLOAT, 0.0, None, "Epoch seconds of the latest event."),
    ),
    update=creator_quality.update,
    serve=creator_quality.serve,
    entity_key=creator_quality.entity_key,
    state_ttl_s=int(365 * DAY_S),
    description="How a creator's items are received, good and bad.",
)

VIEWS: Final[tuple[FeatureView, ...]] = (USER_ACTIVITY, ITEM_ENGAGEMENT, CREATOR_QUALITY)
"""Every view, in the order the online store applies them."""

SPECS: Final[dict[str, FeatureSpec]] = {spec.ref: spec for view in VIEWS for spec in view.specs}
"""Every served feature by ``view:feature`` reference."""


def views_of(entity_type: EntityType) -> tuple[FeatureView, ...]:
    """The views whose states belong to one entity type."""
    return tuple(view for view in VIEWS if view.entity is entity_type)


_RECORD_LAYOUTS: Final[dict[EntityType, RecordLayout]] = {
    entity: layout_of(views_of(entity)) for entity in EntityType
}


def record_layout(entity_type: EntityType) -> RecordLayout:
    """The layout of the serving records the online store writes for one entity type."""
    return _RECORD_LAYOUTS[entity_type]


def view(name: str) -> FeatureView:
    """The view of a name.

    Raises:
        KeyError: No view has that name.
    """
    for candidate in VIEWS:
        if candidate.name == name:
            return candidate
    raise KeyError(f"unknown feature view {name!r}; known: {[v.name for v in VIEWS]}")


def defaults(entity_type: EntityType) -> dict[str, FeatureValue]:
    """Reference to default value of every feature of an entity type."""
    return {spec.ref: spec.default for v in views_of(entity_type) for spec in v.specs}


def serving_features(record: Mapping[str, Any] | None, now: datetime) -> FeatureMap:
    """The features of a packed serving record that are still valid at ``now``.

    Args:
        record: A record as written by the online store, or ``None`` (no record: no features).
        now: The request's instant, timezone-aware.

    Returns:
        The known, unexpired features; readers fall back to :attr:`FeatureSpec.default` for the rest.
    """
    if not record:
        return FeatureMap()
    stamp = record.get(UPDATED_AT)
    age_s = now.timestamp() - datetime.fromisoformat(stamp).timestamp() if isinstance(stamp, str) else 0.0
    kept: dict[str, Any] = {}
    for ref, value in record.items():
        spec = SPECS.get(ref)
        if spec is None:
            continue  # written by another version of the definitions
        if spec.ttl_s is not None and age_s > spec.ttl_s:
            continue
        kept[ref] = value
    return FeatureMap(kept)
