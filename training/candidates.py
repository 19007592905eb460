"""Candidate generation of the two-stage pipeline, shared by evaluation, ranker training and serving.

A user's candidates are the union of two sources, each candidate keeping the sources that produced
it:

* ``two_tower``: the two-tower model's top ``two_tower_k`` from the item index;
* ``collaborative``: EASE's best items (:class:`~training.collaborative.CollaborativeModel`) for
  the user's history, taken in EASE order until the union holds ``k`` items.

The union is returned in EASE order (two-tower items EASE ranks low come last), which is also the
order the ranker starts from. Without a collaborative model the candidates are the two-tower's
top ``k``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from training.collaborative import top_items

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

SOURCE_TWO_TOWER = "two_tower_ann"
"""Name of the two-tower source (as serving names it)."""

SOURCE_COLLABORATIVE = "collaborative"
"""Name of the EASE source (as serving names it)."""


@dataclass(frozen=True, eq=False)
class CandidateLists:
    """Candidate lists of a batch of users.

    Attributes:
        rows: ``(batch, k)`` catalog rows, ``-1`` for empty slots (always at the end).
        from_two_tower: Which candidates the two-tower source produced.
        from_collaborative: Which candidates the collaborative source produced.
    """

    rows: IntArray
    from_two_tower: BoolArray
    from_collaborative: BoolArray

    def sources(self, user: int, slot: int) -> tuple[str, ...]:
        """Names of the sources that produced one candidate."""
        names = []
        if self.from_two_tower[user, slot]:
            names.append(SOURCE_TWO_TOWER)
        if self.from_collaborative[user, slot]:
            names.append(SOURCE_COLLABORATIVE)
        return tuple(names)


def merge_candidates(two_tower_rows: IntArray, cf_scores: FloatArray | None, k: int) -> CandidateLists:
    """The union of the two-tower top rows and EASE's best items, up to ``k`` per user.

    Args:
        two_tower_rows: ``(batch, m)`` catalog rows of the two-tower's top items, best first,
            ``-1`` padded; items the user must not get are already left out.
        cf_scores: ``(batch, n_items)`` EASE scores with ``-inf`` on excluded items (history and
            anything else the caller excludes), or ``None`` without a collaborative model.
        k: Candidates per user.

    Returns:
        The candidate lists, in EASE order when ``cf_scores`` is given.
    """
    batch = two_tower_rows.shape[0]
    rows = np.full((batch, k), -1, dtype=np.int64)
    from_tt = np.zeros((batch, k), dtype=np.bool_)
    from_cf = np.zeros((batch, k), dtype=np.bool_)
    if cf_scores is None:
        width = min(k, two_tower_rows.shape[1])
        rows[:, :width] = two_tower_rows[:, :width]
        from_tt[:, :width] = two_tower_rows[:, :width] >= 0
        return CandidateLists(rows, from_tt, from_cf)
    n_items = cf_scores.shape[1]
    cf_top = top_items(cf_scores, k)
    for u in range(batch):
        tt = two_tower_rows[u][two_tower_rows[u] >= 0][:k]
        tt = tt[np.isfinite(cf_scores[u, tt])] if len(tt) else tt
        in_tt = np.zeros(n_items, dtype=np.bool_)
        in_tt[tt] = True
        order = cf_top[u][cf_top[u] >= 0]
        new = ~in_tt[order]
        # EASE's items are taken in order until the union is full; items already retrieved by the
        # two-tower cost no room.
        room = k - len(tt)
        taken = order[(np.cumsum(new) <= room) | ~new] if room > 0 else order[~new]
        union = np.union1d(tt, taken)
        union = union[np.argsort(-cf_scores[u, union], kind="stable")]
        n = len(union)
        rows[u, :n] = union
        from_tt[u, :n] = in_tt[union]
        in_cf = np.zeros(n_items, dtype=np.bool_)
        in_cf[taken] = True
        from_cf[u, :n] = in_cf[union]
    return CandidateLists(rows, from_tt, from_cf)


__all__ = ["SOURCE_COLLABORATIVE", "SOURCE_TWO_TOWER", "CandidateLists", "merge_candidates"]
