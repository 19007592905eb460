"""Creator fairness: never more than N items of one creator in any W consecutive positions."""

from __future__ import annotations

from core.types import Candidate, RequestContext
from features.candidate_refs import ITEM_CREATOR_ID
from policies.sponsored_marks import split_sponsored
from policies.window_cap import window_capped


def creator_of(cand: Candidate) -> str | None:
    """The candidate's creator (``item:creator_id``), or None when it was not hydrated."""
    creator = cand.features.get_str(ITEM_CREATOR_ID, "")
    return creator or None


class CreatorCapPolicy:
    """Reorders so that no creator has more than ``max_per_window`` items in any ``window`` slots.

    A hard rule: candidates that cannot be placed without breaking it are dropped, so the cap
    holds over the whole returned list. The order changes only where the cap forces it.
    Candidates without a creator count as distinct creators. Sponsored candidates pass through
    at the end, for the sponsored-slot policy.

    Args:
        max_per_window: Items of one creator allowed in a window.
        window: Consecutive positions a window spans.
        name: Stage id.
    """

    def __init__(self, max_per_window: int = 2, window: int = 5, *, name: str = "creator_cap") -> None:
        if max_per_window < 1 or window < 1:
            raise ValueError(f"max_per_window and window must be at least 1, got {max_per_window}, {window}")
        self.name = name
        self.max_per_window = max_per_window
        self.window = window

    def apply(self, ctx: RequestContext, ranked: list[Candidate]) -> list[Candidate]:
        """The capped order of the organic candidates, then the sponsored ones."""
        organic, sponsored = split_sponsored(ranked)
        placed, _ = window_capped(organic, creator_of, self.max_per_window, self.window)
        return placed + sponsored
