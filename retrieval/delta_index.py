"""Items added since an index was built, searched exactly beside it.

A ScaNN index is trained once; retraining for every new item would take minutes. ``DeltaIndex``
keeps the items created (or re-embedded) after the build in a small exact index and merges both
results by score, so a new item is retrievable as soon as its embedding is added. The next build
of the main index absorbs them, and a fresh ``DeltaIndex`` starts empty.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Sequence
from typing import Final, overload

import numpy as np
from numpy.typing import NDArray

from retrieval.exact_index import DEFAULT_BLOCK_CELLS, score_top_k
from retrieval.item_index import (
    MISSING_POSITION,
    Embeddings,
    ExcludeIds,
    ItemIndex,
    Positions,
    SearchResult,
    empty_result,
    top_k_by_score,
)

DEFAULT_MAX_ITEMS: Final = 100_000
"""Rows the delta holds before it refuses more: past this, exact search costs more than a rebuild."""

_INITIAL_CAPACITY: Final = 1024


class DeltaIndexFullError(RuntimeError):
    """Raised when the delta holds ``max_items`` rows: the main index must be rebuilt."""


class _CombinedIds(Sequence[str]):
    """The base index's ids followed by the delta's, without copying either."""

    def __init__(self, base: Sequence[str], delta: list[str], count: int) -> None:
        self._base = base
        self._delta = delta
        self._count = count

    def __len__(self) -> int:
        return len(self._base) + self._count

    def take(self, positions: Sequence[int]) -> list[str]:
        """The ids at some valid positions, without a method call per position."""
        base, delta, base_size = self._base, self._delta, len(self._base)
        return [base[p] if p < base_size else delta[p - base_size] for p in positions]

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...

    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        base_size = len(self._base)
        return self._base[index] if index < base_size else self._delta[index - base_size]


class DeltaIndex(ItemIndex):
    """A built index plus an exact index of the items added after it, searched as one.

    Positions ``0..base.size-1`` are the base index's; the delta's rows follow. Adding an id the
    base holds replaces its vector: the base entry is hidden from results from then on. Rows are
    only ever appended (a replaced delta row is marked dead), so a search that took a snapshot
    reads consistent data while another thread adds items.

    Example:
        >>> from retrieval.exact_index import ExactIndex
        >>> index = DeltaIndex(ExactIndex(np.eye(2, dtype=np.float32), ["a", "b"]))
        >>> index.add_items(["new"], np.array([[0.0, 5.0]], dtype=np.float32))
        >>> index.item_ids(index.search(np.array([0.0, 1.0]), k=2)[0])
        [['new', 'b']]
    """

    def __init__(
        self,
        base: ItemIndex,
        *,
        max_items: int = DEFAULT_MAX_ITEMS,
        block_cells: int = DEFAULT_BLOCK_CELLS,
    ) -> None:
        """Start an empty delta beside ``base``.

        Args:
            base: The built index (exact or ScaNN).
            max_items: Rows (including replaced ones) the delta holds before refusing more.
            block_cells: Score cells computed per block by the exact delta search.
        """
        assert max_items >= 1, f"max_items must be positive, got {max_items}"
        self._base = base
        self._max_items = max_items
        self._block_cells = block_cells
        self._lock = threading.Lock()
        self._vectors: Embeddings = np.empty((min(_INITIAL_CAPACITY, max_items), base.dim), dtype=np.float32)
        self._live = np.zeros(self._vectors.shape[0], dtype=np.bool_)
        self._delta_ids: list[str] = []
        self._row_by_id: dict[str, int] = {}
        # Base positions whose item has a newer vector in the delta, by item id.
        self._shadowed: dict[str, int] = {}

    @property
    def base(self) -> ItemIndex:
        """The built index."""
        return self._base

    @property
    def ids(self) -> Sequence[str]:
        """Item ids by position: the base's, then the delta's (dead rows keep their id)."""
        return _CombinedIds(self._base.ids, self._delta_ids, len(self._delta_ids))

    @property
    def dim(self) -> int:
        """Embedding width."""
        return self._base.dim

    @property
    def delta_size(self) -> int:
        """Rows in the delta, including replaced ones."""
        return len(self._delta_ids)

    def position_of(self, item_id: str) -> int | None:
        """Current position of ``item_id``: its latest delta row, else its base position.

        Args:
            item_id: An item id.

        Returns:
            Its position, or ``None`` when neither part holds it.
        """
        row = self._row_by_id.get(item_id)
        if row is not None:
            return self._base.size + row
        return self._base.position_of(item_id)

    def add_items(self, ids: Sequence[str], embeddings: NDArray[np.floating]) -> None:
        """Make items retrievable now: new ids are appended, known ids get their new vector.

        Args:
            ids: Item ids, unique within the call.
            embeddings: ``(len(ids), dim)`` vectors.

        Raises:
            ValueError: Shape, duplicate or non-finite input.
            DeltaIndexFullError: The delta would exceed ``max_items`` rows.
        """
        vectors = np.asarray(embeddings, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape != (len(ids), self.dim):
            raise ValueError(f"embeddings must be ({len(ids)}, {self.dim}), got {vectors.shape}")
        if len(set(ids)) != len(ids):
            raise ValueError("ids must be unique within one add_items call")
        if not np.isfinite(vectors).all():
            raise ValueError("embeddings hold NaN or infinite values")
        with self._lock:
            count = len(self._delta_ids)
            if count + len(ids) > self._max_items:
                raise DeltaIndexFullError(
                    f"delta holds {count} of {self._max_items} rows; "
                    f"rebuild the main index to add {len(ids)} more"
                )
            self._reserve(count + len(ids))
            self._vectors[count : count + len(ids)] = vectors
            for offset, item_id in enumerate(ids):
                row = count + offset
                previous = self._row_by_id.get(item_id)
                if previous is not None:
                    self._live[previous] = False
                else:
                    base_position = self._base.position_of(item_id)
                    if base_position is not None:
                        self._shadowed[item_id] = base_position
                self._row_by_id[item_id] = row
                self._live[row] = True
                # Appended last: a reader sizing its snapshot by this list never sees a half-written row.
                self._delta_ids.append(item_id)

    def _reserve(self, rows: int) -> None:
        if rows <= self._vectors.shape[0]:
            return
        capacity = min(self._max_items, max(rows, 2 * self._vectors.shape[0]))
        # New arrays instead of resizing in place: a concurrent search keeps reading the old ones.
        vectors = np.empty((capacity, self.dim), dtype=np.float32)
        live = np.zeros(capacity, dtype=np.bool_)
        used = len(self._delta_ids)
        vectors[:used] = self._vectors[:used]
        live[:used] = self._live[:used]
        self._vectors, self._live = vectors, live

    def search(
        self,
        queries: NDArray[np.floating],
        k: int,
        *,
        exclude: ExcludeIds | None = None,
        allowed: NDArray[np.bool_] | None = None,
    ) -> SearchResult:
        """The ``k`` best items of the base and the delta together, merged by score.

        Args:
            queries: ``(num_queries, dim)``, or ``(dim,)`` for one query.
            k: Results per query.
            exclude: Per query, item ids never returned for it.
            allowed: Mask over ``size`` positions as of this call (base, then delta rows).

        Returns:
            ``(positions, scores)`` of shape ``(num_queries, k)``, best first, unfilled slots
            ``MISSING_POSITION`` / ``-inf``.
        """
        batch = self._check_queries(queries, k)
        with self._lock:
            count = len(self._delta_ids)
            vectors = self._vectors[:count]
            live = self._live[:count].copy()
            shadowed = np.fromiter(self._shadowed.values(), dtype=np.int64, count=len(self._shadowed))
        base_size = self._base.size
        mask = None if allowed is None else np.asarray(allowed)
        if mask is not None and (mask.dtype != np.bool_ or mask.shape != (base_size + count,)):
            raise ValueError(f"allowed must be a bool mask of shape ({base_size + count},), got {mask.shape}")
        if exclude is not None and len(exclude) != batch.shape[0]:
            raise ValueError(f"exclude has {len(exclude)} entries for {batch.shape[0]} queries")
        if k == 0:
            return empty_result(batch.shape[0], k)

        # Hidden base entries are over-fetched for and dropped. Over-fetching is capped at k so an
        # index with many re-embedded items keeps its latency; past that the base part can come
        # back short of k, and the merged list leans on the delta part.
        base_k = k + min(shadowed.size, k)
        base_positions, base_scores = self._base.search(
            batch,
            base_k,
            exclude=exclude,
            allowed=None if mask is None else mask[:base_size],
        )
        if shadowed.size:
            base_scores[np.isin(base_positions, shadowed)] = -np.inf

        blocked = ~live if mask is None else ~(live & mask[base_size:])
        delta_positions, delta_scores = score_top_k(
            batch,
            vectors,
            k,
            blocked=np.flatnonzero(blocked),
            excluded=None if exclude is None else [self._delta_rows(ids, count) for ids in exclude],
            block_cells=self._block_cells,
        )
        delta_positions = np.where(
            delta_positions == MISSING_POSITION, MISSING_POSITION, delta_positions + base_size
        )
        merged_positions = np.concatenate([base_positions, delta_positions], axis=1)
        merged_scores = np.concatenate([base_scores, delta_scores], axis=1)
        return top_k_by_score(merged_scores, k, merged_positions)

    def _delta_rows(self, item_ids: Collection[str], count: int) -> Positions:
        rows = [row for row in map(self._row_by_id.get, item_ids) if row is not None and row < count]
        return np.asarray(rows, dtype=np.int64)
