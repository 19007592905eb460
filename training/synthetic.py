"""A synthetic world to train recommenders and rehearse A/B tests on, deterministic by seed.

The world has a hidden truth and the observable tables a real deployment would hold:

* **Truth** (:class:`WorldTruth`): every user has a latent taste vector (a mixture of a few
  category interests plus noise, shifted by region and age), a region, a language, an age group and
  a heavy-tailed activity level. Every category has a centroid; every item has a latent vector near
  its category centroid (pulled by its tags and its creator's style), a creator (with a quality and
  a main category), tags from its category's pool, a type correlated with its category, a
  heavy-tailed popularity prior and a creation time. :meth:`WorldTruth.affinity` is the true
  preference of a user for an item: the dot product of their vectors plus a bonus when the item
  comes from the user's region.
* **Tables** (:func:`generate_world`): ``users``, ``items``, ``edges`` (a follow graph biased
  towards users of similar taste) and ``events``, each matching its schema in
  :mod:`core.tables`. Events come from sessions: bursts of exposures on a surface (``home``,
  ``video``, ``product``, ``similar``) at least 30 minutes apart, denser in the local evening. Each
  exposure shows an item already created, drawn from a mix of popularity, freshness and affinity;
  the outcome (click, view, watch, like, share, purchase, or skip, hide, not_interested, report) is
  drawn from :func:`outcome_probabilities`, which a user simulator can call to answer the same way.

Everything is vectorised with numpy: no Python loop runs per event, per item or per user, so the
``benchmark`` preset (10k users, 100k items, 1M events) builds in seconds.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.schema import AgeGroup, Device, EventType, ItemType
from core.tables import EDGES, EVENTS, ITEMS, USERS

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
Bool = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.integer[Any]]

_DAY_S: Final = 86_400.0
_SESSION_GAP_S: Final = 30 * 60.0
"""Silence after which the next event starts a new session (the usual analytics convention)."""
_MIN_SESSION_ROOM_S: Final = 5 * 60.0
_TARGET_SESSION_ROOM_S: Final = 60 * 60.0
_EVENING_PEAK_H: Final = 20.0
_TRUTH_FORMAT: Final = 1
_BATCH_EVENTS: Final = 250_000
"""Events drawn per batch of sessions: bounds memory (about 450 MiB at peak) and fixes the draws."""

# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------

_V, _P, _A, _M, _MU, _PO = (
    ItemType.VIDEO,
    ItemType.PRODUCT,
    ItemType.ARTICLE,
    ItemType.MOVIE,
    ItemType.MUSIC,
    ItemType.POST,
)
CATEGORY_SPECS: Final[tuple[tuple[str, dict[ItemType, float]], ...]] = (
    ("comedy", {_V: 0.7, _PO: 0.2, _M: 0.1}),
    ("cooking", {_V: 0.5, _A: 0.3, _P: 0.2}),
    ("tech", {_A: 0.4, _V: 0.3, _P: 0.3}),
    ("gaming", {_V: 0.6, _P: 0.2, _PO: 0.2}),
    ("music", {_MU: 0.7, _V: 0.3}),
    ("fashion", {_P: 0.6, _PO: 0.2, _V: 0.2}),
    ("fitness", {_V: 0.5, _P: 0.3, _A: 0.2}),
    ("travel", {_A: 0.4, _V: 0.4, _PO: 0.2}),
    ("news", {_A: 0.8, _V: 0.2}),
    ("sports", {_V: 0.5, _A: 0.3, _P: 0.2}),
    ("movies", {_M: 0.7, _A: 0.2, _V: 0.1}),
    ("beauty", {_P: 0.6, _V: 0.4}),
    ("diy", {_V: 0.5, _A: 0.3, _P: 0.2}),
    ("pets", {_V: 0.6, _PO: 0.3, _P: 0.1}),
    ("finance", {_A: 0.7, _V: 0.3}),
    ("science", {_A: 0.6, _V: 0.4}),
    ("books", {_P: 0.5, _A: 0.5}),
    ("parenting", {_A: 0.5, _PO: 0.3, _P: 0.2}),
    ("cars", {_V: 0.5, _A: 0.3, _P: 0.2}),
    ("home", {_P: 0.6, _A: 0.2, _V: 0.2}),
    ("art", {_PO: 0.5, _V: 0.3, _P: 0.2}),
    ("health", {_A: 0.6, _V: 0.4}),
    ("education", {_V: 0.5, _A: 0.5}),
    ("photography", {_PO: 0.5, _P: 0.3, _A: 0.2}),
)
"""Named categories with the item types they mostly hold; larger worlds add ``topic-<n>``."""

TAG_WORDS: Final[tuple[str, ...]] = (
    "quick", "beginner", "advanced", "budget", "premium", "classic", "trending", "review",
    "howto", "guide", "weekly", "live", "short", "deep-dive", "top10", "behind-the-scenes",
    "challenge", "seasonal", "family", "solo", "outdoor", "indoor", "retro", "tips",
    "explained", "favorites", "highlights", "unboxing", "interview", "series", "minimal", "epic",
)  # fmt: skip
"""Tag suffixes; a category's pool is a seeded subset, so tags read ``cooking/quick``."""

ITEM_TYPES: Final[tuple[ItemType, ...]] = tuple(ItemType)
AGE_GROUPS: Final[tuple[AgeGroup, ...]] = tuple(AgeGroup)
DEVICES: Final[tuple[Device, ...]] = tuple(Device)
SURFACES: Final[tuple[str, ...]] = ("home", "video", "product", "similar")

_TITLE_NOUNS: Final[dict[ItemType, str]] = {
    ItemType.VIDEO: "video",
    ItemType.PRODUCT: "product",
    ItemType.ARTICLE: "article",
    ItemType.MOVIE: "film",
    ItemType.MUSIC: "track",
    ItemType.POST: "post",
}
_AGE_WEIGHTS: Final = (0.08, 0.22, 0.28, 0.18, 0.10, 0.07, 0.07)
_DEVICE_WEIGHTS: Final = (0.62, 0.24, 0.08, 0.04, 0.02)
_SURFACE_WEIGHTS: Final = (0.45, 0.25, 0.15, 0.15)
_HOME, _VIDEO_SURFACE, _PRODUCT_SURFACE, _SIMILAR = range(4)

# Item types fall in three groups so that the video and product surfaces only show what they can play
# or sell.
_GROUP_PLAYABLE, _GROUP_PRODUCT, _GROUP_OTHER = range(3)
_N_GROUPS: Final = 3
_TYPE_GROUP: Final = np.array(
    [
        _GROUP_PLAYABLE if t in (ItemType.VIDEO, ItemType.MOVIE, ItemType.MUSIC)
        else _GROUP_PRODUCT if t is ItemType.PRODUCT
        else _GROUP_OTHER
        for t in ITEM_TYPES
    ],
    dtype=np.int64,
)  # fmt: skip

# Outcome slots, in the order they happen within one exposure.
_SLOTS: Final[tuple[EventType, ...]] = (
    EventType.CLICK,
    EventType.VIEW,
    EventType.WATCH,
    EventType.LIKE,
    EventType.SHARE,
    EventType.PURCHASE,
    EventType.SKIP,
    EventType.HIDE,
    EventType.NOT_INTERESTED,
    EventType.REPORT,
)
(_S_CLICK, _S_VIEW, _S_WATCH, _S_LIKE, _S_SHARE, _S_PURCHASE, _S_SKIP, _S_HIDE, _S_NOT_INTERESTED,
 _S_REPORT) = range(len(_SLOTS))  # fmt: skip

# Independent random streams, so adding a draw to one part leaves the others unchanged.
_STREAM_TRUTH, _STREAM_EDGES, _STREAM_SESSIONS, _STREAM_EVENTS, _STREAM_PAGES = 1, 2, 3, 4, 5


def category_names(n: int) -> list[str]:
    """Human-readable names of the first ``n`` categories.

    Args:
        n: Number of categories.

    Returns:
        The names of :data:`CATEGORY_SPECS`, then ``topic-<k>`` beyond them.
    """
    named = [name for name, _ in CATEGORY_SPECS]
    return named[:n] + [f"topic-{k}" for k in range(len(named), n)]


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


class RegionSpec(BaseModel):
    """A region users and creators live in."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64)
    """Region label as it appears in ``users.region`` and ``events.region``."""
    language: str = Field(pattern=r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})?$")
    """Main language; most of the region's users and creators speak it."""
    utc_offset_h: float = Field(ge=-12, le=14)
    """Local time offset, which places the evening peak of activity."""
    weight: float = Field(gt=0)
    """Relative share of users and creators living here."""


DEFAULT_REGIONS: Final[tuple[RegionSpec, ...]] = (
    RegionSpec(name="us", language="en", utc_offset_h=-5, weight=0.30),
    RegionSpec(name="in", language="hi", utc_offset_h=5.5, weight=0.17),
    RegionSpec(name="gb", language="en", utc_offset_h=0, weight=0.10),
    RegionSpec(name="de", language="de", utc_offset_h=1, weight=0.10),
    RegionSpec(name="br", language="pt", utc_offset_h=-3, weight=0.10),
    RegionSpec(name="fr", language="fr", utc_offset_h=1, weight=0.08),
    RegionSpec(name="jp", language="ja", utc_offset_h=9, weight=0.08),
    RegionSpec(name="mx", language="es", utc_offset_h=-6, weight=0.07),
)


