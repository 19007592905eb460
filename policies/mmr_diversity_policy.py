"""Diversity by maximal marginal relevance (MMR) over the top of the list."""

from __future__ import annotations

import math
from typing import cast

import numpy as np
from numpy.typing import NDArray

from core.types import Candidate, RequestContext
from features.candidate_refs import ITEM_CATEGORY, ITEM_EMBEDDING, ITEM_TAGS
from policies.sponsored_marks import split_sponsored


def content_keys(cand: Candidate) -> frozenset[str]:
    """The candidate's category and tags as one set, for Jaccard similarity."""
    category = cand.features.get_str(ITEM_CATEGORY, "")
    tags = cand.features.get_strings(ITEM_TAGS, ())
    keys = {f"t:{tag}" for tag in tags}
    if category:
        keys.add(f"c:{category}")
    return frozenset(keys)


def _unit(vector: tuple[float, ...]) -> NDArray[np.float64] | None:
    if not vector:
        return None
    array = np.asarray(vector, dtype=np.float64)
    # What np.linalg.norm computes for a vector, without its argument handling (60 a request).
    norm = math.sqrt(float(array.dot(array)))
    return array / norm if norm > 0 and math.isfinite(norm) else None


class _Similarity:
    """Pairwise similarity of a pool: cosine of embeddings where both have one, else Jaccard."""

    def __init__(self, pool: list[Candidate]) -> None:
        self._pool = pool
        self._content_keys: list[frozenset[str]] | None = None
        self._vectors = [_unit(c.features.get_vector(ITEM_EMBEDDING, ())) for c in pool]

    @property
    def _keys(self) -> list[frozenset[str]]:
        # Built on first use: a pool whose items all carry embeddings never needs them.
        if self._content_keys is None:
            self._content_keys = [content_keys(c) for c in self._pool]
        return self._content_keys

    def __call__(self, i: int, j: int) -> float:
        a, b = self._vectors[i], self._vectors[j]
        if a is not None and b is not None and a.shape == b.shape:
            return float(a @ b)
        return self._jaccard(i, j)

    def _jaccard(self, i: int, j: int) -> float:
        ka, kb = self._keys[i], self._keys[j]
        if not ka or not kb:
            return 0.0
        return len(ka & kb) / len(ka | kb)

    def matrix(self) -> NDArray[np.float64]:
        """Every pair's similarity at once: one matrix product per embedding size, Jaccard elsewhere."""
        n = len(self._vectors)
        out = np.zeros((n, n), dtype=np.float64)
        covered = np.zeros((n, n), dtype=bool)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, vector in enumerate(self._vectors):
            if vector is not None:
                by_shape.setdefault(vector.shape, []).append(i)
        vectors = cast(list[NDArray[np.float64]], self._vectors)
        for rows in by_shape.values():
            block = np.stack([vectors[i] for i in rows])
            cells = np.ix_(rows, rows)
            out[cells] = block @ block.T
            covered[cells] = True
        if not covered.all():
            jaccard = self._jaccard_matrix()
            out[~covered] = jaccard[~covered]
        return out

    def _jaccard_matrix(self) -> NDArray[np.float64]:
        """Every pair's Jaccard similarity of category and tags (0 where either has none)."""
        column: dict[str, int] = {}
        rows: list[int] = []
        cols: list[int] = []
        for i, keys in enumerate(self._keys):
            for key in keys:
                rows.append(i)
                cols.append(column.setdefault(key, len(column)))
        member = np.zeros((len(self._keys), max(1, len(column))), dtype=np.float64)
        member[rows, cols] = 1.0
        shared = member @ member.T
        sizes = member.sum(axis=1)
        union = sizes[:, None] + sizes[None, :] - shared
        jaccard: NDArray[np.float64] = np.divide(shared, union, out=np.zeros_like(shared), where=union > 0)
        return jaccard


def intra_list_similarity(cands: list[Candidate]) -> float:
    """Mean pairwise similarity of a list (lower is more diverse); 0.0 below two items."""
    n = len(cands)
    if n < 2:
        return 0.0
    sim = _Similarity(cands)
    return sum(sim(i, j) for i in range(n) for j in range(i + 1, n)) / (n * (n - 1) / 2)


class MmrDiversityPolicy:
    """Re-orders the top of the list by MMR: ``λ * relevance - (1 - λ) * max similarity to the chosen``.

    Relevance is the score min-max scaled over the pool; similarity is the cosine of
    ``item:embedding`` when both items carry one, else the Jaccard similarity of their category
    and tags. Only the best ``pool_size`` organic candidates (at least ``ctx.limit``) are
    re-ordered, which bounds the O(pool²) cost; the rest follow in their order, then the
    sponsored candidates.

    Args:
        diversity_lambda: 1.0 keeps the ranking, 0.0 maximises diversity.
        pool_size: Candidates re-ordered, at least ``ctx.limit``.
        name: Stage id.
    """

    def __init__(
        self, diversity_lambda: float = 0.7, pool_size: int = 60, *, name: str = "mmr_diversity"
    ) -> None:
        if not 0.0 <= diversity_lambda <= 1.0:
            raise ValueError(f"diversity_lambda must be in [0, 1], got {diversity_lambda}")
        if pool_size < 1:
            raise ValueError(f"pool_size must be at least 1, got {pool_size}")
        self.name = name
        self.diversity_lambda = diversity_lambda
        self.pool_size = pool_size

    def apply(self, ctx: RequestContext, ranked: list[Candidate]) -> list[Candidate]:
        """The MMR order of the pool, then the rest, then the sponsored candidates."""
        organic, sponsored = split_sponsored(ranked)
        size = max(self.pool_size, ctx.limit)
        pool, rest = organic[:size], organic[size:]
        if len(pool) < 3 or self.diversity_lambda >= 1.0:
            return organic + sponsored
        scores = [c.score for c in pool]
        low, high = min(scores), max(scores)
        span = high - low
        relevance = [(s - low) / span if span > 0 else 1.0 for s in scores]
        similarity = _Similarity(pool).matrix()
        lam = self.diversity_lambda
        penalty = 1.0 - lam
        weighted = lam * np.asarray(relevance, dtype=np.float64)
        closest = np.zeros(len(pool), dtype=np.float64)
        chosen = np.zeros(len(pool), dtype=bool)
        order: list[int] = []
        for _ in range(len(pool)):
            value = weighted - penalty * closest
            value[chosen] = -np.inf
            # argmax takes the first of equal values: ties go to the better-ranked candidate.
            best = int(value.argmax())
            chosen[best] = True
            order.append(best)
            np.maximum(closest, similarity[best], out=closest)
        return [pool[i] for i in order] + rest + sponsored
