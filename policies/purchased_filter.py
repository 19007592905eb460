"""Drops items the user already bought."""

from __future__ import annotations

from core.schema import EventType
from core.types import Candidate, FilterResult, RequestContext
from features.user_context import recent_events


class PurchasedFilter:
    """Removes items with a ``purchase`` among the user's recent events.

    Reads ``ctx.user_features`` only: the recent-event list is the purchase history the request
    path holds (the last 50 events), so a purchase older than that is no longer filtered.

    Args:
        name: Stage id; removals are counted under it.
    """

    def __init__(self, name: str = "purchased") -> None:
        self.name = name

    def apply(self, ctx: RequestContext, cands: list[Candidate]) -> FilterResult:
        """Keep the candidates the user did not buy recently."""
        bought = {
            e.item_id for e in recent_events(ctx.user_features) if e.event_type == EventType.PURCHASE.value
        }
        if not bought:
            return FilterResult(kept=list(cands), removed=[])
        return FilterResult.partition(cands, lambda c: c.item_id not in bought)
