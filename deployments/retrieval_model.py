"""The retrieval deployment's serving state: a release's two-tower model, index and item-item table.

Runs the model-backed candidate sources for one request in one call:

- ``two_tower_ann``: the user tower embeds the user's latest positive history (as the ingress read
  it from Redis for this request, so a click changes the very next request) and the embedding is
  searched in the release's ANN or exact index, wrapped in a :class:`~retrieval.DeltaIndex` so
  items created after training are retrievable as soon as they are embedded;
- ``item_to_item``, ``recently_viewed_related`` and ``similar_items``: the release's item-item table;
- ``collaborative``: the release's EASE model (``cf_ease.npy``) over the same positive history,
  the candidates the offline two-stage evaluation measures (nothing for a release without it).

No Ray here: the deployment class is a thin wrapper, and this runs in-process in tests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

from core.stages import CandidateSource
from core.types import Candidate, RequestContext
from deployments.wire import NO_MODEL, RetrievalReply, RetrievalRequest, SourceSpec
from features.redis_store import RedisStore
from features.user_context import model_profile, positive_history
from retrieval import DeltaIndex
from retrieval.sources.collaborative_source import CollaborativeSource
from retrieval.sources.item_to_item_source import ItemToItemSource
from retrieval.sources.recently_viewed_related_source import RecentlyViewedRelatedSource
from retrieval.sources.similar_items_source import SimilarItemsSource
from retrieval.sources.two_tower_ann_source import IndexEmbeddingRetriever, TwoTowerAnnSource
from training.collaborative import CollaborativeModel, top_items
from training.encoding import ItemFeatures
from training.release import Release

logger = logging.getLogger(__name__)

MODEL_SOURCES = frozenset(
    {"two_tower_ann", "item_to_item", "recently_viewed_related", "similar_items", "collaborative"}
)
"""The sources the retrieval deployment serves; the others run where the pipeline runs."""

_ITEM_COLUMNS = ("item_id", "item_type", "category", "tags", "creator_id")


@dataclass(frozen=True, eq=False)
class HistoryScorer:
    """EASE scoring of a history of item ids, over a release's catalog rows.

    Attributes:
        model: The release's EASE model.
        item_ids: Catalog item id of each row.
        row_of: Catalog row of each item id.
    """

    model: CollaborativeModel
    item_ids: list[str]
    row_of: dict[str, int]

    @classmethod
    def of(cls, release: Release) -> HistoryScorer | None:
        """The scorer of a release, or None when it carries no EASE model."""
        if release.collaborative is None:
            return None
        ids = [str(i) for i in release.items.item_ids.tolist()]
        return cls(release.collaborative, ids, {item: n for n, item in enumerate(ids)})

    def __call__(self, history: Sequence[str], k: int) -> list[tuple[str, float]]:
        """The ``k`` best items for a history (its own items left out), best first."""
        rows = np.asarray([self.row_of.get(i, -1) for i in history], dtype=np.int64)
        if not (rows >= 0).any():
            return []
        scores = self.model.scores([rows])
        top = top_items(scores, k)[0]
        return [(self.item_ids[r], float(scores[0, r])) for r in top.tolist() if r >= 0]


def _no_history_scorer(history: Sequence[str], k: int) -> list[tuple[str, float]]:
    return []


def popularity_of(release: Release, k: int) -> list[tuple[str, float]]:
    """The ``k`` most popular items of the release's training data (empty without item statistics)."""
    if release.ranker is None:
        return []
    stats = release.ranker.builder.stats
    order = np.argsort(-stats.log_popularity, kind="stable")[:k]
    return [
        (str(stats.item_ids[i]), float(stats.log_popularity[i])) for i in order if stats.log_popularity[i] > 0
    ]