class ResponseModel(BaseModel):
    """How users respond to an exposed item: logistic coefficients of each outcome.

    ``affinity`` is :meth:`WorldTruth.affinity`, ``quality`` the creator's quality (standard
    normal), ``popularity`` the item's log popularity prior and ``position`` enters as
    ``log1p(position)``. Click is per exposure; view, like, share and purchase are given a click;
    skip, hide, not_interested and report are given no click and exclude one another.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    click_bias: float = -2.6
    """Log-odds of a click at zero affinity, average quality and popularity, top position."""
    click_affinity: float = 2.4
    """Log-odds gained per unit of affinity."""
    click_quality: float = 0.35
    """Log-odds gained per standard deviation of creator quality."""
    click_popularity: float = 0.1
    """Log-odds gained per unit of the item's log popularity prior."""
    click_position: float = -0.3
    """Log-odds per ``log1p(position)``: lower slots draw fewer clicks."""
    view_given_click: float = Field(default=0.9, ge=0, le=1)
    """Share of clicks that open the item (detail page, playback)."""
    like_bias: float = -2.9
    """Log-odds of a like given a click, at zero affinity."""
    like_affinity: float = 2.4
    """Log-odds of a like gained per unit of affinity."""
    like_quality: float = 0.5
    """Log-odds of a like gained per standard deviation of creator quality."""
    share_bias: float = -4.2
    """Log-odds of a share given a click, at zero affinity."""
    share_affinity: float = 1.8
    """Log-odds of a share gained per unit of affinity."""
    share_quality: float = 0.5
    """Log-odds of a share gained per standard deviation of creator quality."""
    purchase_bias: float = -1.8
    """Log-odds of a purchase given a click on a product, at zero affinity."""
    purchase_affinity: float = 1.6
    """Log-odds of a purchase gained per unit of affinity."""
    purchase_quality: float = 0.4
    """Log-odds of a purchase gained per standard deviation of creator quality."""
    purchase_non_product: float = -4.5
    """Log-odds added when the item is not a product (rentals, tickets, merchandise)."""
    completion_bias: float = -0.5
    """Log-odds of the watched share of a playable item, at zero affinity."""
    completion_affinity: float = 1.8
    """Log-odds of the watched share gained per unit of affinity."""
    completion_quality: float = 0.3
    """Log-odds of the watched share gained per standard deviation of creator quality."""
    completion_noise: float = Field(default=0.7, ge=0)
    """Standard deviation of the per-view noise on the watched share's log-odds."""
    skip_bias: float = -1.1
    """Log-odds of an explicit skip given no click, at zero affinity."""
    skip_affinity: float = -1.5
    """Log-odds of a skip per unit of affinity (negative: disliked items are skipped)."""
    hide_bias: float = -4.9
    """Log-odds of a hide given no click, at zero affinity."""
    hide_affinity: float = -2.5
    """Log-odds of a hide per unit of affinity."""
    not_interested_bias: float = -4.9
    """Log-odds of ``not_interested`` given no click, at zero affinity."""
    not_interested_affinity: float = -2.5
    """Log-odds of ``not_interested`` per unit of affinity."""
    report_bias: float = -6.2
    """Log-odds of a report given no click, at zero affinity and average quality."""
    report_affinity: float = -1.5
    """Log-odds of a report per unit of affinity."""
    report_quality: float = -0.8
    """Log-odds of a report per standard deviation of creator quality (poor creators get reported)."""


PresetName = Literal["tiny", "small", "benchmark"]

_PRESETS: Final[dict[str, dict[str, int]]] = {
    "tiny": {"n_users": 300, "n_items": 500, "n_events": 20_000},
    "small": {"n_users": 2_000, "n_items": 5_000, "n_events": 200_000},
    "benchmark": {"n_users": 10_000, "n_items": 100_000, "n_events": 1_000_000},
}


class WorldConfig(BaseModel):
    """Everything that shapes a synthetic world; the same config always yields the same world."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_users: int = Field(ge=1)
    """Number of users (``u0`` … ``u<n-1>``, oldest account first)."""
    n_items: int = Field(ge=1)
    """Number of items (``i0`` … ``i<n-1>``, oldest item first)."""
    n_events: int = Field(ge=0)
    """Exact number of event rows generated."""
    n_creators: int | None = Field(default=None, ge=1)
    """Number of creators; ``None`` gives one creator per 20 items (see :attr:`creator_count`)."""
    n_categories: int = Field(default=20, ge=1, le=100)
    """Number of categories; the first ones have the names of :data:`CATEGORY_SPECS`."""
    n_tags_per_category: int = Field(default=8, ge=1, le=len(TAG_WORDS))
    """Size of each category's tag pool; an item carries one to four of its category's tags."""
    dim: int = Field(default=16, ge=2, le=256)
    """Dimension of the latent taste space."""
    seed: int = Field(default=0, ge=0, lt=2**63)
    """Seed of every random draw."""
    start: datetime = datetime(2026, 1, 1, tzinfo=UTC)
    """Start of the event span; fixed rather than "now" so that a seed always gives the same world."""
    span_days: float = Field(default=30.0, ge=1, le=3_650)
    """Length of the event span; it must end in the past."""
    item_history_days: float = Field(default=365.0, ge=0)
    """How far before ``start`` the catalog's older items were created."""
    user_history_days: float = Field(default=730.0, ge=0)
    """How far before ``start`` the older accounts were created."""
    new_item_share: float = Field(default=0.2, ge=0, le=0.9)
    """Share of items created during the span: new items keep arriving."""
    new_user_share: float = Field(default=0.1, ge=0, le=0.9)
    """Share of users who sign up during the span."""
    regions: tuple[RegionSpec, ...] = Field(default=DEFAULT_REGIONS, min_length=1)
    """Regions with their language, time zone and weight."""
    region_bonus: float = 0.3
    """Affinity added when an item's creator lives in the user's region."""
    interests_share: float = Field(default=0.5, ge=0, le=1)
    """Share of users who named onboarding interests (their top three categories)."""
    follow_mean_degree: float = Field(default=10.0, ge=0)
    """Mean number of users each user follows."""
    unfollow_share: float = Field(default=0.03, ge=0, le=1)
    """Share of follows later undone (an ``active=False`` row in the edge change-log)."""
    mean_session_events: float = Field(default=12.0, gt=0)
    """Mean number of events per session."""
    page_size: int = Field(default=10, ge=1, le=1_000)
    """Items per served list; one list is one ``request_id``."""
    popular_share: float = Field(default=0.3, ge=0, le=1)
    """Share of home, video and product exposures drawn by popularity alone (the rest by taste)."""
    fresh_share: float = Field(default=0.1, ge=0, le=1)
    """Share of home exposures drawn uniformly among items of the last ``fresh_window_days``."""
    fresh_window_days: float = Field(default=3.0, gt=0)
    """Age under which an item counts as fresh."""
    exposure_candidates: int = Field(default=4, ge=1, le=64)
    """Candidates drawn for a personalised slot; the best by affinity (softmax) is shown."""
    exposure_affinity_weight: float = Field(default=2.0, ge=0)
    """Inverse temperature of that softmax: how personalised the exposing system is."""
    diurnal_amplitude: float = Field(default=0.5, ge=0, le=0.9)
    """Relative swing of session density over the local day (peak at 20:00)."""
    chunk_rows: int = Field(default=250_000, ge=1_000)
    """Largest number of rows in one yielded table; it changes how tables are cut, not their rows."""
    response: ResponseModel = Field(default_factory=ResponseModel)
    """How users respond to exposures."""

    @field_validator("start")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    @model_validator(mode="after")
    def _consistent(self) -> WorldConfig:
        if self.end > datetime.now(UTC):
            raise ValueError(f"the span ends at {self.end.isoformat()}, in the future")
        if self.popular_share + self.fresh_share > 1:
            raise ValueError("popular_share + fresh_share must not exceed 1")
        if len({r.name for r in self.regions}) != len(self.regions):
            raise ValueError("region names must be unique")
        return self

    @property
    def end(self) -> datetime:
        """End of the event span (exclusive)."""
        return self.start + timedelta(days=self.span_days)

    @property
    def creator_count(self) -> int:
        """``n_creators``, or one creator per 20 items when it is not set."""
        return self.n_creators if self.n_creators is not None else max(1, self.n_items // 20)

    @classmethod
    def preset(cls, name: PresetName, **overrides: Any) -> WorldConfig:
        """A named size: ``tiny`` (tests), ``small`` (local training), ``benchmark``.

        Args:
            name: ``tiny`` (300 users, 500 items, 20k events), ``small`` (2k, 5k, 200k) or
                ``benchmark`` (10k, 100k, 1M).
            **overrides: Any other field, e.g. ``seed``.

        Returns:
            The validated config.
        """
        if name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(_PRESETS)}")
        return cls.model_validate({**_PRESETS[name], **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> WorldConfig:
        """The ``tiny`` preset: 300 users, 500 items, 20k events."""
        return cls.preset("tiny", **overrides)

    @classmethod
    def small(cls, **overrides: Any) -> WorldConfig:
        """The ``small`` preset: 2k users, 5k items, 200k events."""
        return cls.preset("small", **overrides)

    @classmethod
    def benchmark(cls, **overrides: Any) -> WorldConfig:
        """The ``benchmark`` preset: 10k users, 100k items, 1M events."""
        return cls.preset("benchmark", **overrides)


# ---------------------------------------------------------------------------------------------
# Hidden truth
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class WorldTruth:
    """The hidden parameters of a world. Entity ``k`` has id ``u<k>``, ``i<k>`` or ``c<k>``.

    Times are seconds since the Unix epoch. Region, language, age, category, type and tag columns
    hold indices into :attr:`region_names`, :attr:`language_names`, :data:`AGE_GROUPS`,
    :attr:`category_names`, :data:`ITEM_TYPES` and :attr:`tag_names`.
    """

    config: WorldConfig
    category_names: list[str]
    tag_names: list[str]
    """``<category>/<word>``; category ``c`` owns tags ``c*T`` … ``c*T+T-1``."""
    category_centroids: F32
    category_popularity: F64
    user_vectors: F32
    user_region: I64
    user_language: I64
    user_age: I64
    user_activity: F64
    """Heavy-tailed relative activity; events per user are proportional to it."""
    user_influence: F64
    """Heavy-tailed attractiveness as a followee."""
    user_device: I64
    """Main device (index into :data:`DEVICES`)."""
    user_interest_categories: I64
    """``(n_users, 3)`` categories of the taste mixture."""
    user_interest_weights: F64
    """``(n_users, 3)`` mixture weights (zero for unused components)."""
    user_top_categories: I64
    """``(n_users, 3)`` categories closest to the taste vector, best first."""
    user_has_interests: Bool
    """Whether the user named onboarding interests."""
    user_created_s: F64
    item_vectors: F32
    item_category: I64
    item_type: I64
    item_creator: I64
    item_region: I64
    item_tags: I64
    """``(n_items, 4)`` tag indices, ``-1`` padded."""
    item_primary_tag: I64
    item_popularity: F64
    """Log popularity prior; exposure by popularity is proportional to its exponential."""
    item_created_s: F64
    """Whole seconds, non-decreasing with the item index."""
    item_duration_s: F64
    """Play length of videos, movies and music; zero otherwise."""
    item_price: F64
    """Price of products; zero otherwise."""
    item_read_time_min: F64
    """Reading time of articles and posts; zero otherwise."""
    creator_category: I64
    creator_quality: F64
    """Standard normal; raises clicks, likes, shares and purchases, lowers reports."""
    creator_region: I64

    @property
    def n_users(self) -> int:
        """Number of users."""
        return int(self.user_vectors.shape[0])

    @property
    def n_items(self) -> int:
        """Number of items."""
        return int(self.item_vectors.shape[0])

    @property
    def n_creators(self) -> int:
        """Number of creators."""
        return int(self.creator_quality.shape[0])

    @cached_property
    def user_ids(self) -> list[str]:
        """``u0`` … ``u<n-1>``."""
        return [f"u{k}" for k in range(self.n_users)]

    @cached_property
    def item_ids(self) -> list[str]:
        """``i0`` … ``i<n-1>``."""
        return [f"i{k}" for k in range(self.n_items)]

    @cached_property
    def creator_ids(self) -> list[str]:
        """``c0`` … ``c<n-1>``."""
        return [f"c{k}" for k in range(self.n_creators)]

    @property
    def region_names(self) -> list[str]:
        """Region labels, by region index."""
        return [r.name for r in self.config.regions]

    @property
    def language_names(self) -> list[str]:
        """Languages, by language index (the same index as the region that speaks it)."""
        return [r.language for r in self.config.regions]

    def user_index(self, user_ids: Sequence[str]) -> I64:
        """Indices of users given by id.

        Args:
            user_ids: Ids of the form ``u<k>``.

        Returns:
            The indices ``k``.

        Raises:
            KeyError: An id that names no user of this world.
        """
        return _parse_ids(user_ids, "u", self.n_users)

    def item_index(self, item_ids: Sequence[str]) -> I64:
        """Indices of items given by id.

        Args:
            item_ids: Ids of the form ``i<k>``.

        Returns:
            The indices ``k``.

        Raises:
            KeyError: An id that names no item of this world.
        """
        return _parse_ids(item_ids, "i", self.n_items)

    def affinity(self, user_idx: npt.ArrayLike, item_idx: npt.ArrayLike) -> F32:
        """True preference of users for items, element-wise over broadcast index arrays.

        Args:
            user_idx: User indices.
            item_idx: Item indices, broadcastable against ``user_idx`` (pass ``u[:, None]`` and
                ``i[None, :]`` for a matrix).

        Returns:
            ``user · item`` latent dot product, plus ``region_bonus`` where the item's creator lives
            in the user's region. About 0 for unrelated pairs and 1 or more for a favourite category.
        """
        u = np.asarray(user_idx, dtype=np.int64)
        i = np.asarray(item_idx, dtype=np.int64)
        dot = np.einsum("...d,...d->...", self.user_vectors[u], self.item_vectors[i])
        same = self.user_region[u] == self.item_region[i]
        out: F32 = np.asarray(dot + np.float32(self.config.region_bonus) * same, dtype=np.float32)
        return out


_ARRAY_FIELDS: Final[tuple[str, ...]] = (
    "category_centroids", "category_popularity", "user_vectors", "user_region", "user_language",
    "user_age", "user_activity", "user_influence", "user_device", "user_interest_categories",
    "user_interest_weights", "user_top_categories", "user_has_interests", "user_created_s",
    "item_vectors", "item_category", "item_type", "item_creator", "item_region", "item_tags",
    "item_primary_tag", "item_popularity", "item_created_s", "item_duration_s", "item_price",
    "item_read_time_min", "creator_category", "creator_quality", "creator_region",
)  # fmt: skip


def _parse_ids(ids: Sequence[str], prefix: str, n: int) -> I64:
    try:
        out = np.fromiter((int(s[1:]) if s[:1] == prefix else -1 for s in ids), np.int64, len(ids))
    except ValueError as exc:
        raise KeyError(f"not an id of the form {prefix}<n>: {exc}") from None
    bad = (out < 0) | (out >= n)
    if bad.any():
        raise KeyError(f"unknown id {ids[int(np.flatnonzero(bad)[0])]!r}")
    return out


def _rng(seed: int, stream: int, *more: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, *more])


def _sample_cdf(cdf: F64, u: F64) -> I64:
    """Inverse-CDF sampling; ``cdf`` is increasing and ends at 1."""
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1).astype(np.int64)


