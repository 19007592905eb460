"""A sparse user-item matrix in plain numpy, and the item-item cosine computed from it.

scipy is not a dependency of rayrec, so the matrix is held as two compressed index arrays (by
user and by item) and ``X[:, rows]^T X`` is computed by joining them on the user: the work is
the number of (item in block, co-interacted item) pairs, not users x items.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

from retrieval.item_index import Positions

DEFAULT_BLOCK_CELLS: Final = 1 << 22
"""Dense co-occurrence cells accumulated at once (32 MiB of float64)."""


def _concat_ranges(starts: Positions, lengths: Positions) -> Positions:
    """Indices ``starts[0]..starts[0]+lengths[0]-1, starts[1]..``, concatenated, without a loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    run_starts = np.cumsum(lengths) - lengths
    return np.repeat(starts - run_starts, lengths) + np.arange(total, dtype=np.int64)


def _indptr(keys: Positions, size: int) -> Positions:
    """Row pointers of a compressed layout whose rows are ``keys`` (sorted)."""
    indptr = np.zeros(size + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys, minlength=size), out=indptr[1:])
    return indptr


@dataclass(frozen=True)
class InteractionMatrix:
    """Users x items interaction strengths, compressed both by user and by item.

    Attributes:
        num_users: Rows.
        num_items: Columns.
        user_indptr: ``(num_users + 1,)``; user ``u``'s entries are ``user_indptr[u]:user_indptr[u+1]``.
        user_items: Item of each by-user entry.
        user_values: Value of each by-user entry.
        item_indptr: ``(num_items + 1,)``; item ``i``'s entries are ``item_indptr[i]:item_indptr[i+1]``.
        item_users: User of each by-item entry.
        item_values: Value of each by-item entry.
        item_norms: L2 norm of each item's column.
    """

    num_users: int
    num_items: int
    user_indptr: Positions
    user_items: Positions
    user_values: NDArray[np.float64]
    item_indptr: Positions
    item_users: Positions
    item_values: NDArray[np.float64]
    item_norms: NDArray[np.float64]

    @classmethod
    def from_interactions(
        cls,
        user_positions: NDArray[np.integer],
        item_positions: NDArray[np.integer],
        *,
        num_items: int,
        num_users: int | None = None,
        values: NDArray[np.floating] | None = None,
    ) -> InteractionMatrix:
        """Build the matrix from interaction triples; repeated (user, item) pairs are summed.

        Args:
            user_positions: User index of each interaction.
            item_positions: Item index of each interaction, in ``[0, num_items)``.
            num_items: Columns.
            num_users: Rows; one past the largest user index when omitted.
            values: Strength of each interaction; ``None`` counts each (user, item) pair once,
                however often it repeats, which keeps heavy repeat users from dominating.

        Returns:
            The matrix.

        Raises:
            ValueError: Arrays of different lengths or indexes out of range.
        """
        users = np.asarray(user_positions, dtype=np.int64)
        items = np.asarray(item_positions, dtype=np.int64)
        if users.shape != items.shape or users.ndim != 1:
            raise ValueError(
                f"user and item positions must be 1-D of one length, got {users.shape} {items.shape}"
            )
        rows = int(users.max()) + 1 if num_users is None and users.size else (num_users or 0)
        if users.size and (
            users.min() < 0 or users.max() >= rows or items.min() < 0 or items.max() >= num_items
        ):
            raise ValueError(f"positions out of range for a {rows} x {num_items} matrix")
        keys, inverse = np.unique(users * num_items + items, return_inverse=True)
        if values is None:
            merged = np.ones(keys.size, dtype=np.float64)
        else:
            weights = np.asarray(values, dtype=np.float64)
            if weights.shape != users.shape:
                raise ValueError(f"values shape {weights.shape} differs from positions shape {users.shape}")
            merged = np.bincount(inverse.ravel(), weights=weights, minlength=keys.size)
        by_user_user, by_user_item = np.divmod(keys, num_items)
        # np.unique sorts by user, then item: the by-user layout comes for free.
        order = np.lexsort((by_user_user, by_user_item))
        item_values = merged[order]
        norms = np.sqrt(np.bincount(by_user_item, weights=merged * merged, minlength=num_items))
        return cls(
            num_users=rows,
            num_items=num_items,
            user_indptr=_indptr(by_user_user, rows),
            user_items=by_user_item,
            user_values=merged,
            item_indptr=_indptr(by_user_item[order], num_items),
            item_users=by_user_user[order],
            item_values=item_values,
            item_norms=norms,
        )

    def cooccurrence(self, item_rows: Positions) -> NDArray[np.float64]:
        """``X[:, item_rows]^T X``: for each row item, its summed value products with every item.

        Args:
            item_rows: Items to compute rows for.

        Returns:
            ``(len(item_rows), num_items)`` dense block.
        """
        rows = np.asarray(item_rows, dtype=np.int64)
        starts = self.item_indptr[rows]
        entries = _concat_ranges(starts, self.item_indptr[rows + 1] - starts)
        local = np.repeat(np.arange(rows.size, dtype=np.int64), self.item_indptr[rows + 1] - starts)
        users = self.item_users[entries]
        user_starts = self.user_indptr[users]
        user_lengths = self.user_indptr[users + 1] - user_starts
        pairs = _concat_ranges(user_starts, user_lengths)
        keys = np.repeat(local, user_lengths) * self.num_items + self.user_items[pairs]
        weights = np.repeat(self.item_values[entries], user_lengths) * self.user_values[pairs]
        flat = np.bincount(keys, weights=weights, minlength=rows.size * self.num_items)
        # Weighted bincount sums in float64 already; the cast only states it for the type checker.
        return flat.astype(np.float64, copy=False).reshape(rows.size, self.num_items)

    def cosine(self, item_rows: Positions) -> NDArray[np.float32]:
        """Item-item cosine similarity of ``item_rows`` against every item.

        Items sharing no user score 0; an item with no interactions scores 0 against everything.

        Args:
            item_rows: Items to compute rows for.

        Returns:
            ``(len(item_rows), num_items)`` float32 block.
        """
        rows = np.asarray(item_rows, dtype=np.int64)
        block = self.cooccurrence(rows)
        denominator = np.outer(self.item_norms[rows], self.item_norms)
        np.divide(block, denominator, out=block, where=denominator > 0)
        return block.astype(np.float32)

    def rows_per_block(self, block_cells: int = DEFAULT_BLOCK_CELLS) -> int:
        """Item rows whose dense cosine block fits in ``block_cells`` cells.

        Args:
            block_cells: Cell budget.

        Returns:
            At least 1.
        """
        return max(1, block_cells // max(1, self.num_items))