@dataclass(eq=False)
class RetrievalModel:
    """One release's retrieval state, built once per bundle and shared by concurrent requests.

    Attributes:
        release: The release.
        index: Its item index with the delta of items added since training.
        store: Redis, for the titles of recently viewed items.
        popular: The release's most popular items.
    """

    release: Release
    index: DeltaIndex
    store: RedisStore
    popular: list[tuple[str, float]]
    _sources: dict[SourceSpec, CandidateSource] = field(default_factory=dict)

    @classmethod
    def build(cls, release: Release, store: RedisStore) -> RetrievalModel:
        """The serving state of a release."""
        return cls(
            release=release, index=DeltaIndex(release.index), store=store, popular=popularity_of(release, 500)
        )

    @property
    def version(self) -> str:
        """The release's version."""
        return self.release.version

    async def _embed_user(self, ctx: RequestContext) -> NDArray[np.float32] | None:
        history = positive_history(ctx)
        profile = model_profile(ctx)
        return await asyncio.to_thread(self.release.two_tower.user_embedding, history, profile, ctx.user_id)

    def source(self, spec: SourceSpec) -> CandidateSource:
        """The source of a spec (built once per spec and reused)."""
        found = self._sources.get(spec)
        if found is not None:
            return found
        limits: dict[str, Any] = {
            "name": spec.name,
            "budget_ms": spec.budget_ms,
            "max_candidates": spec.max_candidates,
        }
        neighbors = self.release.item_similarity
        built: CandidateSource
        if spec.name == "two_tower_ann":
            built = TwoTowerAnnSource(self._embed_user, IndexEmbeddingRetriever(self.index), **limits)
        elif spec.name == "item_to_item":
            built = ItemToItemSource(neighbors, **limits)
        elif spec.name == "recently_viewed_related":
            built = RecentlyViewedRelatedSource(neighbors, self.store, **limits)
        elif spec.name == "similar_items":
            built = SimilarItemsSource(neighbors, **limits)
        elif spec.name == "collaborative":
            built = CollaborativeSource(HistoryScorer.of(self.release) or _no_history_scorer, **limits)
        else:
            raise ValueError(f"retrieval serves {sorted(MODEL_SOURCES)}, not {spec.name!r}")
        self._sources[spec] = built
        return built

    def add_new_items(self, records: Sequence[Mapping[str, Any]]) -> int:
        """Embed catalog items the index lacks and add them to its delta.

        Args:
            records: Catalog records (``item_id``, ``item_type``, ``category``, ``tags``,
                ``creator_id``) of active items.

        Returns:
            Items added.
        """
        fresh = [r for r in records if self.index.position_of(str(r["item_id"])) is None]
        if not fresh:
            return 0
        table = pa.table(
            {
                "item_id": [str(r["item_id"]) for r in fresh],
                "item_type": [r.get("item_type") for r in fresh],
                "category": [r.get("category") for r in fresh],
                "tags": [list(r.get("tags") or []) for r in fresh],
                "creator_id": [r.get("creator_id") for r in fresh],
            }
        )
        items = ItemFeatures.from_table(table, self.release.vocabularies)
        vectors = self.release.two_tower.item_embeddings(items)
        self.index.add_items(items.item_ids.tolist(), vectors)
        return len(fresh)


async def retrieve(model: RetrievalModel | None, request: RetrievalRequest) -> RetrievalReply:
    """Run the requested model-backed sources concurrently, each under its own budget.

    A source that fails or is late is reported in ``errors``; the others' candidates still come
    back. Without a model every source returns nothing (there is nothing to retrieve with).

    Args:
        model: The serving state, or None without a bundle.
        request: The sources and the request's fields.

    Returns:
        Candidates per source.
    """
    started = time.perf_counter()
    if model is None:
        return RetrievalReply(NO_MODEL, {spec.name: [] for spec in request.sources})
    ctx = request.context()
    specs = request.sources
    outcomes = await asyncio.gather(
        *(asyncio.wait_for(model.source(spec).fetch(ctx), spec.budget_ms / 1000.0) for spec in specs),
        return_exceptions=True,
    )
    candidates: dict[str, list[Candidate]] = {}
    errors: dict[str, str] = {}
    for spec, outcome in zip(specs, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            errors[spec.name] = (
                "timeout" if isinstance(outcome, TimeoutError) else f"{type(outcome).__name__}: {outcome}"
            )
        else:
            candidates[spec.name] = outcome
    return RetrievalReply(model.version, candidates, errors, (time.perf_counter() - started) * 1000.0)


def item_records(raw: Sequence[Mapping[str, Any] | None]) -> list[Mapping[str, Any]]:
    """Catalog records fit for :meth:`RetrievalModel.add_new_items`: active and complete."""
    return [
        r
        for r in raw
        if r is not None and r.get("status", "active") == "active" and all(c in r for c in _ITEM_COLUMNS)
    ]