def _normalised(weights: Sequence[float] | F64) -> F64:
    w = np.asarray(weights, dtype=np.float64)
    return np.asarray(w / w.sum(), dtype=np.float64)


def _sigmoid(x: F64) -> F64:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _type_weights(n_categories: int) -> F64:
    """``(n_categories, n_types)`` item-type distribution of each category."""
    out = np.full((n_categories, len(ITEM_TYPES)), 1.0 / len(ITEM_TYPES))
    for c, (_, weights) in enumerate(CATEGORY_SPECS[:n_categories]):
        out[c] = [weights.get(t, 0.0) for t in ITEM_TYPES]
        out[c] /= out[c].sum()
    return out


def _unit_rows(x: F64) -> F64:
    return np.asarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-9), dtype=np.float64)


def build_truth(config: WorldConfig) -> WorldTruth:
    """Draw the hidden parameters of a world.

    Args:
        config: The world's config.

    Returns:
        The truth; the same config always gives the same truth.
    """
    rng = _rng(config.seed, _STREAM_TRUTH)
    d, n_cat, n_tag = config.dim, config.n_categories, config.n_tags_per_category
    n_reg, n_usr, n_itm, n_cre = len(config.regions), config.n_users, config.n_items, config.creator_count
    scale = 1.0 / math.sqrt(d)
    start_s, end_s = config.start.timestamp(), config.end.timestamp()
    span_s = end_s - start_s

    names = category_names(n_cat)
    # Zipf-like category sizes, shuffled so the biggest category differs between seeds.
    cat_pop = _normalised(rng.permutation(1.0 / np.arange(1, n_cat + 1) ** 0.7))
    cat_cdf = np.cumsum(cat_pop)
    centroids = rng.normal(0.0, scale, (n_cat, d))
    tag_words = np.stack([rng.permutation(len(TAG_WORDS))[:n_tag] for _ in range(n_cat)])
    tag_names = [f"{names[c]}/{TAG_WORDS[w]}" for c in range(n_cat) for w in tag_words[c]]
    tag_vectors = rng.normal(0.0, 0.5 * scale, (n_cat * n_tag, d))
    region_w = _normalised([r.weight for r in config.regions])
    region_cdf = np.cumsum(region_w)
    region_shift = rng.normal(0.0, 0.2 * scale, (n_reg, d))
    age_shift = rng.normal(0.0, 0.2 * scale, (len(AGE_GROUPS), d))

    # Creators.
    creator_category = _sample_cdf(cat_cdf, rng.random(n_cre))
    creator_quality = rng.normal(0.0, 1.0, n_cre)
    creator_region = _sample_cdf(region_cdf, rng.random(n_cre))
    creator_style = rng.normal(0.0, 0.3 * scale, (n_cre, d))
    productivity_cdf = np.cumsum(_normalised(rng.lognormal(0.0, 1.0, n_cre)))

    # Items.
    item_creator = _sample_cdf(productivity_cdf, rng.random(n_itm))
    own_category = rng.random(n_itm) < 0.8
    item_category = np.where(
        own_category, creator_category[item_creator], _sample_cdf(cat_cdf, rng.random(n_itm))
    )
    type_cdf = np.cumsum(_type_weights(n_cat), axis=1)[item_category]
    item_type = np.minimum((type_cdf < rng.random(n_itm)[:, None]).sum(axis=1), len(ITEM_TYPES) - 1)
    tag_cdf = np.cumsum(_normalised(1.0 / np.arange(1, n_tag + 1)))
    local_tags = _sample_cdf(tag_cdf, rng.random(n_itm * 4)).reshape(n_itm, 4)
    n_tags = rng.integers(1, 5, n_itm)
    raw_tags = np.where(np.arange(4) < n_tags[:, None], item_category[:, None] * n_tag + local_tags, -1)
    item_primary_tag = raw_tags[:, 0].copy()
    tag_sum = np.zeros((n_itm, d))
    for j in range(4):
        tag_sum += np.where(raw_tags[:, j : j + 1] >= 0, tag_vectors[np.maximum(raw_tags[:, j], 0)], 0.0)
    item_vectors = (
        centroids[item_category]
        + tag_sum / n_tags[:, None]
        + creator_style[item_creator]
        + rng.normal(0.0, 0.4 * scale, (n_itm, d))
    )
    item_tags = _dedupe_rows(raw_tags)
    item_region = creator_region[item_creator]
    item_popularity = rng.normal(0.0, 1.2, n_itm) + 0.4 * creator_quality[item_creator]
    is_new = rng.random(n_itm) < config.new_item_share
    is_new[0] = False  # at least one item exists before the span, so every exposure has a candidate
    old_age_s = config.item_history_days * _DAY_S * rng.random(n_itm) ** 1.5
    new_at_s = start_s + (span_s - 3_600.0) * rng.random(n_itm)
    item_created_s = np.floor(np.where(is_new, new_at_s, start_s - old_age_s))
    group = _TYPE_GROUP[item_type]
    video_len = np.clip(rng.lognormal(math.log(240.0), 0.8, n_itm), 15.0, 1_800.0)
    movie_len = rng.uniform(80.0, 150.0, n_itm) * 60.0
    music_len = rng.uniform(150.0, 360.0, n_itm)
    item_duration_s = np.round(
        np.select(
            [
                item_type == ITEM_TYPES.index(kind)
                for kind in (ItemType.VIDEO, ItemType.MOVIE, ItemType.MUSIC)
            ],
            [video_len, movie_len, music_len],
            0.0,
        )
    )
    item_price = np.where(
        group == _GROUP_PRODUCT,
        np.floor(np.clip(rng.lognormal(math.log(25.0), 1.0, n_itm), 1, 5_000)) + 0.99,
        0.0,
    )
    item_read_time_min = np.where(group == _GROUP_OTHER, rng.integers(1, 16, n_itm).astype(np.float64), 0.0)
    # Ids follow creation time, as an auto-increment key would.
    order = np.lexsort((np.arange(n_itm), item_created_s))

    # Users.
    n_interest = _sample_cdf(np.array([0.3, 0.7, 1.0]), rng.random(n_usr)) + 1
    interest_cats = _sample_cdf(cat_cdf, rng.random(n_usr * 3)).reshape(n_usr, 3)
    interest_w = rng.dirichlet(np.ones(3), n_usr) * (np.arange(3) < n_interest[:, None])
    interest_w /= interest_w.sum(axis=1, keepdims=True)
    user_region = _sample_cdf(region_cdf, rng.random(n_usr))
    user_language = np.where(
        rng.random(n_usr) < 0.85, user_region, _sample_cdf(region_cdf, rng.random(n_usr))
    )
    user_age = _sample_cdf(np.cumsum(_normalised(_AGE_WEIGHTS)), rng.random(n_usr))
    user_vectors = (
        np.einsum("uk,ukd->ud", interest_w, centroids[interest_cats])
        + region_shift[user_region]
        + age_shift[user_age]
        + rng.normal(0.0, 0.5 * scale, (n_usr, d))
    )
    # A fixed taste norm keeps users with broad tastes from looking indifferent to everything.
    user_vectors = 1.3 * _unit_rows(user_vectors)
    user_activity = rng.lognormal(0.0, 1.1, n_usr)
    user_influence = np.exp(0.6 * np.log(user_activity) + rng.normal(0.0, 1.2, n_usr))
    user_device = _sample_cdf(np.cumsum(_normalised(_DEVICE_WEIGHTS)), rng.random(n_usr))
    user_has_interests = rng.random(n_usr) < config.interests_share
    new_user = rng.random(n_usr) < config.new_user_share
    user_created_s = np.floor(
        np.where(
            new_user,
            start_s + 0.75 * span_s * rng.random(n_usr),
            start_s - 60.0 - config.user_history_days * _DAY_S * rng.random(n_usr),
        )
    )
    user_order = np.lexsort((np.arange(n_usr), user_created_s))
    user_vectors = user_vectors[user_order]
    top_categories = _top_categories(user_vectors.astype(np.float32), centroids.astype(np.float32))

    u, i = user_order, order
    return WorldTruth(
        config=config,
        category_names=names,
        tag_names=tag_names,
        category_centroids=centroids.astype(np.float32),
        category_popularity=cat_pop,
        user_vectors=user_vectors.astype(np.float32),
        user_region=user_region[u],
        user_language=user_language[u],
        user_age=user_age[u],
        user_activity=user_activity[u],
        user_influence=user_influence[u],
        user_device=user_device[u],
        user_interest_categories=interest_cats[u],
        user_interest_weights=interest_w[u],
        user_top_categories=top_categories,
        user_has_interests=user_has_interests[u],
        user_created_s=user_created_s[u],
        item_vectors=item_vectors[i].astype(np.float32),
        item_category=item_category[i],
        item_type=item_type[i],
        item_creator=item_creator[i],
        item_region=item_region[i],
        item_tags=item_tags[i],
        item_primary_tag=item_primary_tag[i],
        item_popularity=item_popularity[i],
        item_created_s=item_created_s[i],
        item_duration_s=item_duration_s[i],
        item_price=item_price[i],
        item_read_time_min=item_read_time_min[i],
        creator_category=creator_category,
        creator_quality=creator_quality,
        creator_region=creator_region,
    )


