"""Sponsored items at fixed positions, labelled, at most K per list."""

from __future__ import annotations

from collections.abc import Sequence

from core.types import Candidate, RequestContext
from features.candidate_refs import SPONSORED_BID
from policies.creator_cap_policy import creator_of
from policies.sponsored_marks import split_sponsored
from policies.window_cap import fits_at

SPONSORED_LABEL = "Sponsored"


class SponsoredSlotPolicy:
    """Places sponsored candidates at the configured slots and nowhere else.

    Sponsored candidates (those carrying ``sponsored:campaign_id``) are taken out of the list;
    the highest bids (ties: higher score) go into ``slots``, in slot order, at most
    ``max_per_list`` of them and only where the creator cap still holds. Their reason becomes
    ``"Sponsored"`` (the source's reason follows after a separator when it had another one).
    Sponsored items that get no slot are dropped: they are never shown as organic results.
    Slots are 0-based positions in the final list; a slot beyond the list or beyond
    ``ctx.limit`` is skipped.

    Args:
        slots: Positions for sponsored items.
        max_per_list: Sponsored items per list at most.
        creator_cap: ``(max_per_window, window)`` of the creator cap to keep, or None.
        name: Stage id.
    """

    def __init__(
        self,
        slots: Sequence[int] = (2, 9),
        max_per_list: int = 2,
        *,
        creator_cap: tuple[int, int] | None = None,
        name: str = "sponsored_slots",
    ) -> None:
        if any(slot < 0 for slot in slots) or max_per_list < 0:
            raise ValueError("slots and max_per_list must not be negative")
        self.name = name
        self.slots = tuple(sorted(set(slots)))
        self.max_per_list = max_per_list
        self.creator_cap = creator_cap

    def apply(self, ctx: RequestContext, ranked: list[Candidate]) -> list[Candidate]:
        """The organic list with sponsored candidates inserted at the slots."""
        organic, sponsored = split_sponsored(ranked)
        waiting = sorted(sponsored, key=lambda c: (-c.features.get_float(SPONSORED_BID, 0.0), -c.score))
        listed = list(organic)
        placed = 0
        for slot in self.slots:
            if placed >= self.max_per_list or not waiting or slot >= ctx.limit or slot > len(listed):
                break
            for position, cand in enumerate(waiting):
                if self._fits(listed, slot, cand):
                    del waiting[position]
                    cand.reason = label(cand.reason)
                    listed.insert(slot, cand)
                    placed += 1
                    break
        return listed

    def _fits(self, listed: list[Candidate], slot: int, cand: Candidate) -> bool:
        if self.creator_cap is None:
            return True
        max_per_window, window = self.creator_cap
        return fits_at([creator_of(c) for c in listed], slot, creator_of(cand), max_per_window, window)


def label(reason: str | None) -> str:
    """The reason of a sponsored item: always starting with ``"Sponsored"``."""
    if not reason or reason == SPONSORED_LABEL:
        return SPONSORED_LABEL
    if reason.startswith(SPONSORED_LABEL):
        return reason
    return f"{SPONSORED_LABEL} · {reason}"
