"""A model gateway without models, so the read path runs in-process over Redis alone."""

from __future__ import annotations

from typing import Any

from deployments.wire import NO_MODEL, RankReply, RankRequest, RetrievalReply, RetrievalRequest

POPULAR_ITEMS = [(f"pop-{n}", 100.0 - n) for n in range(30)]
"""What the gateway's ``popular`` answers: the release's most popular items, best first."""


class NoModels:
    """The answers of ``retrieval`` and ``ranker`` deployments that serve no release."""

    async def retrieve(self, request: RetrievalRequest) -> RetrievalReply:
        return RetrievalReply(NO_MODEL, {s.name: [] for s in request.sources})

    async def rank(self, request: RankRequest) -> RankReply:
        return RankReply(NO_MODEL, None)

    async def popular(self, k: int) -> list[tuple[str, float]]:
        return POPULAR_ITEMS[:k]

    async def model_status(self) -> dict[str, Any]:
        return {"retrieval": {"version": NO_MODEL}, "ranker": {"version": NO_MODEL}}
