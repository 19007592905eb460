"""Top-K similar items per item, from embeddings or from co-occurrence, stored as an Arrow table.

The table is computed block by block with :func:`compute_block`, so a Ray Data pipeline can
spread it over workers (``ds.map_batches(lambda b: compute_block(b["item_row"], source, k))``);
:meth:`ItemSimilarityTable.from_source` runs the same blocks in-process.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Final, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.typing import NDArray

from retrieval.exact_index import DEFAULT_BLOCK_CELLS, as_embeddings, score_top_k
from retrieval.interaction_matrix import InteractionMatrix
from retrieval.item_index import MISSING_POSITION, ItemIndex, SearchResult, top_k_by_score

ITEM_SIMILARITY_SCHEMA: Final = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("neighbor_ids", pa.list_(pa.string()), nullable=False),
        pa.field("scores", pa.list_(pa.float32()), nullable=False),
    ]
)
"""One row per item: its neighbours best first, and their scores (same length)."""

DEFAULT_ROWS_PER_BLOCK: Final = 1024


class NeighborSource(Protocol):
    """Computes each item's most similar other items."""

    @property
    def item_ids(self) -> Sequence[str]:
        """Item ids by row."""
        ...

    def top_k(self, item_rows: NDArray[np.int64], k: int) -> SearchResult:
        """The ``k`` most similar items to each of ``item_rows``, never the item itself.

        Args:
            item_rows: Rows of the items to compute neighbours for.
            k: Neighbours per item.

        Returns:
            ``(rows, scores)`` of shape ``(len(item_rows), k)``, best first, unfilled slots
            ``MISSING_POSITION`` / ``-inf``.
        """
        ...


class EmbeddingNeighbors:
    """Neighbours by inner product of item embeddings (cosine when they are normalised).

    Exact by default; given an ``ItemIndex`` over the same items in the same order (ScaNN for a
    large catalog), it searches that instead.
    """

    def __init__(
        self,
        embeddings: NDArray[np.floating],
        ids: Sequence[str],
        *,
        index: ItemIndex | None = None,
        block_cells: int = DEFAULT_BLOCK_CELLS,
    ) -> None:
        """Prepare the source.

        Args:
            embeddings: ``(num_items, dim)`` vectors; row ``p`` is ``ids[p]``.
            ids: Unique item ids.
            index: Optional index over the same items in the same positions.
            block_cells: Score cells per block of the exact search.

        Raises:
            ValueError: ``index`` holds other items or another order.
        """
        self._embeddings = as_embeddings(embeddings, ids)
        self._ids: tuple[str, ...] = tuple(ids)
        if index is not None and tuple(index.ids) != self._ids:
            raise ValueError("index must hold the same item ids in the same positions as the embeddings")
        self._index = index
        self._block_cells = block_cells

    @property
    def item_ids(self) -> Sequence[str]:
        """Item ids by row."""
        return self._ids

    def top_k(self, item_rows: NDArray[np.int64], k: int) -> SearchResult:
        """The ``k`` nearest other items of each of ``item_rows`` by inner product.

        Args:
            item_rows: Rows of the items to compute neighbours for.
            k: Neighbours per item.

        Returns:
            ``(rows, scores)`` of shape ``(len(item_rows), k)``, best first.
        """
        rows = np.asarray(item_rows, dtype=np.int64)
        queries = self._embeddings[rows]
        if self._index is not None:
            return self._index.search(queries, k, exclude=[(self._ids[row],) for row in rows.tolist()])
        return score_top_k(
            queries,
            self._embeddings,
            k,
            excluded=[np.array([row], dtype=np.int64) for row in rows.tolist()],
            block_cells=self._block_cells,
        )