def _dedupe_rows(tags: I64) -> I64:
    """Drop repeated tags within each row, keeping the valid ones first (sorted) and ``-1`` after."""
    big = np.iinfo(np.int64).max
    s = np.sort(np.where(tags < 0, big, tags), axis=1)
    dup = np.zeros_like(s, dtype=bool)
    dup[:, 1:] = s[:, 1:] == s[:, :-1]
    s = np.sort(np.where(dup, big, s), axis=1)
    return np.where(s == big, -1, s)


def _top_categories(users: F32, centroids: F32, block: int = 65_536) -> I64:
    k = min(3, centroids.shape[0])
    out = np.empty((users.shape[0], 3), dtype=np.int64)
    for lo in range(0, users.shape[0], block):
        scores = users[lo : lo + block] @ centroids.T
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        out[lo : lo + block] = np.pad(best, ((0, 0), (0, 3 - k)), mode="edge")
    return out


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------


def _outcome_probabilities_idx(
    truth: WorldTruth, users: IntArray, items: IntArray, positions: IntArray
) -> dict[EventType, F64]:
    r = truth.config.response
    aff = truth.affinity(users, items).astype(np.float64)
    quality = truth.creator_quality[truth.item_creator[items]]
    is_product = _TYPE_GROUP[truth.item_type[items]] == _GROUP_PRODUCT
    playable = _TYPE_GROUP[truth.item_type[items]] == _GROUP_PLAYABLE
    click = _sigmoid(
        r.click_bias
        + r.click_affinity * aff
        + r.click_quality * quality
        + r.click_popularity * truth.item_popularity[items]
        + r.click_position * np.log1p(np.asarray(positions, dtype=np.float64))
    )
    purchase = _sigmoid(
        r.purchase_bias + r.purchase_affinity * aff + r.purchase_quality * quality
        + np.where(is_product, 0.0, r.purchase_non_product)
    )  # fmt: skip
    return {
        EventType.CLICK: click,
        EventType.VIEW: np.full(aff.shape, r.view_given_click),
        EventType.WATCH: playable.astype(np.float64),
        EventType.LIKE: _sigmoid(r.like_bias + r.like_affinity * aff + r.like_quality * quality),
        EventType.SHARE: _sigmoid(r.share_bias + r.share_affinity * aff + r.share_quality * quality),
        EventType.PURCHASE: purchase,
        EventType.SKIP: _sigmoid(r.skip_bias + r.skip_affinity * aff),
        EventType.HIDE: _sigmoid(r.hide_bias + r.hide_affinity * aff),
        EventType.NOT_INTERESTED: _sigmoid(r.not_interested_bias + r.not_interested_affinity * aff),
        EventType.REPORT: _sigmoid(r.report_bias + r.report_affinity * aff + r.report_quality * quality),
    }


def outcome_probabilities(
    truth: WorldTruth,
    user_ids: Sequence[str],
    item_ids: Sequence[str],
    positions: Sequence[int] | IntArray | None = None,
) -> dict[EventType, F64]:
    """Probability of every outcome of showing each item to its user, as events were generated.

    ``click`` is per exposure; ``view``, ``like``, ``share`` and ``purchase`` are given a click;
    ``watch`` is given a view (one for videos, movies and music, zero otherwise); ``skip``, ``hide``,
    ``not_interested`` and ``report`` are each given no click, and at most one of them happens.

    Args:
        truth: The world's truth.
        user_ids: One user per exposure.
        item_ids: One item per exposure, paired with ``user_ids``.
        positions: Zero-based slot of each exposure in its list; top slot when omitted.

    Returns:
        One float64 array per event type, aligned with the inputs.
    """
    if len(user_ids) != len(item_ids):
        raise ValueError(f"{len(user_ids)} user ids but {len(item_ids)} item ids")
    pos = np.zeros(len(user_ids), np.int64) if positions is None else np.asarray(positions, np.int64)
    return _outcome_probabilities_idx(truth, truth.user_index(user_ids), truth.item_index(item_ids), pos)


def click_probability(
    truth: WorldTruth,
    user_ids: Sequence[str],
    item_ids: Sequence[str],
    positions: Sequence[int] | IntArray | None = None,
) -> F64:
    """Probability that each user clicks the item shown to them.

    Args:
        truth: The world's truth.
        user_ids: One user per exposure.
        item_ids: One item per exposure.
        positions: Zero-based slot of each exposure; top slot when omitted.

    Returns:
        Click probabilities in ``(0, 1)``, aligned with the inputs.
    """
    return outcome_probabilities(truth, user_ids, item_ids, positions)[EventType.CLICK]


def like_probability(truth: WorldTruth, user_ids: Sequence[str], item_ids: Sequence[str]) -> F64:
    """Probability that each user likes the item, given that they clicked it.

    Args:
        truth: The world's truth.
        user_ids: One user per pair.
        item_ids: One item per pair.

    Returns:
        Like probabilities in ``(0, 1)``, aligned with the inputs.
    """
    return outcome_probabilities(truth, user_ids, item_ids)[EventType.LIKE]


