"""The contract every item index meets, its metadata, and the top-k selection they share.

An index maps item embeddings to positions ``0..size-1``; ``ids[p]`` is the item id at
position ``p``. ``search`` scores by inner product (maximum-inner-product search) and always
returns arrays of shape ``(num_queries, k)``, best first; slots it cannot fill (fewer than ``k``
eligible items) hold position ``MISSING_POSITION`` and score ``-inf``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Final, Literal, TypeAlias

import numpy as np
from numpy.typing import NDArray
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from retrieval.ann_config import AnnConfig

MISSING_POSITION: Final = -1
"""Position of an unfilled result slot; its score is ``-inf``."""

Positions: TypeAlias = NDArray[np.int64]
Scores: TypeAlias = NDArray[np.float32]
Embeddings: TypeAlias = NDArray[np.float32]
SearchResult: TypeAlias = tuple[Positions, Scores]
"""``(positions, scores)``, both of shape ``(num_queries, k)``, best first."""

ExcludeIds: TypeAlias = Sequence[Collection[str]]
"""Per query, the item ids it must not return (already seen, hidden, the query item itself)."""


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("must be timezone-aware")
    return value


class IndexKind(StrEnum):
    """Which implementation an index directory holds."""

    EXACT = "exact"
    SCANN = "scann"


class IndexMetadata(BaseModel):
    """What an index directory says about itself (``metadata.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: IndexKind
    """Implementation that wrote the directory and can load it."""

    size: Annotated[int, Field(ge=0)]
    """Number of items indexed."""

    dim: Annotated[int, Field(ge=1)]
    """Embedding width."""

    config: AnnConfig | None
    """ANN parameters (with the tuned ``leaves_to_search``); ``None`` for an exact index."""

    recall_at_100: Annotated[float, Field(ge=0.0, le=1.0)]
    """Recall@100 against exact search measured at build time; 1.0 for an exact index."""

    built_at: Annotated[datetime, AfterValidator(_aware)]
    """When the index was built; items created after this belong in a ``DeltaIndex``."""

    format_version: Literal[1] = 1
    """Layout version of the directory."""


class ItemIndex(ABC):
    """Maximum-inner-product search over a fixed set of item embeddings."""

    _position_by_id: dict[str, int] | None = None

    @property
    @abstractmethod
    def ids(self) -> Sequence[str]:
        """Item ids by position."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """Embedding width."""

    @property
    def size(self) -> int:
        """Number of items."""
        return len(self.ids)

    @abstractmethod
    def search(
        self,
        queries: NDArray[np.floating],
        k: int,
        *,
        exclude: ExcludeIds | None = None,
        allowed: NDArray[np.bool_] | None = None,
    ) -> SearchResult:
        """The ``k`` items with the highest inner product with each query.

        Args:
            queries: ``(num_queries, dim)``, or ``(dim,)`` for one query.
            k: Results per query.
            exclude: Per query, item ids never returned for it.
            allowed: ``(size,)`` mask; only items where it is true are returned.

        Returns:
            ``(positions, scores)`` of shape ``(num_queries, k)``, best first, unfilled slots
            ``MISSING_POSITION`` / ``-inf``.
        """

    def position_of(self, item_id: str) -> int | None:
        """Position of ``item_id``, or ``None`` when the index does not hold it.

        Args:
            item_id: An item id.

        Returns:
            Its position.
        """
        if self._position_by_id is None:
            # Built on first use: most indexes only answer vector queries and never need it.
            self._position_by_id = {item_id: pos for pos, item_id in enumerate(self.ids)}
        return self._position_by_id.get(item_id)

    def item_ids(self, positions: Positions) -> list[list[str]]:
        """Map a search result's positions to item ids, dropping unfilled slots.

        Args:
            positions: ``(num_queries, k)`` positions from :meth:`search`.

        Returns:
            One list of ids per query, best first.
        """
        ids = self.ids
        return [[ids[p] for p in row if p != MISSING_POSITION] for row in positions.tolist()]

    def _check_queries(self, queries: NDArray[np.floating], k: int) -> Embeddings:
        batch = np.asarray(queries, dtype=np.float32)
        if batch.ndim == 1:
            batch = batch[np.newaxis, :]
        if batch.ndim != 2 or batch.shape[1] != self.dim:
            raise ValueError(f"queries must be (num_queries, {self.dim}), got {np.shape(queries)}")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if not np.isfinite(batch).all():
            raise ValueError("queries hold NaN or infinite values")
        return np.ascontiguousarray(batch)

    def _check_allowed(self, allowed: NDArray[np.bool_] | None) -> NDArray[np.bool_] | None:
        if allowed is None:
            return None
        mask = np.asarray(allowed)
        if mask.dtype != np.bool_ or mask.shape != (self.size,):
            raise ValueError(
                f"allowed must be a bool mask of shape ({self.size},), got {mask.dtype} {mask.shape}"
            )
        return mask

    def _exclude_positions(self, exclude: ExcludeIds | None, num_queries: int) -> list[Positions] | None:
        if exclude is None:
            return None
        if len(exclude) != num_queries:
            raise ValueError(f"exclude has {len(exclude)} entries for {num_queries} queries")
        out: list[Positions] = []
        for item_ids in exclude:
            # Ids this index does not hold cannot be returned anyway, so they are dropped here.
            found = [pos for pos in map(self.position_of, item_ids) if pos is not None]
            out.append(np.asarray(found, dtype=np.int64))
        return out


def empty_result(num_queries: int, k: int) -> SearchResult:
    """A result with every slot unfilled.

    Args:
        num_queries: Rows.
        k: Columns.

    Returns:
        ``(positions, scores)`` filled with ``MISSING_POSITION`` and ``-inf``.
    """
    return (
        np.full((num_queries, k), MISSING_POSITION, dtype=np.int64),
        np.full((num_queries, k), -np.inf, dtype=np.float32),
    )


def top_k_by_score(scores: NDArray[np.float32], k: int, columns: Positions | None = None) -> SearchResult:
    """Select the ``k`` best columns of each row of a score matrix, best first.

    ``-inf`` marks an ineligible column: it is never returned, and a row with fewer
    than ``k`` eligible columns is padded with ``MISSING_POSITION`` / ``-inf``.

    Args:
        scores: ``(rows, columns)`` scores, without NaN.
        k: Results per row.
        columns: Positions the columns stand for; ``None`` means column ``j`` is position ``j``.
            A ``(rows, columns)`` array gives each row its own mapping.

    Returns:
        ``(positions, scores)`` of shape ``(rows, k)``.
    """
    rows, width = scores.shape
    positions, best = empty_result(rows, k)
    take = min(k, width)
    if take == 0 or rows == 0:
        return positions, best
    if take < width:
        # The (width - take) smallest go left of the pivot, so the right part is the top ``take``;
        # partitioning the scores themselves avoids a negated copy of a large block.
        part = np.argpartition(scores, width - take, axis=1)[:, width - take :]
    else:
        part = np.broadcast_to(np.arange(width, dtype=np.int64), (rows, width))
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    top = np.take_along_axis(part, order, axis=1).astype(np.int64, copy=False)
    top_scores = np.take_along_axis(part_scores, order, axis=1)
    if columns is not None:
        top = np.take_along_axis(columns, top, axis=1) if columns.ndim == 2 else columns[top]
    filled = top_scores > -np.inf
    positions[:, :take] = np.where(filled, top, MISSING_POSITION)
    best[:, :take] = np.where(filled, top_scores, -np.inf)
    return positions, best
