"""Drops items an operator blocked for everyone, directly or through their creator."""

from __future__ import annotations

from core.types import Candidate, FilterResult, RequestContext
from features.candidate_refs import SERVING_BLOCKED_CREATOR, SERVING_BLOCKED_ITEM
from policies.serving_flags import partition_by_flags


class GlobalBlockFilter:
    """Removes candidates flagged ``serving:blocked_item`` or ``serving:blocked_creator``.

    Args:
        name: Stage id; removals are counted under it.
    """

    def __init__(self, name: str = "global_block") -> None:
        self.name = name

    def apply(self, ctx: RequestContext, cands: list[Candidate]) -> FilterResult:
        """Keep the candidates neither blocked nor made by a blocked creator.

        Raises:
            StageContractError: A candidate carries no block flags.
        """
        return partition_by_flags(self.name, cands, SERVING_BLOCKED_ITEM, SERVING_BLOCKED_CREATOR)
