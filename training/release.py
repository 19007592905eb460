"""What a release bundle holds, and how it is written and read back as serving objects.

Files of a bundle (all paths relative to the bundle root):

=============================  ==================================================================
``vocabularies.json``          every vocabulary and encoding size (:class:`Vocabularies`)
``items.parquet``              encoded catalog (:class:`ItemFeatures`), row order = item rows
``two_tower.pt``/``.json``     two-tower weights and shape
``item_embeddings.npy``        ``(items, dim)`` float32 item embeddings, in item-row order
``index/``                     ANN (ScaNN) or exact index over the item embeddings
``item_similarity.parquet``    top-K similar items per item (``retrieval.ItemSimilarityTable``)
``item_stats.parquet``         popularity, CTR and like rate per item (ranker inputs)
``ranker.pt``/``.json``        ranker weights, shape and per-surface head weights
``cf_ease.npy``                EASE weights over the item rows (catalogs of at most 10,000 items)
``feature_set.json``           the request-time inputs the models consume, by name
``evaluation.json``            the comparison table of the run (``ComparisonReport``)
=============================  ==================================================================

:func:`load_release` turns a verified :class:`~training.registry.Bundle` into a :class:`Release`:
what a Serve replica needs to answer requests with this model version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from retrieval import ExactIndex, ItemSimilarityTable, ScannIndex, load_item_index
from training.collaborative import CF_FILE, CollaborativeModel
from training.encoding import ItemFeatures, Vocabularies
from training.ranker import ITEM_STATS_FILE, ItemStats, RankerFeatureBuilder, RankerServing, SimilarityLookup
from training.registry import Bundle
from training.two_tower import TwoTowerServing

VOCABULARIES: Final = "vocabularies.json"
ITEMS: Final = "items.parquet"
ITEM_EMBEDDINGS: Final = "item_embeddings.npy"
INDEX_DIR: Final = "index"
ITEM_SIMILARITY: Final = "item_similarity.parquet"
FEATURE_SET: Final = "feature_set.json"
EVALUATION: Final = "evaluation.json"

FEATURE_SET_NAMES: Final = (
    "user_activity:recent_item_ids",
    "user:age_group",
    "user:region",
    "user:language",
    "item:item_type",
    "item:category",
    "item:tags",
    "item:creator_id",
    "context:surface",
    "context:device",
    "context:hour",
)
"""Request-time inputs of the models (two-tower and ranker), recorded in every manifest.

``user_activity:recent_item_ids`` is filtered to positive events (the two-tower history); the
item engagement statistics travel inside the bundle (``item_stats.parquet``), as of training time.
"""


@dataclass(frozen=True, eq=False)
class Release:
    """The serving objects of one model version.

    Attributes:
        version: Bundle version.
        vocabularies: Encodings.
        items: Encoded catalog; item rows index everything below.
        two_tower: User and item embeddings.
        item_embeddings: ``(items, dim)`` item embeddings.
        index: ANN or exact index over ``item_embeddings`` (same row order).
        item_similarity: Top-K similar items per item.
        ranker: Multi-task ranker, or ``None`` for a retrieval-only release.
        collaborative: EASE over the item rows (candidates and ranker features), or ``None``
            when the catalog is too large for it or it was turned off.
    """

    version: str
    vocabularies: Vocabularies
    items: ItemFeatures
    two_tower: TwoTowerServing
    item_embeddings: npt.NDArray[np.float32]
    index: ExactIndex | ScannIndex
    item_similarity: ItemSimilarityTable
    ranker: RankerServing | None
    collaborative: CollaborativeModel | None = None

    def save(self, directory: str | Path) -> None:
        """Write every file of the release into a directory (the input of ``ModelRegistry.register``)."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        self.vocabularies.save(root / VOCABULARIES)
        self.items.save(root / ITEMS)
        self.two_tower.save(root)
        np.save(root / ITEM_EMBEDDINGS, self.item_embeddings)
        self.index.save(root / INDEX_DIR)
        self.item_similarity.save(root / ITEM_SIMILARITY)
        if self.ranker is not None:
            self.ranker.builder.stats.save(root / ITEM_STATS_FILE)
            self.ranker.save(root)
        if self.collaborative is not None:
            self.collaborative.save(root)
        (root / FEATURE_SET).write_text(json.dumps(list(FEATURE_SET_NAMES), indent=2))


def similarity_lookup(items: ItemFeatures, table: ItemSimilarityTable) -> SimilarityLookup:
    """The ranker's vectorised view of an item-item table, over catalog rows."""
    neighbours = {item: table.neighbors(item) for item in items.item_ids.tolist()}
    return SimilarityLookup.from_neighbours(items.item_ids, neighbours)


def load_release(bundle: Bundle) -> Release:
    """Read a verified bundle into serving objects.

    Args:
        bundle: From :meth:`training.registry.ModelRegistry.load_bundle` (checksums verified).

    Returns:
        The release.
    """
    vocabularies = Vocabularies.load(bundle.path(VOCABULARIES))
    items = ItemFeatures.load(bundle.path(ITEMS))
    two_tower = TwoTowerServing.load(bundle.root, vocabularies)
    embeddings = np.load(bundle.path(ITEM_EMBEDDINGS))
    similarity = ItemSimilarityTable.load(bundle.path(ITEM_SIMILARITY))
    ranker = None
    if bundle.has("ranker.pt"):
        builder = RankerFeatureBuilder(
            items=items,
            item_embeddings=embeddings,
            stats=ItemStats.load(bundle.path(ITEM_STATS_FILE)),
            similarity=similarity_lookup(items, similarity),
            vocabularies=vocabularies,
        )
        ranker = RankerServing.load(bundle.root, builder)
    return Release(
        version=bundle.version,
        vocabularies=vocabularies,
        items=items,
        two_tower=two_tower,
        item_embeddings=embeddings,
        index=load_item_index(bundle.path(INDEX_DIR)),
        item_similarity=similarity,
        ranker=ranker,
        collaborative=CollaborativeModel.load(bundle.path(CF_FILE)) if bundle.has(CF_FILE) else None,
    )