# ---------------------------------------------------------------------------------------------
# Catalog tables
# ---------------------------------------------------------------------------------------------


def _strings(values: Sequence[str]) -> pa.Array:
    return pa.array(list(values), type=pa.string())


def _ids(prefix: str, idx: IntArray) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(idx, type=pa.int64()), pa.string()), "")


def _timestamps(seconds: F64) -> pa.Array:
    return pa.array(np.round(seconds * 1e6).astype(np.int64), type=EVENTS.schema.field("ts").type)


def _list_array(values: pa.Array, rows: I64) -> pa.Array:
    """A list column from a ``(n, k)`` index matrix padded with ``-1``."""
    valid = rows >= 0
    offsets = np.zeros(rows.shape[0] + 1, dtype=np.int32)
    np.cumsum(valid.sum(axis=1), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values.take(pa.array(rows[valid])))


def users_table(truth: WorldTruth, lo: int = 0, hi: int | None = None) -> pa.Table:
    """The ``users`` rows of users ``lo`` … ``hi - 1``.

    Args:
        truth: The world's truth.
        lo: First user index.
        hi: End of the range (exclusive); all users when omitted.

    Returns:
        A table with :data:`core.tables.USERS`'s schema.
    """
    hi = truth.n_users if hi is None else hi
    idx = np.arange(lo, hi)
    top = np.where(truth.user_has_interests[idx, None], truth.user_top_categories[idx], -1)
    created = _timestamps(truth.user_created_s[idx])
    # Recorded no earlier than the span's start (the catalog snapshot), for the reason given in
    # follow_graph; created_at keeps the true age.
    recorded = _timestamps(np.maximum(truth.user_created_s[idx], truth.config.start.timestamp()))
    n = len(idx)
    return pa.Table.from_arrays(
        [
            _ids("u", idx),
            _strings([a.value for a in AGE_GROUPS]).take(pa.array(truth.user_age[idx])),
            _strings(truth.region_names).take(pa.array(truth.user_region[idx])),
            _strings(truth.language_names).take(pa.array(truth.user_language[idx])),
            _list_array(_strings(truth.category_names), top),
            pa.array(np.ones(n, dtype=bool)),
            pa.array(np.zeros(n, dtype=bool)),
            created,
            recorded,
        ],
        schema=USERS.schema,
    )


def items_table(truth: WorldTruth, lo: int = 0, hi: int | None = None) -> pa.Table:
    """The ``items`` rows of items ``lo`` … ``hi - 1``.

    Args:
        truth: The world's truth.
        lo: First item index.
        hi: End of the range (exclusive); all items when omitted.

    Returns:
        A table with :data:`core.tables.ITEMS`'s schema; titles read like ``Quick cooking video #12``.
    """
    hi = truth.n_items if hi is None else hi
    idx = np.arange(lo, hi)
    n = len(idx)
    item_type = pa.array(truth.item_type[idx])
    types = _strings([t.value for t in ITEM_TYPES]).take(item_type)
    categories = _strings(truth.category_names).take(pa.array(truth.item_category[idx]))
    words = [name.split("/", 1)[1] for name in truth.tag_names]
    title_words = _strings([w[:1].upper() + w[1:] for w in words]).take(pa.array(truth.item_primary_tag[idx]))
    nouns = _strings([_TITLE_NOUNS[t] for t in ITEM_TYPES]).take(item_type)
    number = pc.cast(pa.array(idx), pa.string())
    title = pc.binary_join_element_wise(title_words, " ", categories, " ", nouns, " #", number, "")
    region = _strings(truth.region_names).take(pa.array(truth.item_region[idx]))
    language = _strings(truth.language_names).take(pa.array(truth.item_region[idx]))
    head = pc.binary_join_element_wise('{"region":"', region, '","language":"', language, '"', "")
    group = _TYPE_GROUP[truth.item_type[idx]]
    playable = pc.binary_join_element_wise(
        head,
        ',"duration_s":',
        pc.cast(pa.array(truth.item_duration_s[idx].astype(np.int64)), pa.string()),
        "}",
        "",
    )
    product = pc.binary_join_element_wise(
        head, ',"price":', pc.cast(pa.array(truth.item_price[idx]), pa.string()), ',"currency":"USD"}', ""
    )
    reading = pc.binary_join_element_wise(
        head,
        ',"read_time_min":',
        pc.cast(pa.array(truth.item_read_time_min[idx].astype(np.int64)), pa.string()),
        "}",
        "",
    )
    metadata = pc.if_else(
        pa.array(group == _GROUP_PLAYABLE),
        playable,
        pc.if_else(pa.array(group == _GROUP_PRODUCT), product, reading),
    )
    created = _timestamps(truth.item_created_s[idx])
    recorded = _timestamps(np.maximum(truth.item_created_s[idx], truth.config.start.timestamp()))
    return pa.Table.from_arrays(
        [
            _ids("i", idx),
            types,
            title,
            categories,
            _list_array(_strings(truth.tag_names), truth.item_tags[idx]),
            _ids("c", truth.item_creator[idx]),
            pa.array(np.full(n, "active")),
            created,
            metadata,
            recorded,
        ],
        schema=ITEMS.schema,
    )


# ---------------------------------------------------------------------------------------------
# Follow graph
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FollowGraph:
    """Follow change-log rows, in time order: ``follower`` follows (or unfollows) ``followee``."""

    follower: I64
    followee: I64
    at_s: F64
    active: Bool

    def table(self, lo: int = 0, hi: int | None = None) -> pa.Table:
        """Rows ``lo`` … ``hi - 1`` as a table with :data:`core.tables.EDGES`'s schema."""
        sl = slice(lo, hi)
        return pa.Table.from_arrays(
            [
                _ids("u", self.follower[sl]),
                _ids("u", self.followee[sl]),
                pa.array(self.active[sl]),
                _timestamps(self.at_s[sl]),
            ],
            schema=EDGES.schema,
        )


def follow_graph(truth: WorldTruth, block: int = 4_096) -> FollowGraph:
    """Draw who follows whom, biased towards users of similar taste, region and high influence.

    Each user's followees are the best of a candidate pool, half drawn by influence (people follow
    the popular) and half from users sharing their top category (approximate nearest neighbours
    without an ``O(n_users²)`` scan), scored by taste cosine, same region, influence and noise.

    Args:
        truth: The world's truth.
        block: Users scored at once; bounds memory for large worlds.

    Returns:
        The follow change-log.
    """
    config = truth.config
    n = truth.n_users
    rng = _rng(config.seed, _STREAM_EDGES)
    if n < 2 or config.follow_mean_degree <= 0:
        empty_i, empty_f = np.zeros(0, np.int64), np.zeros(0, np.float64)
        return FollowGraph(empty_i, empty_i, empty_f, np.zeros(0, bool))
    mean = config.follow_mean_degree
    sigma = 0.9
    max_degree = max(1, min(n - 1, math.ceil(5 * mean)))
    degree = np.clip(np.round(rng.lognormal(math.log(mean) - sigma**2 / 2, sigma, n)), 0, max_degree).astype(
        int
    )
    pool = max(16, 3 * max_degree)
    half = pool // 2
    unit = _unit_rows(truth.user_vectors.astype(np.float64))
    influence_log = np.log(truth.user_influence)
    influence_cdf = np.cumsum(_normalised(truth.user_influence))
    top = truth.user_top_categories[:, 0]
    by_top = np.argsort(top, kind="stable")
    top_lo = np.searchsorted(top[by_top], np.arange(config.n_categories), side="left")
    top_size = np.bincount(top, minlength=config.n_categories)

    followers, followees = [], []
    for lo in range(0, n, block):
        users = np.arange(lo, min(n, lo + block))
        b = len(users)
        popular = _sample_cdf(influence_cdf, rng.random(b * half)).reshape(b, half)
        group = top[users]
        similar = by_top[
            top_lo[group][:, None] + (rng.random((b, pool - half)) * top_size[group][:, None]).astype(int)
        ]
        cand = np.concatenate([popular, similar], axis=1)
        score = (
            3.0 * np.einsum("bd,bpd->bp", unit[users], unit[cand])
            + 0.6 * (truth.user_region[cand] == truth.user_region[users][:, None])
            + 0.4 * influence_log[cand]
            + rng.gumbel(0.0, 1.0, cand.shape)
        )
        score[cand == users[:, None]] = -np.inf
        by_cand = np.argsort(cand, axis=1, kind="stable")
        sorted_cand = np.take_along_axis(cand, by_cand, axis=1)
        repeat = np.zeros_like(cand, dtype=bool)
        repeat[:, 1:] = sorted_cand[:, 1:] == sorted_cand[:, :-1]
        np.put_along_axis(
            score, by_cand, np.where(repeat, -np.inf, np.take_along_axis(score, by_cand, axis=1)), 1
        )
        best = np.argsort(-score, axis=1, kind="stable")
        best_score = np.take_along_axis(score, best, axis=1)
        keep = (np.arange(pool) < degree[users][:, None]) & np.isfinite(best_score)
        rows, cols = np.nonzero(keep)
        followers.append(users[rows])
        followees.append(np.take_along_axis(cand, best, axis=1)[rows, cols])
    follower = np.concatenate(followers)
    followee = np.concatenate(followees)
    end_s = config.end.timestamp()
    since = np.maximum(truth.user_created_s[follower], truth.user_created_s[followee]) + 1.0
    at_s = np.floor(since + rng.random(len(follower)) * (end_s - 1.0 - since))
    # Follows made before the span are recorded at its start, the moment the world's catalog is
    # snapshotted: the lake partitions change-logs by date, and years of history would otherwise
    # scatter a few rows into each of hundreds of partitions.
    at_s = np.maximum(at_s, config.start.timestamp())
    undo = rng.random(len(follower)) < config.unfollow_share
    undo_at = np.floor(at_s[undo] + 1.0 + rng.random(int(undo.sum())) * (end_s - 2.0 - at_s[undo]))
    follower = np.concatenate([follower, follower[undo]])
    followee = np.concatenate([followee, followee[undo]])
    at = np.concatenate([at_s, np.maximum(undo_at, at_s[undo] + 1.0)])
    active = np.concatenate([np.ones(len(at_s), bool), np.zeros(int(undo.sum()), bool)])
    order = np.lexsort((followee, follower, at))
    return FollowGraph(follower[order], followee[order], at[order], active[order])


