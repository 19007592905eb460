"""Trending items: forward-decayed scores in sorted sets, globally, per region and per category.

Forward decay adds each event as ``w * 2 ** ((t - t0) / half_life)`` for a fixed landmark ``t0``.
Older events then weigh exponentially less than newer ones without ever rescaling stored
scores, so ``ZINCRBY`` alone keeps ``ZREVRANGE`` in trending order. The catch is that the added
values grow by one doubling per half-life and would overflow a double after about 1,000
half-lives (256 days at 6 h). Hence landmark epochs:

- time is cut into epochs of ``trending_epoch_s``; epoch ``E`` has landmark ``t0 = E * epoch_s``
  and its own sorted set per scope;
- an event in epoch ``E`` is added to the set of ``E``. The first write to a scope's set of
  ``E + 1`` starts it as the set of ``E`` rescaled to the new landmark (one ``ZUNIONSTORE`` with
  weight :func:`carry_factor`), so the trend is continuous across the boundary; an event of
  ``E`` that arrives after that is added to both. (Writing every event to both sets, as an
  earlier version did, cost twice the ``ZINCRBY`` calls, the largest part of the stream
  processor's Redis time.) The commit script does both, atomically with the rest of a batch
  (:mod:`features.online_store`). The carry-over copies each scope's set once per epoch (a
  global set of 100k items took Redis about 0.1 s here, once a week by default);
- readers use the set of the epoch ``now`` falls in, or the previous epoch's while the new one
  has had no event yet; a set expires a day after its epoch is over.

Within a set the factors stay between ``2 ** -(epoch / half_life)`` and ``2 ** (epoch / half_life)``
(``2 ** ±28`` with the defaults), well inside double precision. A score converts to "decayed
weight as of ``now``" with :func:`current_score`.

Scopes: ``global``; ``region`` is the event's region (where the users are), or the item's region
when the event has none; ``category`` is the item's catalog category.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from features.keys import RedisKeys
from features.params import FeatureParams
from features.records import EventRecord
from features.spec import ItemLookup

EXPIRY_SLACK_S: Final = 86_400
"""How long a set outlives its epoch, so readers whose clock lags a little still find it."""


class TrendingScopeKind(StrEnum):
    """What a trending list is restricted to."""

    GLOBAL = "global"
    REGION = "region"
    CATEGORY = "category"


@dataclass(frozen=True, slots=True)
class TrendingScope:
    """One trending list: everything, one region, or one category.

    Attributes:
        kind: The restriction.
        value: Region or category name; ``None`` for ``global``.
    """

    kind: TrendingScopeKind
    value: str | None = None

    def __post_init__(self) -> None:
        if (self.kind is TrendingScopeKind.GLOBAL) != (self.value is None):
            raise ValueError("a global scope has no value; region and category scopes need one")

    @classmethod
    def everywhere(cls) -> TrendingScope:
        """The global scope."""
        return cls(TrendingScopeKind.GLOBAL)

    @classmethod
    def region(cls, region: str) -> TrendingScope:
        """The scope of one region."""
        return cls(TrendingScopeKind.REGION, region)

    @classmethod
    def category(cls, category: str) -> TrendingScope:
        """The scope of one category."""
        return cls(TrendingScopeKind.CATEGORY, category)

    def key(self, keys: RedisKeys, epoch: int) -> str:
        """The sorted set of this scope in one epoch."""
        if self.kind is TrendingScopeKind.GLOBAL:
            return keys.trending_global(epoch)
        assert self.value is not None
        if self.kind is TrendingScopeKind.REGION:
            return keys.trending_region(self.value, epoch)
        return keys.trending_category(self.value, epoch)


def epoch_of(ts_s: float, params: FeatureParams) -> int:
    """The landmark epoch an instant falls in."""
    return math.floor(ts_s / params.trending_epoch_s)


def landmark_s(epoch: int, params: FeatureParams) -> float:
    """The landmark ``t0`` of an epoch, in epoch seconds."""
    return epoch * params.trending_epoch_s


def expire_at_s(epoch: int, params: FeatureParams) -> int:
    """When the set of an epoch may go: the end of the epoch plus :data:`EXPIRY_SLACK_S`."""
    return math.ceil(landmark_s(epoch + 1, params)) + EXPIRY_SLACK_S


def forward_weight(weight: float, ts_s: float, epoch: int, params: FeatureParams) -> float:
    """What an event of ``weight`` at ``ts_s`` adds to the set of ``epoch``."""
    return weight * math.exp2((ts_s - landmark_s(epoch, params)) / params.trending_half_life_s)


def carry_factor(params: FeatureParams) -> float:
    """What a score of one epoch's set is multiplied by to count in the next epoch's set."""
    return math.exp2(-params.trending_epoch_s / params.trending_half_life_s)


def current_score(score: float, epoch: int, now_s: float, params: FeatureParams) -> float:
    """A stored score of ``epoch``'s set as decayed weight as of ``now_s``."""
    return score * math.exp2((landmark_s(epoch, params) - now_s) / params.trending_half_life_s)


def scopes_of(event: EventRecord, items: ItemLookup) -> list[TrendingScope]:
    """The trending lists an event counts toward."""
    item = items.get(event.item_id)
    scopes = [TrendingScope.everywhere()]
    region = event.region or (item.region if item is not None else None)
    if region:
        scopes.append(TrendingScope.region(region))
    if item is not None:
        scopes.append(TrendingScope.category(item.category))
    return scopes


def increments(
    events: Iterable[EventRecord], items: ItemLookup, params: FeatureParams
) -> dict[tuple[TrendingScope, int], dict[str, float]]:
    """The ``ZINCRBY`` amounts a batch adds to the sets of its events' epochs, summed per set and item.

    Args:
        events: The batch (each event once).
        items: Catalog info of the events' items.
        params: Trending weights, half-life and epoch length.

    Returns:
        ``(scope, epoch)`` to item id to increment; events of zero weight add nothing.
    """
    # Summed under plain (kind, value, epoch) keys: hashing a TrendingScope runs Python code, and
    # this loop touches three sets per event. Each distinct set becomes a TrendingScope once, below.
    sums: dict[tuple[str, str | None, int], dict[str, float]] = {}
    for event in events:
        weight = params.trending_weight(event.event_type, event.watch_time_s)
        if weight <= 0.0:
            continue
        ts_s = event.ts_s
        epoch = epoch_of(ts_s, params)
        item_id = event.item_id
        item = items.get(item_id)
        region = event.region or (item.region if item is not None else None)
        # The same additions as folding scopes_of(event) one by one, in the same order.
        scopes: list[tuple[str, str | None]] = [(_GLOBAL, None)]
        if region:
            scopes.append((_REGION, region))
        if item is not None:
            scopes.append((_CATEGORY, item.category))
        amount = forward_weight(weight, ts_s, epoch, params)
        for kind, value in scopes:
            amounts = sums.setdefault((kind, value, epoch), {})
            amounts[item_id] = amounts.get(item_id, 0.0) + amount
    return {(_scope(kind, value), target): amounts for (kind, value, target), amounts in sums.items()}


_GLOBAL: Final = TrendingScopeKind.GLOBAL.value
_REGION: Final = TrendingScopeKind.REGION.value
_CATEGORY: Final = TrendingScopeKind.CATEGORY.value


def _scope(kind: str, value: str | None) -> TrendingScope:
    return TrendingScope(TrendingScopeKind(kind), value)
