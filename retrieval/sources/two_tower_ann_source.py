"""Two-tower retrieval: the user tower's embedding searched against the item index.

The source owns no model and no index. It takes a callable that turns the request (its recent
history) into the user embedding, and an :class:`EmbeddingRetriever` that answers nearest-item
queries; :class:`IndexEmbeddingRetriever` adapts any index with ``ids`` and ``search(queries, k)``
(the exact and ScaNN indexes of :mod:`retrieval` both qualify).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from core.types import Candidate, RequestContext
from features.user_context import recent_events

UserEmbedder = Callable[[RequestContext], Awaitable[NDArray[np.float32] | None]]
"""Produces the user embedding for a request, or None when it cannot (no history, no model)."""


class VectorIndex(Protocol):
    """Maximum-inner-product search over item embeddings."""

    @property
    def ids(self) -> Sequence[str]:
        """Item id by position."""
        ...

    def search(self, queries: NDArray[np.floating], k: int) -> tuple[NDArray[np.int64], NDArray[np.floating]]:
        """``(positions, scores)`` of shape ``(num_queries, k)``, best first; unfilled slots -1/-inf."""
        ...


@runtime_checkable
class EmbeddingRetriever(Protocol):
    """Nearest items of a user vector."""

    def retrieve(self, query: NDArray[np.float32], k: int) -> list[tuple[str, float]]:
        """The ``k`` items with the highest inner product with ``query``.

        Args:
            query: ``(dim,)`` user embedding.
            k: How many.

        Returns:
            ``(item_id, score)``, best first.
        """
        ...


class IndexEmbeddingRetriever:
    """An :class:`EmbeddingRetriever` over a :class:`VectorIndex`.

    Args:
        index: The item index.
    """

    def __init__(self, index: VectorIndex) -> None:
        self._index = index

    def retrieve(self, query: NDArray[np.float32], k: int) -> list[tuple[str, float]]:
        """Search one query (see :class:`EmbeddingRetriever`)."""
        positions, scores = self._index.search(np.asarray(query, dtype=np.float32)[np.newaxis, :], k)
        # Filtered as arrays and looked up in one pass: per-element numpy calls were most of this.
        keep = (positions[0] >= 0) & np.isfinite(scores[0])
        kept: list[int] = positions[0][keep].tolist()
        ids = self._index.ids
        take = getattr(ids, "take", None)
        names: list[str] = take(kept) if take is not None else [ids[p] for p in kept]
        return list(zip(names, scores[0][keep].tolist(), strict=True))


class TwoTowerAnnSource:
    """Candidates nearest to the user embedding.

    The search runs in a worker thread so a large index does not stall the event loop. Items the
    user already interacted with are over-fetched and dropped. Scores are divided by the best
    one, so they compare with the other sources' ``(0, 1]`` range.

    Args:
        embed_user: Builds the user embedding from the request.
        retriever: Answers nearest-item queries.
        name: Stage id.
        budget_ms: Time the source may take (embedding and search together).
        max_candidates: How many candidates at most.
    """

    def __init__(
        self,
        embed_user: UserEmbedder,
        retriever: EmbeddingRetriever,
        *,
        name: str = "two_tower_ann",
        budget_ms: float = 20.0,
        max_candidates: int = 300,
    ) -> None:
        self.name = name
        self.budget_ms = budget_ms
        self.max_candidates = max_candidates
        self._embed_user = embed_user
        self._retriever = retriever

    async def fetch(self, ctx: RequestContext) -> list[Candidate]:
        """Search the index with the user's embedding.

        Args:
            ctx: The request.

        Returns:
            Up to ``max_candidates`` candidates, best first; empty for a user who opted out or
            whose embedding cannot be built.
        """
        if not ctx.personalization:
            return []
        query = await self._embed_user(ctx)
        if query is None:
            return []
        consumed = {e.item_id for e in recent_events(ctx.user_features)}
        found = await asyncio.to_thread(self._retriever.retrieve, query, self.max_candidates + len(consumed))
        kept = [(i, s) for i, s in found if i not in consumed][: self.max_candidates]
        if not kept:
            return []
        top = kept[0][1]
        scale = top if top > 0 else 1.0
        return [
            Candidate(item_id=i, retrieval_score=max(s / scale, 0.0), reason="Picked for you")
            for i, s in kept
        ]
