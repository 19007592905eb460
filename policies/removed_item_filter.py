"""Drops items taken down from the catalog (or unknown to it)."""

from __future__ import annotations

from core.types import Candidate, FilterResult, RequestContext
from features.candidate_refs import SERVING_REMOVED
from policies.serving_flags import partition_by_flags


class RemovedItemFilter:
    """Removes candidates flagged ``serving:removed`` for this request.

    Args:
        name: Stage id; removals are counted under it.
    """

    def __init__(self, name: str = "removed_item") -> None:
        self.name = name

    def apply(self, ctx: RequestContext, cands: list[Candidate]) -> FilterResult:
        """Keep the candidates that are still in the catalog.

        Raises:
            StageContractError: A candidate carries no ``serving:removed`` flag.
        """
        return partition_by_flags(self.name, cands, SERVING_REMOVED)
