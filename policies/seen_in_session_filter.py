"""Drops items already shown or used in the current session."""

from __future__ import annotations

from core.types import Candidate, FilterResult, RequestContext
from features.user_context import SESSION_ITEM_IDS


class SeenInSessionFilter:
    """Removes the items of ``user_activity:session_item_ids`` when ``ctx.exclude_seen`` is set.

    Args:
        name: Stage id; removals are counted under it.
    """

    def __init__(self, name: str = "seen_in_session") -> None:
        self.name = name

    def apply(self, ctx: RequestContext, cands: list[Candidate]) -> FilterResult:
        """Keep the candidates not seen in this session (all of them when the request allows repeats)."""
        seen = (
            frozenset(ctx.user_features.get_strings(SESSION_ITEM_IDS, ()))
            if ctx.exclude_seen
            else frozenset()
        )
        if not seen:
            return FilterResult(kept=list(cands), removed=[])
        return FilterResult.partition(cands, lambda c: c.item_id not in seen)
