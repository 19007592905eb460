"""Drops items the user hid, marked not interested or reported."""

from __future__ import annotations

from core.types import Candidate, FilterResult, RequestContext
from features.candidate_refs import SERVING_EXCLUDED
from policies.serving_flags import partition_by_flags


class ExclusionFilter:
    """Removes candidates flagged ``serving:excluded`` (the user's exclusion set).

    Args:
        name: Stage id; removals are counted under it.
    """

    def __init__(self, name: str = "exclusion") -> None:
        self.name = name

    def apply(self, ctx: RequestContext, cands: list[Candidate]) -> FilterResult:
        """Keep the candidates the user did not exclude.

        Raises:
            StageContractError: A candidate carries no ``serving:excluded`` flag.
        """
        return partition_by_flags(self.name, cands, SERVING_EXCLUDED)