# ---------------------------------------------------------------------------------------------
# Sessions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sessions:
    """Planned sessions, sorted by start time."""

    user: I64
    start_s: F64
    room_s: F64
    """Longest the session may last and still end 30 minutes before the user's next one."""
    quota: I64
    """Exact number of events the session holds."""
    device: I64


def _diurnal_warp(t: F64, offset_h: F64, amplitude: float) -> F64:
    """Cumulative session density: ``d/dt`` is ``1 + a·cos(2π(local hour - 20)/24)``."""
    phase = 2.0 * math.pi * ((t + offset_h * 3_600.0) / _DAY_S - _EVENING_PEAK_H / 24.0)
    return t + amplitude * _DAY_S / (2.0 * math.pi) * np.sin(phase)


def _diurnal_unwarp(x: F64, offset_h: F64, amplitude: float) -> F64:
    """Inverse of :func:`_diurnal_warp` by Newton's method (a Kepler equation, converging for a < 1)."""
    t = x.copy()
    omega = 2.0 * math.pi / _DAY_S
    for _ in range(30):
        phase = omega * (t + offset_h * 3_600.0) - 2.0 * math.pi * _EVENING_PEAK_H / 24.0
        step = (_diurnal_warp(t, offset_h, amplitude) - x) / (1.0 + amplitude * np.cos(phase))
        t -= step
        if np.abs(step).max(initial=0.0) < 1e-7:
            break
    return t


def _group_rank(groups: I64) -> I64:
    """Rank of each element within its run of equal, contiguous ``groups``."""
    n = len(groups)
    if n == 0:
        return np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    return np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))


def _plan_sessions(truth: WorldTruth) -> _Sessions:
    config = truth.config
    rng = _rng(config.seed, _STREAM_SESSIONS)
    start_s, end_s = config.start.timestamp(), config.end.timestamp()
    amp = config.diurnal_amplitude
    offsets = np.array([r.utc_offset_h for r in config.regions])[truth.user_region]
    begin = np.maximum(start_s, truth.user_created_s + 60.0)
    x_lo = _diurnal_warp(begin, offsets, amp)
    x_len = _diurnal_warp(np.full_like(begin, end_s), offsets, amp) - x_lo
    # Real gaps shrink by at most (1 + a) when unwarped, so distances are reserved in warped time.
    stretch = 1.0 + amp
    min_gap_x = (_SESSION_GAP_S + _MIN_SESSION_ROOM_S) * stretch
    cap = np.floor(x_len / min_gap_x).astype(np.int64)
    weight = truth.user_activity * (end_s - begin) / (end_s - start_s) * (cap > 0)
    events = rng.multinomial(config.n_events, _normalised(weight)) if config.n_events else np.zeros_like(cap)
    want = np.ceil(events / config.mean_session_events * rng.lognormal(0.0, 0.3, len(events)))
    k = np.where(events > 0, np.clip(want, 1, np.maximum(cap, 1)), 0).astype(np.int64)
    gap_x = np.minimum((_SESSION_GAP_S + _TARGET_SESSION_ROOM_S) * stretch, x_len / np.maximum(k, 1))

    user = np.repeat(np.arange(truth.n_users), k)
    rank = _group_rank(user)
    u = rng.random(len(user))
    u = u[np.lexsort((u, user))]  # sorted within each user, users stay grouped
    x = x_lo[user] + u * (x_len - k * gap_x)[user] + rank * gap_x[user]
    t = _diurnal_unwarp(x, offsets[user], amp)
    last = np.r_[user[1:] != user[:-1], True] if len(user) else np.zeros(0, bool)
    next_t = np.where(last, end_s + _SESSION_GAP_S, np.r_[t[1:], 0.0])
    room = np.maximum(next_t - t - _SESSION_GAP_S - 1.0, 1.0)

    # Split each user's events among their sessions: gamma weights, largest-remainder rounding.
    share = rng.gamma(2.0, 1.0, len(user))
    totals = np.bincount(user, weights=share, minlength=truth.n_users)
    exact = events[user] * share / np.where(totals[user] > 0, totals[user], 1.0)
    quota = np.floor(exact).astype(np.int64)
    missing = events - np.bincount(user, weights=quota, minlength=truth.n_users).astype(np.int64)
    by_remainder = np.lexsort((-(exact - quota), user))
    quota[by_remainder] += _group_rank(user[by_remainder]) < missing[user[by_remainder]]

    device = np.where(
        rng.random(len(user)) < 0.85,
        truth.user_device[user],
        _sample_cdf(np.cumsum(_normalised(_DEVICE_WEIGHTS)), rng.random(len(user))),
    )
    keep = quota > 0
    order = np.flatnonzero(keep)[np.lexsort((np.flatnonzero(keep), t[keep]))]
    return _Sessions(user[order], t[order], room[order], quota[order], device[order])


# ---------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------


