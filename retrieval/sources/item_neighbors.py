"""The item-item table interface the history-based sources read, and an in-memory table.

The trained table (:class:`retrieval.item_similarity.ItemSimilarityTable`, built from
co-occurrence or from item embeddings) satisfies :class:`ItemNeighbors` as it is; the in-memory
one serves precomputed dicts and tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class ItemNeighbors(Protocol):
    """Most similar items of an item, best first."""

    def neighbors(self, item_id: str, k: int) -> list[tuple[str, float]]:
        """The ``k`` nearest neighbours of ``item_id``.

        Args:
            item_id: The item.
            k: At most this many.

        Returns:
            ``(neighbor_id, similarity)``, best first, never the item itself; empty for an item
            the table does not know.
        """
        ...


class InMemoryItemNeighbors:
    """An :class:`ItemNeighbors` over a dict of precomputed neighbour lists.

    Args:
        table: Item id to its neighbours with similarities, in any order; the item itself and
            repeated neighbours are dropped, the best similarity of a repeat kept.
    """

    def __init__(self, table: Mapping[str, Sequence[tuple[str, float]]]) -> None:
        self._table: dict[str, list[tuple[str, float]]] = {}
        for item_id, pairs in table.items():
            best: dict[str, float] = {}
            for neighbor, similarity in pairs:
                if neighbor != item_id and similarity > best.get(neighbor, float("-inf")):
                    best[neighbor] = float(similarity)
            self._table[item_id] = sorted(best.items(), key=lambda pair: (-pair[1], pair[0]))

    def __len__(self) -> int:
        return len(self._table)

    def neighbors(self, item_id: str, k: int) -> list[tuple[str, float]]:
        """The ``k`` nearest neighbours of ``item_id``, best first (see :class:`ItemNeighbors`)."""
        return self._table.get(item_id, [])[: max(k, 0)]
