"""Drops items of creators the requesting user blocked."""

from __future__ import annotations

from core.types import Candidate, FilterResult, RequestContext
from features.candidate_refs import SERVING_USER_BLOCKED_CREATOR
from policies.serving_flags import partition_by_flags


class UserBlockFilter:
    """Removes candidates flagged ``serving:user_blocked_creator``.

    Args:
        name: Stage id; removals are counted under it.
    """

    def __init__(self, name: str = "user_block") -> None:
        self.name = name

    def apply(self, ctx: RequestContext, cands: list[Candidate]) -> FilterResult:
        """Keep the candidates whose creator the user did not block.

        Raises:
            StageContractError: A candidate carries no ``serving:user_blocked_creator`` flag.
        """
        return partition_by_flags(self.name, cands, SERVING_USER_BLOCKED_CREATOR)
