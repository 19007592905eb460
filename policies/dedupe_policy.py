"""Deduplication: each item once, and optionally each title of a creator once."""

from __future__ import annotations

from core.types import Candidate, RequestContext
from features.candidate_refs import ITEM_CREATOR_ID, ITEM_TITLE


class DedupePolicy:
    """Keeps the first (best-ranked) occurrence of each item.

    The runner's merge already unites one item's retrievals; this guards lists that policies or
    a ranker built, and with ``by_title`` also drops re-uploads: the same title from the same
    creator under another item id.

    Args:
        by_title: Also drop later items whose (creator, normalised title) was already kept.
        name: Stage id.
    """

    def __init__(self, *, by_title: bool = True, name: str = "dedupe") -> None:
        self.name = name
        self.by_title = by_title

    def apply(self, ctx: RequestContext, ranked: list[Candidate]) -> list[Candidate]:
        """The list without repeats, in order."""
        seen_ids: set[str] = set()
        seen_titles: set[tuple[str, str]] = set()
        out: list[Candidate] = []
        for cand in ranked:
            if cand.item_id in seen_ids:
                continue
            if self.by_title:
                title = " ".join(cand.features.get_str(ITEM_TITLE, "").casefold().split())
                creator = cand.features.get_str(ITEM_CREATOR_ID, "")
                if title and creator:
                    if (creator, title) in seen_titles:
                        continue
                    seen_titles.add((creator, title))
            seen_ids.add(cand.item_id)
            out.append(cand)
        return out
