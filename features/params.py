"""The tunable constants of the feature definitions, as one strict, documented config value.

Online and offline computations must use the same values or their features drift apart, so the
stream processor and the offline jobs both take a :class:`FeatureParams` (the defaults unless a
deployment overrides them) and pass it to every fold.
"""

from __future__ import annotations

from typing import Annotated, Final

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.schema import EventType

DAY_S: Final = 86_400.0
HOUR_S: Final = 3_600.0

_AFFINITY_WEIGHTS: Final[dict[EventType, float]] = {
    EventType.VIEW: 0.25,
    EventType.CLICK: 1.0,
    EventType.LIKE: 3.0,
    EventType.SHARE: 3.0,
    EventType.PURCHASE: 5.0,
    EventType.WATCH: 0.0,  # scaled by watch time instead, see FeatureParams.watch_weight
    EventType.SKIP: -0.5,
    EventType.HIDE: -3.0,
    EventType.NOT_INTERESTED: -4.0,
    EventType.REPORT: -6.0,
}

_TRENDING_WEIGHTS: Final[dict[EventType, float]] = {
    EventType.VIEW: 1.0,
    EventType.CLICK: 2.0,
    EventType.LIKE: 3.0,
    EventType.SHARE: 5.0,
    EventType.PURCHASE: 5.0,
    EventType.WATCH: 0.0,  # scaled by watch time instead
    EventType.SKIP: 0.0,
    EventType.HIDE: 0.0,
    EventType.NOT_INTERESTED: 0.0,
    EventType.REPORT: 0.0,
}

Positive = Annotated[float, Field(gt=0)]
Rate = Annotated[float, Field(gt=0, lt=1)]


class FeatureParams(BaseModel):
    """Constants of the feature folds; shared by the online and offline computations."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    affinity_half_life_s: Positive = 7 * DAY_S
    """Half-life of the exponential time decay of ``user_activity`` category affinities."""

    affinity_weights: dict[EventType, float] = Field(default_factory=lambda: dict(_AFFINITY_WEIGHTS))
    """Weight each event type adds to its item's category affinity; negative feedback subtracts."""

    trending_weights: dict[EventType, float] = Field(default_factory=lambda: dict(_TRENDING_WEIGHTS))
    """Weight each event type adds to the item's trending score (never negative)."""

    watch_weight_per_min: Annotated[float, Field(ge=0)] = 0.5
    """Weight of a ``watch`` event per minute watched, for affinity and trending."""

    watch_weight_max: Annotated[float, Field(ge=0)] = 5.0
    """Cap of one ``watch`` event's weight, so one long session cannot swamp the rest."""

    session_gap_s: Positive = 30 * 60.0
    """Inactivity that ends a session: the next event starts a new one."""

    recent_items_max: Annotated[int, Field(ge=1, le=1000)] = 50
    """How many recent events ``user_activity:recent_*`` keep (newest first)."""

    session_items_max: Annotated[int, Field(ge=1, le=1000)] = 50
    """How many distinct items ``user_activity:session_item_ids`` keep (newest first)."""

    top_categories_max: Annotated[int, Field(ge=1, le=1000)] = 20
    """How many categories ``user_activity:top_categories`` serve."""

    affinity_floor: Annotated[float, Field(ge=0)] = 1e-4
    """Affinities whose magnitude decays below this are dropped, so state stays bounded."""

    trending_half_life_s: Positive = 6 * HOUR_S
    """Half-life of the trending score (item feature and trending sorted sets)."""

    trending_epoch_s: Positive = 7 * DAY_S
    """Length of a trending landmark epoch; see :mod:`features.trending` for why epochs exist."""

    ctr_prior_mean: Rate = 0.05
    """Prior click-through rate that smooths ``item_engagement:ctr_7d`` of items with few views."""

    ctr_prior_strength: Positive = 20.0
    """Pseudo-views the CTR prior is worth (``a + b`` of the Beta prior)."""

    like_prior_mean: Rate = 0.02
    """Prior like rate that smooths ``item_engagement:like_rate_7d``."""

    like_prior_strength: Positive = 20.0
    """Pseudo-views the like-rate prior is worth."""

    quality_prior_mean: Rate = 0.1
    """Prior positive-engagement rate of a creator's items (``creator_quality``)."""

    quality_prior_strength: Positive = 50.0
    """Pseudo-events the creator-quality prior is worth."""

    hide_penalty: Annotated[float, Field(ge=0)] = 1.0
    """How much one hide or not-interested costs creator quality, relative to one positive event."""

    report_penalty: Annotated[float, Field(ge=0)] = 5.0
    """How much one report costs creator quality, relative to one positive event."""

    @model_validator(mode="after")
    def _check(self) -> FeatureParams:
        for name in ("affinity_weights", "trending_weights"):
            missing = set(EventType) - set(getattr(self, name))
            if missing:
                raise ValueError(f"{name} lacks event types {sorted(missing)}")
        if any(w < 0 for w in self.trending_weights.values()):
            raise ValueError("trending_weights must not be negative")
        # The forward-decay factor reaches 2 ** (2 * epoch / half-life) within a key's life; far
        # below the float range as long as an epoch spans at most a few hundred half-lives.
        if self.trending_epoch_s / self.trending_half_life_s > 200:
            raise ValueError("trending_epoch_s must be at most 200 trending half-lives")
        return self

    def watch_weight(self, watch_time_s: float | None) -> float:
        """The weight of a ``watch`` event: proportional to minutes watched, capped.

        Args:
            watch_time_s: Seconds watched; ``None`` counts as zero.

        Returns:
            ``min(watch_weight_max, watch_weight_per_min * minutes)``.
        """
        minutes = (watch_time_s or 0.0) / 60.0
        return min(self.watch_weight_max, self.watch_weight_per_min * minutes)

    def affinity_weight(self, event_type: EventType, watch_time_s: float | None) -> float:
        """What one event adds to its category's affinity (negative for negative feedback)."""
        base = self.affinity_weights[event_type]
        return base + self.watch_weight(watch_time_s) if event_type is EventType.WATCH else base

    def trending_weight(self, event_type: EventType, watch_time_s: float | None) -> float:
        """What one event adds to its item's trending score."""
        base = self.trending_weights[event_type]
        return base + self.watch_weight(watch_time_s) if event_type is EventType.WATCH else base


DEFAULT_PARAMS: Final = FeatureParams()
"""The parameters every computation uses unless a deployment overrides them."""
