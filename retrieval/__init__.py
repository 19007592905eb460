"""ANN search for candidate generation.

Exact and ScaNN item indexes, the delta index of items added since a build, and item-item
similarity tables.
"""

from retrieval.ann_config import AnnConfig
from retrieval.delta_index import DeltaIndex, DeltaIndexFullError
from retrieval.exact_index import ExactIndex
from retrieval.index_builder import build_item_index, load_item_index
from retrieval.index_files import IndexFormatError
from retrieval.item_index import MISSING_POSITION, IndexKind, IndexMetadata, ItemIndex
from retrieval.item_similarity import (
    ITEM_SIMILARITY_SCHEMA,
    CooccurrenceNeighbors,
    EmbeddingNeighbors,
    ItemSimilarityTable,
    NeighborSource,
    compute_block,
)
from retrieval.recall import measure_recall, sample_queries_from_items
from retrieval.scann_index import ScannIndex

__all__ = [
    "ITEM_SIMILARITY_SCHEMA",
    "MISSING_POSITION",
    "AnnConfig",
    "CooccurrenceNeighbors",
    "DeltaIndex",
    "DeltaIndexFullError",
    "EmbeddingNeighbors",
    "ExactIndex",
    "IndexFormatError",
    "IndexKind",
    "IndexMetadata",
    "ItemIndex",
    "ItemSimilarityTable",
    "NeighborSource",
    "ScannIndex",
    "build_item_index",
    "compute_block",
    "load_item_index",
    "measure_recall",
    "sample_queries_from_items",
]
