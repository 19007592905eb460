"""Telling sponsored candidates apart, so organic policies leave them to the sponsored-slot policy."""

from __future__ import annotations

from collections.abc import Sequence

from core.types import Candidate
from features.candidate_refs import SPONSORED_CAMPAIGN_ID


def is_sponsored(cand: Candidate) -> bool:
    """Whether a sponsored source produced the candidate (it carries a campaign id)."""
    return SPONSORED_CAMPAIGN_ID in cand.features


def split_sponsored(cands: Sequence[Candidate]) -> tuple[list[Candidate], list[Candidate]]:
    """``(organic, sponsored)``, each in input order.

    Organic policies (diversity, caps, exploration) work on the organic part and append the
    sponsored part unchanged, so sponsored items never take organic positions by relevance.
    """
    organic: list[Candidate] = []
    sponsored: list[Candidate] = []
    for cand in cands:
        # is_sponsored, inlined: six policies split the ranked list of every request.
        (sponsored if SPONSORED_CAMPAIGN_ID in cand.features else organic).append(cand)
    return organic, sponsored
