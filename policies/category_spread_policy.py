"""Category spread: no category crowds a stretch of the list."""

from __future__ import annotations

from core.types import Candidate, RequestContext
from features.candidate_refs import ITEM_CATEGORY
from policies.sponsored_marks import split_sponsored
from policies.window_cap import window_capped


def category_of(cand: Candidate) -> str | None:
    """The candidate's category (``item:category``), or None when it was not hydrated."""
    category = cand.features.get_str(ITEM_CATEGORY, "")
    return category or None


class CategorySpreadPolicy:
    """Reorders so that a category has at most ``max_per_window`` items in any ``window`` slots.

    A soft rule, unlike the creator cap: a catalog may have few categories, so candidates that
    cannot be spread any further are kept after the spread part instead of dropped.

    Args:
        max_per_window: Items of one category allowed in a window.
        window: Consecutive positions a window spans.
        name: Stage id.
    """

    def __init__(self, max_per_window: int = 3, window: int = 6, *, name: str = "category_spread") -> None:
        if max_per_window < 1 or window < 1:
            raise ValueError(f"max_per_window and window must be at least 1, got {max_per_window}, {window}")
        self.name = name
        self.max_per_window = max_per_window
        self.window = window

    def apply(self, ctx: RequestContext, ranked: list[Candidate]) -> list[Candidate]:
        """The spread order, then what could not be spread, then the sponsored candidates."""
        organic, sponsored = split_sponsored(ranked)
        placed, left_over = window_capped(organic, category_of, self.max_per_window, self.window)
        return placed + left_over + sponsored