def _splitmix64(x: U64) -> U64:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hash_uniform(seed: int, stream: int, a: I64, b: I64) -> F64:
    """A uniform in ``[0, 1)`` fixed by ``(seed, stream, a, b)``.

    A page's surface must not depend on which batch or round of draws reaches it first.
    """
    key = np.uint64((seed * 1_000_003 + stream) % 2**64)
    with np.errstate(over="ignore"):
        h = _splitmix64(_splitmix64(a.astype(np.uint64) ^ key) + b.astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


class _ItemSampler:
    """Draws items created no later than a given time, in proportion to their popularity.

    Each item appears in four segments: everything, its type group, its category and its (type
    group, category) pair. Entries are sorted by (segment, creation time) so that the items of a
    segment available at time ``t`` form a contiguous run, sampled by inverse CDF.
    """

    def __init__(self, truth: WorldTruth) -> None:
        n_cat = truth.config.n_categories
        self.n_categories = n_cat
        group = _TYPE_GROUP[truth.item_type]
        items = np.arange(truth.n_items)
        segment = np.concatenate(
            [
                np.zeros(truth.n_items, np.int64),
                1 + group,
                1 + _N_GROUPS + truth.item_category,
                1 + _N_GROUPS + n_cat + group * n_cat + truth.item_category,
            ]
        )
        created = np.tile(truth.item_created_s.astype(np.int64), 4)
        self.origin = int(created.min()) - 1
        order = np.lexsort((created, segment))
        self.item = np.tile(items, 4)[order]
        self.keys = (segment[order] << 32) | (created[order] - self.origin)
        weight = np.exp(np.tile(truth.item_popularity, 4))[order]
        self.cum = np.concatenate([[0.0], np.cumsum(weight)])
        n_segments = 1 + _N_GROUPS + n_cat + _N_GROUPS * n_cat
        self.segment_lo = np.searchsorted(segment[order], np.arange(n_segments + 1), side="left")

    def everything(self) -> int:
        """Segment of all items."""
        return 0

    def group(self, g: I64) -> I64:
        """Segments of type groups."""
        return 1 + g

    def category(self, c: I64) -> I64:
        """Segments of categories."""
        return 1 + _N_GROUPS + c

    def group_category(self, g: I64, c: I64) -> I64:
        """Segments of (type group, category) pairs."""
        return 1 + _N_GROUPS + self.n_categories + g * self.n_categories + c

    def _bounds(self, segment: I64, t_s: F64) -> tuple[I64, I64]:
        lo = self.segment_lo[segment]
        t = np.floor(t_s).astype(np.int64) - self.origin
        hi = np.searchsorted(self.keys, (segment << 32) | t, side="right")
        return lo, hi

    def popular(self, segments: Sequence[I64], t_s: F64, u: F64, weighted: bool = True) -> I64:
        """One item per row, by popularity, from the first of ``segments`` that has one at ``t_s``.

        Args:
            segments: Segment arrays in order of preference, each aligned with ``t_s``.
            t_s: Time by which the item must exist.
            u: Uniforms driving the draw.
            weighted: Whether to weigh items by popularity; uniform when false.

        Returns:
            Item indices; ``-1`` where no segment had an item.
        """
        out = np.full(len(t_s), -1, np.int64)
        todo = np.arange(len(t_s))
        for seg in segments:
            if len(todo) == 0:
                break
            lo, hi = self._bounds(seg[todo], t_s[todo])
            ok = hi > lo
            lo, hi, rows = lo[ok], hi[ok], todo[ok]
            if weighted:
                base = self.cum[lo]
                target = base + u[rows] * (self.cum[hi] - base)
                j = np.clip(np.searchsorted(self.cum, target, side="right") - 1, lo, hi - 1)
            else:
                j = np.minimum(lo + np.floor(u[rows] * (hi - lo)).astype(np.int64), hi - 1)
            out[rows] = self.item[j]
            todo = todo[~ok]
        return out

    def fresh(self, t_s: F64, window_s: float, u: F64) -> I64:
        """One item per row, uniformly among items created in the ``window_s`` before ``t_s``.

        Returns:
            Item indices; ``-1`` where no item is that fresh.
        """
        zero = np.zeros(len(t_s), np.int64)
        _, hi = self._bounds(zero, t_s)
        _, lo = self._bounds(zero, t_s - window_s)
        j = lo + np.floor(u * (hi - lo)).astype(np.int64)
        return np.where(hi > lo, self.item[np.minimum(j, len(self.item) - 1)], -1)


@dataclass
class _EventRows:
    """Numeric columns of generated events, before they become an Arrow table."""

    user: I64
    item: I64
    slot: I64
    ts_us: I64
    surface: I64
    device: I64
    region: I64
    session: I64
    exposure: I64
    watch_s: F64

    @classmethod
    def concat(cls, parts: Sequence[_EventRows]) -> _EventRows:
        return cls(**{name: np.concatenate([getattr(p, name) for p in parts]) for name in _EVENT_COLUMNS})

    def take(self, idx: I64 | slice) -> _EventRows:
        return _EventRows(**{name: getattr(self, name)[idx] for name in _EVENT_COLUMNS})

    def __len__(self) -> int:
        return len(self.user)


_EVENT_COLUMNS: Final = (
    "user",
    "item",
    "slot",
    "ts_us",
    "surface",
    "device",
    "region",
    "session",
    "exposure",
    "watch_s",
)


class _EventGenerator:
    """Turns planned sessions into events, one batch of sessions at a time."""

    def __init__(self, truth: WorldTruth, batch_events: int = _BATCH_EVENTS) -> None:
        self.truth = truth
        self.config = truth.config
        self.batch_events = batch_events
        self.sampler = _ItemSampler(truth)
        self.sessions = _plan_sessions(truth)
        self.playable = _TYPE_GROUP[truth.item_type] == _GROUP_PLAYABLE
        self.item_group = _TYPE_GROUP[truth.item_type]
        self.interest_cdf = np.cumsum(truth.user_interest_weights, axis=1)
        self.category_cdf = np.cumsum(truth.category_popularity)
        self.surface_cdf = np.cumsum(_normalised(_SURFACE_WEIGHTS))
        self.exposures_drawn = 0
        self.events_drawn = 0

    def batches(self) -> Iterator[_EventRows]:
        """Events in time order, in batches of about ``batch_events``."""
        s = self.sessions
        if len(s.quota) == 0:
            return
        cum = np.cumsum(s.quota)
        # Batches are runs of sessions holding about ``batch_events`` events together.
        bounds = np.unique(np.searchsorted(cum, np.arange(self.batch_events, cum[-1], self.batch_events)))
        edges = np.r_[0, bounds + 1, len(s.quota)]
        edges = np.unique(np.clip(edges, 0, len(s.quota)))
        held: _EventRows | None = None
        for number, (lo, hi) in enumerate(itertools.pairwise(edges)):
            rows = self._batch(number, int(lo), int(hi))
            if held is not None:
                rows = _EventRows.concat([held, rows])
            rows = rows.take(np.argsort(rows.ts_us, kind="stable"))
            if hi < len(s.quota):
                # Later batches start no earlier than their first session, so only events before it
                # are final; the rest wait to be merged with the next batch.
                cut = int(np.searchsorted(rows.ts_us, _us(s.start_s[hi]), side="left"))
                held = rows.take(slice(cut, None))
                rows = rows.take(slice(0, cut))
            else:
                held = None
            if len(rows):
                yield rows

    def _batch(self, number: int, lo: int, hi: int) -> _EventRows:
        """Events of sessions ``lo`` … ``hi - 1``: exactly their quotas, ordered within each session.

        Exposures are drawn in rounds until every session has produced its quota; each session then
        keeps its first ``quota`` events, so the total matches ``n_events`` exactly.
        """
        s, config = self.sessions, self.config
        rng = _rng(config.seed, _STREAM_EVENTS, number)
        sessions = np.arange(lo, hi)
        quota = s.quota[lo:hi]
        have = np.zeros(hi - lo, np.int64)
        next_exposure = np.zeros(hi - lo, np.int64)
        exposures: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        offset = 0
        while True:
            deficit = quota - have
            todo = np.flatnonzero(deficit > 0)
            if len(todo) == 0:
                break
            # Events per exposure so far (about one) sizes the round, with a margin against a second.
            rate = max(0.05, self.events_drawn / self.exposures_drawn) if self.exposures_drawn else 1.0
            count = np.ceil(deficit[todo] / rate * 1.15).astype(np.int64) + 1
            local = np.repeat(todo, count)
            index = next_exposure[local] + _group_rank(local)
            # A later round opens a new list rather than finishing the last one, so the repeat check
            # of `_expose` always sees whole lists; the user simply stopped scrolling the previous one.
            next_exposure[todo] = -(-(next_exposure[todo] + count) // config.page_size) * config.page_size
            exp, ev = self._expose(rng, sessions[local], index)
            exp["local"] = local
            produced = np.bincount(local[ev["row"]], minlength=hi - lo)
            ev["row"] = ev["row"] + offset
            offset += len(local)
            have += produced
            self.exposures_drawn += len(local)
            self.events_drawn += int(produced.sum())
            exposures.append(exp)
            events.append(ev)
        exp = {k: np.concatenate([e[k] for e in exposures]) for k in exposures[0]}
        ev = {k: np.concatenate([e[k] for e in events]) for k in events[0]}

        # Lay exposures end to end within their session: a running sum restarted at each session.
        order = np.lexsort((exp["index"], exp["local"]))
        busy = exp["busy"][order]
        local_sorted = exp["local"][order]
        ends = np.cumsum(busy)
        first = np.r_[True, local_sorted[1:] != local_sorted[:-1]]
        begin_of_session = np.maximum.accumulate(np.where(first, ends - busy, 0.0))
        start_in_session = np.empty_like(busy)
        start_in_session[order] = ends - busy - begin_of_session
        t = start_in_session[ev["row"]] + ev["offset"]
        ev_local = exp["local"][ev["row"]]

        # Keep each session's first ``quota`` events.
        by_time = np.lexsort((t, ev_local))
        keep = by_time[_group_rank(ev_local[by_time]) < quota[ev_local[by_time]]]
        t, ev_local, rows = t[keep], ev_local[keep], ev["row"][keep]
        duration = np.zeros(hi - lo)
        np.maximum.at(duration, ev_local, t)
        squeeze = np.minimum(1.0, s.room_s[lo:hi] / np.maximum(duration, 1e-9))
        start_us = _us(s.start_s[lo:hi])
        ts_us = start_us[ev_local] + np.floor(t * squeeze[ev_local] * 1e6).astype(np.int64)
        users = s.user[lo:hi][ev_local]
        return _EventRows(
            user=users,
            item=exp["item"][rows],
            slot=ev["slot"][keep],
            ts_us=ts_us,
            surface=exp["surface"][rows],
            device=s.device[lo:hi][ev_local],
            region=self.truth.user_region[users],
            session=sessions[ev_local],
            exposure=exp["index"][rows],
            watch_s=ev["watch"][keep],
        )

    def _expose(
        self, rng: np.random.Generator, session: I64, index: I64
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Draw the item of each exposure and what the user did with it."""
        truth, config, sampler = self.truth, self.config, self.sampler
        n = len(session)
        user = self.sessions.user[session]
        t0 = self.sessions.start_s[session]
        page = index // config.page_size
        surface = _sample_cdf(self.surface_cdf, _hash_uniform(config.seed, _STREAM_PAGES, session, page))
        anchor = _sample_cdf(self.category_cdf, _hash_uniform(config.seed, _STREAM_PAGES + 1, session, page))
        # The anchor of a "similar" list is the category of an item the user likes, mostly.
        own = _hash_uniform(config.seed, _STREAM_PAGES + 2, session, page) < 0.8
        pick = (
            self.interest_cdf[user] < _hash_uniform(config.seed, _STREAM_PAGES + 3, session, page)[:, None]
        ).sum(1)
        anchor = np.where(own, truth.user_interest_categories[user, np.minimum(pick, 2)], anchor)

        category = np.where(
            rng.random(n) < 0.8,
            truth.user_interest_categories[
                user, np.minimum((self.interest_cdf[user] < rng.random(n)[:, None]).sum(1), 2)
            ],
            _sample_cdf(self.category_cdf, rng.random(n)),
        )
        category = np.where(surface == _SIMILAR, anchor, category)
        route = rng.random(n)
        group = np.where(surface == _PRODUCT_SURFACE, _GROUP_PRODUCT, _GROUP_PLAYABLE)
        typed = (surface == _VIDEO_SURFACE) | (surface == _PRODUCT_SURFACE)
        popular = (surface != _SIMILAR) & (route < config.popular_share)
        fresh = (
            (surface == _HOME)
            & (route >= config.popular_share)
            & (route < config.popular_share + config.fresh_share)
        )
        personal = ~(popular | fresh)
        everything = np.zeros(n, np.int64)

        item = np.full(n, -1, np.int64)
        if fresh.any():
            item[fresh] = sampler.fresh(
                t0[fresh], config.fresh_window_days * _DAY_S, rng.random(int(fresh.sum()))
            )
        todo = popular | ((item < 0) & fresh)
        if todo.any():
            segs = [np.where(typed[todo], sampler.group(group[todo]), 0), everything[todo]]
            item[todo] = sampler.popular(segs, t0[todo], rng.random(int(todo.sum())))
        if personal.any():
            item[personal] = self._personal(
                rng, user[personal], t0[personal], category[personal], group[personal], typed[personal]
            )
        # A served list never shows an item twice. Repeats are redrawn by popularity, then uniformly
        # (a few hits can fill a small segment), and last from the whole catalog.
        # Exposures arrive grouped by session with ascending index, so each list is one contiguous run.
        served_list = np.cumsum(np.r_[0, (session[1:] != session[:-1]) | (page[1:] != page[:-1])])
        for attempt in range(8):
            again = _repeats(served_list, item, truth.n_items)
            if not again.any():
                break
            segs = [np.where(typed[again] & (attempt < 6), sampler.group(group[again]), 0), everything[again]]
            item[again] = sampler.popular(segs, t0[again], rng.random(int(again.sum())), weighted=attempt < 2)

        probs = _outcome_probabilities_idx(truth, user, item, index % config.page_size)
        r = config.response
        draw = rng.random((n, 6))
        click = draw[:, 0] < probs[EventType.CLICK]
        view = click & (draw[:, 1] < probs[EventType.VIEW])
        playable = self.playable[item]
        watch = view & playable
        like = click & (draw[:, 2] < probs[EventType.LIKE])
        share = click & (draw[:, 3] < probs[EventType.SHARE])
        purchase = click & (draw[:, 4] < probs[EventType.PURCHASE])
        negative = np.stack(
            [
                probs[EventType.REPORT],
                probs[EventType.HIDE],
                probs[EventType.NOT_INTERESTED],
                probs[EventType.SKIP],
            ],
            axis=1,
        )
        negative_cdf = np.cumsum(negative, axis=1)
        which = (negative_cdf < draw[:, 5:6]).sum(1)
        no_click = ~click
        report = no_click & (which == 0)
        hide = no_click & (which == 1)
        not_interested = no_click & (which == 2)
        skip = no_click & (which == 3)

        aff = truth.affinity(user, item).astype(np.float64)
        quality = truth.creator_quality[truth.item_creator[item]]
        completion = _sigmoid(
            r.completion_bias + r.completion_affinity * aff + r.completion_quality * quality
            + rng.normal(0.0, r.completion_noise, n)
        )  # fmt: skip
        watch_s = np.round(truth.item_duration_s[item] * completion, 1)
        group_of_item = self.item_group[item]
        reading_s = np.where(
            group_of_item == _GROUP_PRODUCT,
            20.0 + 120.0 * completion,
            truth.item_read_time_min[item] * 60.0 * completion + 5.0,
        )
        engaged = np.where(view, np.where(playable, watch_s, reading_s), 0.0)
        browse = rng.lognormal(math.log(3.0), 0.6, n)
        opened = browse + 1.5
        offsets = np.stack(
            [
                browse,  # click
                opened,  # view
                opened + engaged,  # watch, reported when playback stops
                opened + 0.8 * engaged,  # like
                opened + engaged + 2.0,  # share
                opened + engaged + 4.0,  # purchase
                0.5 * browse,  # skip
                browse + 1.0,  # hide
                browse + 1.0,  # not_interested
                browse + 1.0,  # report
            ],
            axis=1,
        )
        happened = np.stack(
            [click, view, watch, like, share, purchase, skip, hide, not_interested, report], axis=1
        )
        busy = browse + np.where(click, 1.5 + engaged + 6.0, 0.0) + np.where(no_click & (which < 4), 2.0, 0.0)
        rows, slots = np.nonzero(happened)
        exposure = {"item": item, "index": index, "surface": surface, "busy": busy}
        event = {
            "row": rows,
            "slot": slots,
            "offset": offsets[rows, slots],
            "watch": np.where(slots == _S_WATCH, watch_s[rows], np.nan),
        }
        return exposure, event

    def _personal(
        self, rng: np.random.Generator, user: I64, t0: F64, category: I64, group: I64, typed: Bool
    ) -> I64:
        """Personalised slots: a few candidates from the slot's category, the best by noisy affinity."""
        sampler, config = self.sampler, self.config
        m = config.exposure_candidates
        rep = np.repeat
        cat_seg = np.where(typed, sampler.group_category(group, category), sampler.category(category))
        fallback = np.where(typed, sampler.group(group), 0)
        segs = [rep(cat_seg, m), rep(fallback, m), np.zeros(len(user) * m, np.int64)]
        cand = sampler.popular(segs, rep(t0, m), rng.random(len(user) * m)).reshape(-1, m)
        if m == 1:
            return cand[:, 0]
        noise = rng.gumbel(0.0, 1.0, cand.shape)
        best = np.empty(len(user), np.int64)
        step = max(1, 2**20 // m)  # bounds the (rows, m, dim) gather behind the affinity
        for lo in range(0, len(user), step):
            sl = slice(lo, lo + step)
            score = (
                config.exposure_affinity_weight * self.truth.affinity(user[sl, None], cand[sl]) + noise[sl]
            )
            best[sl] = np.take_along_axis(cand[sl], np.argmax(score, axis=1)[:, None], axis=1)[:, 0]
        return best


def _repeats(served_list: I64, item: I64, n_items: int) -> Bool:
    """Exposures whose item already appeared earlier in the same served list."""
    key = served_list * n_items + item
    order = np.argsort(key, kind="stable")
    ordered = key[order]
    out = np.zeros(len(item), bool)
    out[order[1:][ordered[1:] == ordered[:-1]]] = True
    return out


def _us(seconds: F64 | float) -> Any:
    return np.round(np.asarray(seconds, dtype=np.float64) * 1e6).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# World
# ---------------------------------------------------------------------------------------------


class World:
    """A synthetic world: its hidden truth and the tables it produces.

    Example:
        >>> world = World(WorldConfig.tiny(seed=7))
        >>> for chunk in world.chunks():
        ...     for name, table in chunk.items():
        ...         ...
    """

    def __init__(self, config: WorldConfig, truth: WorldTruth | None = None) -> None:
        """Build (or adopt) the truth of a world.

        Args:
            config: The world's config.
            truth: A truth built earlier for this config (e.g. by :func:`load_truth`).
        """
        if truth is not None and truth.config != config:
            raise ValueError("the truth was built for another config")
        self.config = config
        self.truth = truth if truth is not None else build_truth(config)

    def chunks(self) -> Iterator[dict[str, pa.Table]]:
        """All tables, in chunks of at most ``chunk_rows`` rows.

        Each chunk maps one table name (``users``, ``items``, ``edges`` then ``events``) to a table
        with that table's schema from :mod:`core.tables`. Users, items and edges come first; events
        follow in time order, with ids ``syn-<seed>-<n>`` numbered in that order.

        Yields:
            ``{table_name: table}``.
        """
        step = self.config.chunk_rows
        truth = self.truth
        for lo in range(0, truth.n_users, step):
            yield {USERS.name: users_table(truth, lo, min(truth.n_users, lo + step))}
        for lo in range(0, truth.n_items, step):
            yield {ITEMS.name: items_table(truth, lo, min(truth.n_items, lo + step))}
        graph = follow_graph(truth)
        for lo in range(0, len(graph.follower), step):
            yield {EDGES.name: graph.table(lo, lo + step)}
        yield from self._event_chunks()

    def _event_chunks(self) -> Iterator[dict[str, pa.Table]]:
        truth, config = self.truth, self.config
        user_ids = _strings(truth.user_ids)
        item_ids = _strings(truth.item_ids)
        slots = _strings([s.value for s in _SLOTS])
        surfaces = _strings(SURFACES)
        devices = _strings([d.value for d in DEVICES])
        regions = _strings(truth.region_names)
        prefix = f"syn-{config.seed}-"
        counter = 0
        for batch in _EventGenerator(truth).batches():
            for lo in range(0, len(batch), config.chunk_rows):
                rows = batch.take(slice(lo, lo + config.chunk_rows))
                n = len(rows)
                session = pc.cast(pa.array(rows.session), pa.string())
                page = pc.cast(pa.array(rows.exposure // config.page_size), pa.string())
                table = pa.Table.from_arrays(
                    [
                        _ids(prefix, np.arange(counter, counter + n)),
                        user_ids.take(pa.array(rows.user)),
                        item_ids.take(pa.array(rows.item)),
                        slots.take(pa.array(rows.slot)),
                        pa.array(rows.ts_us, type=EVENTS.schema.field("ts").type),
                        surfaces.take(pa.array(rows.surface)),
                        devices.take(pa.array(rows.device)),
                        regions.take(pa.array(rows.region)),
                        pc.binary_join_element_wise(prefix + "s", session, "-p", page, ""),
                        pa.array((rows.exposure % config.page_size).astype(np.int32)),
                        pa.array(rows.watch_s.astype(np.float32), mask=rows.slot != _S_WATCH),
                        pa.nulls(n, pa.float32()),
                        pc.binary_join_element_wise('{"session_id":"' + prefix + "s", session, '"}', ""),
                    ],
                    schema=EVENTS.schema,
                )
                counter += n
                yield {EVENTS.name: table}


def generate_world(config: WorldConfig) -> Iterator[dict[str, pa.Table]]:
    """Generate a world's tables; see :meth:`World.chunks`.

    Args:
        config: The world's config.

    Yields:
        ``{table_name: table}`` chunks of at most ``config.chunk_rows`` rows.
    """
    yield from World(config).chunks()


# ---------------------------------------------------------------------------------------------
# Persistence
# ---------------------------------------------------------------------------------------------


def save_truth(truth: WorldTruth, path: str | Path) -> Path:
    """Write a truth to a directory as ``truth.npz`` (arrays) and ``truth.json`` (config, names).

    Args:
        truth: The truth to write.
        path: Directory; created if missing.

    Returns:
        The directory.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "truth.npz", **{name: getattr(truth, name) for name in _ARRAY_FIELDS})
    meta = {
        "format": _TRUTH_FORMAT,
        "config": truth.config.model_dump(mode="json"),
        "category_names": truth.category_names,
        "tag_names": truth.tag_names,
    }
    (root / "truth.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    return root


def load_truth(path: str | Path) -> WorldTruth:
    """Read a truth written by :func:`save_truth`.

    Args:
        path: The directory given to :func:`save_truth`.

    Returns:
        The truth.
    """
    root = Path(path)
    meta = json.loads((root / "truth.json").read_text())
    if meta["format"] != _TRUTH_FORMAT:
        raise ValueError(f"truth format {meta['format']} is not {_TRUTH_FORMAT}")
    with np.load(root / "truth.npz") as arrays:
        values = {name: arrays[name] for name in _ARRAY_FIELDS}
    return WorldTruth(
        config=WorldConfig.model_validate(meta["config"]),
        category_names=list(meta["category_names"]),
        tag_names=list(meta["tag_names"]),
        **values,
    )
