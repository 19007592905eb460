"""Attaches a request's safety state to its candidates as ``serving:*`` flags, for the filters.

Runs as a filter-state hydrator of the pipeline (between the merge and the filters), so the
filters stay pure and synchronous: each reads one flag. Every candidate gets every flag, true or
false; a filter that finds a flag missing knows the pipeline was wired without this stage.
"""

from __future__ import annotations

from typing import Final

from core.types import Candidate, FeatureMap, RequestContext
from features.candidate_refs import (
    SERVING_BLOCKED_CREATOR,
    SERVING_BLOCKED_ITEM,
    SERVING_EXCLUDED,
    SERVING_REMOVED,
    SERVING_USER_BLOCKED_CREATOR,
)
from features.request_state import RequestState, RequestStateLoader

_FlagKey = tuple[bool, bool, bool, bool, bool]
_FLAG_MAPS: Final[dict[_FlagKey, FeatureMap]] = {}
"""The 32 possible flag maps, built on first use: candidates share them instead of each building one."""


def _flag_map(key: _FlagKey) -> FeatureMap:
    found = _FLAG_MAPS.get(key)
    if found is None:
        removed, blocked_item, blocked_creator, user_blocked, excluded = key
        found = FeatureMap(
            {
                SERVING_REMOVED: removed,
                SERVING_BLOCKED_ITEM: blocked_item,
                SERVING_BLOCKED_CREATOR: blocked_creator,
                SERVING_USER_BLOCKED_CREATOR: user_blocked,
                SERVING_EXCLUDED: excluded,
            }
        )
        _FLAG_MAPS[key] = found
    return found


def flags_of(state: RequestState, item_id: str) -> FeatureMap:
    """The ``serving:*`` flags of one item under ``state``."""
    return _flag_map(
        (
            item_id in state.removed,
            item_id in state.blocked_items,
            state.is_creator_blocked(item_id),
            state.is_creator_blocked_by_user(item_id),
            item_id in state.excluded,
        )
    )


class ServingStateHydrator:
    """Loads the request's :class:`~features.request_state.RequestState` and flags each candidate.

    Output keeps the input's length and order (the ``FeatureHydrator`` contract).

    Args:
        loader: Reads the state from Redis.
        name: Stage id.
        budget_ms: Time the read may take; the request fails when it is late, since filtering
            without this state is not allowed.
    """

    def __init__(
        self, loader: RequestStateLoader, *, name: str = "serving_state", budget_ms: float = 15.0
    ) -> None:
        self.name = name
        self.budget_ms = budget_ms
        self._loader = loader

    async def hydrate(self, ctx: RequestContext, cands: list[Candidate]) -> list[Candidate]:
        """Attach the ``serving:*`` flags to every candidate.

        Args:
            ctx: The request.
            cands: Merged candidates (each item once).

        Returns:
            ``cands``, each with the five flags in its features.

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        state = await self._loader.load(ctx, list(dict.fromkeys(c.item_id for c in cands)))
        # Almost every candidate is clear of every flag; only those in one of the (small) sets
        # need their five flags worked out.
        clear = _flag_map((False, False, False, False, False))
        flagged = state.removed | state.blocked_items | state.excluded
        creators = state.blocked_creators | state.user_blocked_creators
        creator_of = state.creator_of
        for cand in cands:
            item_id = cand.item_id
            if item_id in flagged or (creators and creator_of.get(item_id) in creators):
                flags = flags_of(state, item_id)
            else:
                flags = clear
            cand.features = cand.features.union(flags)
        return cands