class CooccurrenceNeighbors:
    """Neighbours by item-item cosine over the users who interacted with both items.

    Items that share no user are never neighbours, so an item with few interactions can have
    fewer than ``k`` neighbours.
    """

    def __init__(
        self, matrix: InteractionMatrix, ids: Sequence[str], *, block_cells: int | None = None
    ) -> None:
        """Prepare the source.

        Args:
            matrix: Users x items interactions; column ``p`` is ``ids[p]``.
            ids: Unique item ids.
            block_cells: Dense cells per computed block; the matrix's default when omitted.

        Raises:
            ValueError: ``ids`` does not match the matrix's columns or repeats.
        """
        if len(ids) != matrix.num_items or len(set(ids)) != len(ids):
            raise ValueError(f"need {matrix.num_items} unique ids, got {len(ids)}")
        self._matrix = matrix
        self._ids: tuple[str, ...] = tuple(ids)
        self._rows_per_block = (
            matrix.rows_per_block() if block_cells is None else matrix.rows_per_block(block_cells)
        )

    @property
    def item_ids(self) -> Sequence[str]:
        """Item ids by row."""
        return self._ids

    def top_k(self, item_rows: NDArray[np.int64], k: int) -> SearchResult:
        """The ``k`` other items with the highest co-occurrence cosine to each of ``item_rows``.

        Args:
            item_rows: Rows of the items to compute neighbours for.
            k: Neighbours per item.

        Returns:
            ``(rows, scores)`` of shape ``(len(item_rows), k)``, best first.
        """
        rows = np.asarray(item_rows, dtype=np.int64)
        parts: list[SearchResult] = []
        for start in range(0, rows.size, self._rows_per_block):
            chunk = rows[start : start + self._rows_per_block]
            block = self._matrix.cosine(chunk)
            block[block <= 0.0] = -np.inf
            block[np.arange(chunk.size), chunk] = -np.inf
            parts.append(top_k_by_score(block, k))
        if not parts:
            return top_k_by_score(np.empty((0, self._matrix.num_items), dtype=np.float32), k)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def compute_block(item_rows: NDArray[np.integer], source: NeighborSource, k: int) -> pa.Table:
    """Neighbour rows for one block of items: the unit of work of a distributed build.

    Args:
        item_rows: Rows (in ``source.item_ids``) of the items of this block.
        source: Where similarities come from.
        k: Neighbours per item.

    Returns:
        A table with ``ITEM_SIMILARITY_SCHEMA``, one row per item of the block, in order.
    """
    rows = np.asarray(item_rows, dtype=np.int64)
    assert rows.ndim == 1, f"item_rows must be 1-D, got shape {rows.shape}"
    positions, scores = source.top_k(rows, k)
    assert positions.shape == (rows.size, k), f"source returned {positions.shape} for {rows.size} rows, k={k}"
    ids = source.item_ids
    filled = positions != MISSING_POSITION
    lengths = filled.sum(axis=1)
    offsets = np.zeros(rows.size + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    # Slots are filled best-first, so the row-major filled entries are each row's list in order.
    flat_positions = positions[filled].tolist()
    neighbor_ids = pa.ListArray.from_arrays(
        pa.array(offsets), pa.array([ids[p] for p in flat_positions], type=pa.string())
    )
    neighbor_scores = pa.ListArray.from_arrays(pa.array(offsets), pa.array(scores[filled], type=pa.float32()))
    item_ids = pa.array([ids[row] for row in rows.tolist()], type=pa.string())
    return pa.Table.from_arrays([item_ids, neighbor_ids, neighbor_scores], schema=ITEM_SIMILARITY_SCHEMA)


class ItemSimilarityTable:
    """Precomputed top-K similar items per item, with lookup by item id.

    Example:
        >>> vectors = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], dtype=np.float32)
        >>> table = ItemSimilarityTable.from_embeddings(vectors, ["a", "b", "c"], k=1)
        >>> table.neighbors("a", 1)
        [('b', 0.8999999761581421)]
    """

    def __init__(self, table: pa.Table) -> None:
        """Wrap a table with ``ITEM_SIMILARITY_SCHEMA``.

        Args:
            table: One row per item.

        Raises:
            ValueError: Another schema, or an item id that repeats.
        """
        if not table.schema.equals(ITEM_SIMILARITY_SCHEMA):
            raise ValueError(f"expected schema {ITEM_SIMILARITY_SCHEMA}, got {table.schema}")
        self._table = table.combine_chunks()
        item_ids: list[str] = self._table.column("item_id").to_pylist()
        self._row_by_id = {item_id: row for row, item_id in enumerate(item_ids)}
        if len(self._row_by_id) != len(item_ids):
            raise ValueError("item ids repeat in the similarity table")
        self._neighbor_ids = self._table.column("neighbor_ids").chunk(0) if self._table.num_rows else None
        self._scores = self._table.column("scores").chunk(0) if self._table.num_rows else None

    @property
    def table(self) -> pa.Table:
        """The Arrow table."""
        return self._table

    def __len__(self) -> int:
        return int(self._table.num_rows)

    def neighbors(self, item_id: str, k: int | None = None) -> list[tuple[str, float]]:
        """The stored neighbours of an item, best first.

        Args:
            item_id: The item.
            k: At most this many; all stored when omitted.

        Returns:
            ``(neighbor_id, score)`` pairs; empty for an item the table does not know (a new
            item has no neighbours until the next build).
        """
        row = self._row_by_id.get(item_id)
        if row is None or self._neighbor_ids is None or self._scores is None:
            return []
        ids: list[str] = self._neighbor_ids[row].values.to_pylist()
        scores: list[float] = self._scores[row].values.to_pylist()
        limit = len(ids) if k is None else k
        return list(zip(ids[:limit], scores[:limit], strict=True))

    @classmethod
    def from_blocks(cls, blocks: Iterable[pa.Table]) -> ItemSimilarityTable:
        """Assemble the table from :func:`compute_block` outputs.

        Args:
            blocks: Tables with ``ITEM_SIMILARITY_SCHEMA``.

        Returns:
            The table.
        """
        return cls(pa.concat_tables([ITEM_SIMILARITY_SCHEMA.empty_table(), *blocks]))

    @classmethod
    def from_source(
        cls, source: NeighborSource, k: int, *, rows_per_block: int = DEFAULT_ROWS_PER_BLOCK
    ) -> ItemSimilarityTable:
        """Compute every item's neighbours in-process, block by block.

        Args:
            source: Where similarities come from.
            k: Neighbours per item.
            rows_per_block: Items per block.

        Returns:
            The table, rows in ``source.item_ids`` order.
        """
        assert rows_per_block >= 1, f"rows_per_block must be positive, got {rows_per_block}"
        num_items = len(source.item_ids)
        return cls.from_blocks(
            compute_block(np.arange(start, min(start + rows_per_block, num_items)), source, k)
            for start in range(0, num_items, rows_per_block)
        )

    @classmethod
    def from_embeddings(
        cls,
        embeddings: NDArray[np.floating],
        ids: Sequence[str],
        k: int,
        *,
        index: ItemIndex | None = None,
    ) -> ItemSimilarityTable:
        """Neighbours by embedding inner product, exact or through ``index``.

        Args:
            embeddings: ``(num_items, dim)`` vectors; row ``p`` is ``ids[p]``.
            ids: Unique item ids.
            k: Neighbours per item.
            index: Optional index over the same items in the same positions (ScaNN for large catalogs).

        Returns:
            The table.
        """
        return cls.from_source(EmbeddingNeighbors(embeddings, ids, index=index), k)

    @classmethod
    def from_interactions(
        cls,
        user_positions: NDArray[np.integer],
        item_positions: NDArray[np.integer],
        ids: Sequence[str],
        k: int,
        *,
        values: NDArray[np.floating] | None = None,
    ) -> ItemSimilarityTable:
        """Neighbours by co-occurrence cosine over a user-item interaction list.

        Args:
            user_positions: User index of each interaction.
            item_positions: Item index (into ``ids``) of each interaction.
            ids: Unique item ids.
            k: Neighbours per item.
            values: Interaction strengths; each (user, item) pair counts once when omitted.

        Returns:
            The table.
        """
        matrix = InteractionMatrix.from_interactions(
            user_positions, item_positions, num_items=len(ids), values=values
        )
        return cls.from_source(CooccurrenceNeighbors(matrix, ids), k)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the table to a Parquet file.

        Args:
            path: Target file.
        """
        pq.write_table(self._table, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ItemSimilarityTable:
        """Read a table written by :meth:`save`.

        Args:
            path: Parquet file.

        Returns:
            The table.
        """
        return cls(pq.read_table(path, schema=ITEM_SIMILARITY_SCHEMA))
