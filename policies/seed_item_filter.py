"""Drops the page's own item from the lists shown under it ("you may also like" on item X)."""

from __future__ import annotations

from core.types import Candidate, FilterResult, RequestContext


class SeedItemFilter:
    """Removes ``ctx.item_id`` itself from the candidates.

    Sources other than the neighbour table (trending, popular) know nothing of the seed and may
    return it.

    Args:
        name: Stage id; removals are counted under it.
    """

    def __init__(self, name: str = "seed_item") -> None:
        self.name = name

    def apply(self, ctx: RequestContext, cands: list[Candidate]) -> FilterResult:
        """Keep every candidate but the seed item (all of them when the request has no seed)."""
        seed = ctx.item_id
        if seed is None:
            return FilterResult(kept=list(cands), removed=[])
        return FilterResult.partition(cands, lambda c: c.item_id != seed)
