"""The multi-task ranker: feature building, model, training task and serving module.

The ranker scores (user, candidate) pairs the retrieval stage produced. Its inputs:

* the frozen two-tower embeddings of the user and of the item, and their element-wise product;
* dense cross and item features (:data:`DENSE_FEATURES`): two-tower score, item-item score (the
  best and the mean similarity of the candidate to the user's history, from the item-item table),
  category, tag and creator affinities (shares of the user's recent positives in the candidate's
  category, sharing one of its tags, by its creator), item
  popularity, smoothed CTR and like rate (with the priors of :mod:`features.params`, the same
  smoothing the online ``item_engagement`` view serves), the smoothed CTR of the item's creator
  over all their items, whether the item's category is among the user's onboarding interests,
  whether the item's region and language are the user's, and whether the item has its own id;
* the request context: surface, device and hour of day, each embedded;
* in training only, the slot a logged impression was shown in (see below).

Heads: click, like and purchase (logits, binary cross-entropy) and watch time (regression on
``log1p`` seconds, squared error). The final score of a surface is a weighted sum of the three
probabilities and the predicted ``log1p`` watch time, with per-surface weights from the config.

Two paths beside the shared MLP (wide and deep, Cheng et al. 2016): a linear term over the
standardised dense features in every binary logit, which learns from a few thousand logged
impressions what the MLP needs many more for; and a per-slot bias (the shallow position tower of
Zhao et al. 2019), so that clicks a slot earned by being on top are not credited to the item.
Serving asks for the top slot for every candidate, which adds the same constant to each.

:class:`RankerFeatureBuilder` is pure numpy and is what both training (for every example) and
serving (for every request) call, so the features cannot drift apart.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from features.params import DEFAULT_PARAMS
from training.config import HeadWeights, RankerConfig
from training.encoding import UNKNOWN, ItemFeatures, Vocabularies

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

HEADS: Final = ("click", "like", "purchase", "watch_time")
"""Outputs of the ranker, in order; the first three are binary, the last is ``log1p`` seconds."""

BINARY_HEADS: Final = ("click", "like", "purchase")

DENSE_FEATURES: Final = (
    "two_tower_score",
    "item_item_max",
    "item_item_mean",
    "category_affinity",
    "log_popularity",
    "ctr",
    "like_rate",
    "has_item_id",
    "cf_score",
    "cf_log_rank",
    "creator_ctr",
    "interest_match",
    "region_match",
    "language_match",
    "tag_affinity",
    "creator_affinity",
)
"""Dense inputs of the ranker, in column order."""

CF_SCORE_COLUMN: Final = DENSE_FEATURES.index("cf_score")
TWO_TOWER_SCORE_COLUMN: Final = DENSE_FEATURES.index("two_tower_score")
"""Column of the EASE score, which also feeds the click and like logits directly (the residual)."""

RANKER_INPUTS: Final = ("user_embedding", "item_embedding", "dense", "surface", "device", "hour", "position")
"""Input columns of :class:`MultiTaskRanker`."""

LABELS: Final = ("click", "like", "purchase", "watch_log1p")
"""Label columns of ranker examples (``watch_log1p`` is the target of the ``watch_time`` head)."""

MIN_DENSE_STD: Final = 1e-3
"""Floor of the dense features' standard deviations; a column at the floor was constant in training
and is held at its training mean when scoring."""

HOURS: Final = 25
"""Hour-of-day embedding rows: 0 for unknown, then hours 0-23 as 1-24."""

POSITIONS: Final = 32
"""Slots with their own position bias; later slots share the last."""

WEIGHTS_FILE: Final = "ranker.pt"
MODEL_FILE: Final = "ranker.json"
ITEM_STATS_FILE: Final = "item_stats.parquet"


def hour_of_day(ts_us: npt.NDArray[np.int64]) -> IntArray:
    """Embedding index of the UTC hour of each timestamp (1-24)."""
    return ((ts_us // 3_600_000_000) % 24 + 1).astype(np.int64)


def smoothed_rates(
    successes: npt.ArrayLike, trials: npt.ArrayLike, prior_mean: float, prior_strength: float
) -> FloatArray:
    """Beta-smoothed rates ``(s + m*k) / (n + k)``, vectorised (the online view's formula)."""
    s = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    return ((s + prior_mean * prior_strength) / (n + prior_strength)).astype(np.float32)


@dataclass(frozen=True, eq=False)
class ItemStats:
    """Per-item engagement statistics the ranker reads, aligned with the catalog rows.

    Attributes:
        item_ids: Catalog item ids.
        log_popularity: ``log1p`` of training positives.
        ctr: Smoothed clicks per view.
        like_rate: Smoothed likes per view.
        creator_ctr: Smoothed clicks per view of the item's creator, over all their items.
    """

    item_ids: npt.NDArray[np.str_]
    log_popularity: FloatArray
    ctr: FloatArray
    like_rate: FloatArray
    creator_ctr: FloatArray

    @classmethod
    def from_counts(
        cls,
        item_ids: npt.NDArray[np.str_],
        positives: IntArray,
        views: IntArray,
        clicks: IntArray,
        likes: IntArray,
        creator_views: IntArray,
        creator_clicks: IntArray,
    ) -> ItemStats:
        """Compute the statistics from per-item counts.

        Args:
            item_ids: Catalog item ids.
            positives: Training positives per item.
            views: Exposures per item (``view`` events, plus clicks when views are not logged).
            clicks: Clicks per item.
            likes: Likes per item.
            creator_views: Exposures of all items of each item's creator.
            creator_clicks: Clicks on all items of each item's creator.

        Returns:
            The statistics.
        """
        params = DEFAULT_PARAMS
        return cls(
            item_ids=item_ids,
            log_popularity=np.log1p(positives).astype(np.float32),
            ctr=smoothed_rates(clicks, views, params.ctr_prior_mean, params.ctr_prior_strength),
            like_rate=smoothed_rates(likes, views, params.like_prior_mean, params.like_prior_strength),
            creator_ctr=smoothed_rates(
                creator_clicks, creator_views, params.ctr_prior_mean, params.ctr_prior_strength
            ),
        )

    def save(self, path: str | Path) -> None:
        """Write as Parquet."""
        pq.write_table(
            pa.table(
                {
                    "item_id": self.item_ids.tolist(),
                    "log_popularity": self.log_popularity,
                    "ctr": self.ctr,
                    "like_rate": self.like_rate,
                    "creator_ctr": self.creator_ctr,
                }
            ),
            str(path),
        )

    @classmethod
    def load(cls, path: str | Path) -> ItemStats:
        """Read a file written by :meth:`save`."""
        table = pq.read_table(str(path))
        return cls(
            item_ids=np.asarray(table.column("item_id").to_pylist(), dtype=np.str_),
            log_popularity=np.asarray(table.column("log_popularity").to_numpy(), dtype=np.float32),
            ctr=np.asarray(table.column("ctr").to_numpy(), dtype=np.float32),
            like_rate=np.asarray(table.column("like_rate").to_numpy(), dtype=np.float32),
            creator_ctr=np.asarray(table.column("creator_ctr").to_numpy(), dtype=np.float32),
        )


@dataclass(frozen=True, eq=False)
class SimilarityLookup:
    """Item-item scores between catalog rows, for vectorised lookups.

    Attributes:
        n_items: Catalog rows.
        keys: Sorted ``source_row * n_items + neighbour_row``.
        scores: Score of each key.
    """

    n_items: int
    keys: IntArray
    scores: FloatArray

    @classmethod
    def from_neighbours(
        cls, catalog_ids: npt.NDArray[np.str_], neighbours: Mapping[str, list[tuple[str, float]]]
    ) -> SimilarityLookup:
        """Build from each item's neighbour list (ids not in the catalog are ignored).

        Args:
            catalog_ids: Catalog item ids, by row.
            neighbours: For each item id, ``(neighbour_id, score)`` pairs.

        Returns:
            The lookup.
        """
        row = {item: i for i, item in enumerate(catalog_ids.tolist())}
        n_items = len(row)
        keys: list[int] = []
        scores: list[float] = []
        for source, pairs in neighbours.items():
            if source not in row:
                continue
            for target, score in pairs:
                if target in row:
                    keys.append(row[source] * n_items + row[target])
                    scores.append(score)
        order = np.argsort(np.asarray(keys, dtype=np.int64), kind="stable")
        return cls(
            n_items=n_items,
            keys=np.asarray(keys, dtype=np.int64)[order],
            scores=np.asarray(scores, dtype=np.float32)[order],
        )

    def pair_scores(self, sources: IntArray, targets: IntArray) -> FloatArray:
        """Score of each (source row, target row) pair; 0 where not neighbours or a row is -1."""
        out = np.zeros(np.broadcast_shapes(sources.shape, targets.shape), dtype=np.float32)
        if len(self.keys) == 0:
            return out
        src, dst = np.broadcast_arrays(sources, targets)
        valid = (src >= 0) & (dst >= 0)
        wanted = src * self.n_items + dst
        at = np.minimum(np.searchsorted(self.keys, wanted), len(self.keys) - 1)
        found = valid & (self.keys[at] == wanted)
        out[found] = self.scores[at[found]]
        return out

    def save(self, path: str | Path) -> None:
        """Write as ``.npz``."""
        np.savez(path, n_items=np.asarray(self.n_items), keys=self.keys, scores=self.scores)

    @classmethod
    def load(cls, path: str | Path) -> SimilarityLookup:
        """Read a file written by :meth:`save`."""
        with np.load(path) as data:
            return cls(int(data["n_items"]), data["keys"].astype(np.int64), data["scores"].astype(np.float32))


@dataclass(frozen=True, eq=False)
class RankerFeatureBuilder:
    """Builds ranker inputs from embeddings, histories and candidates (offline and online alike).

    Attributes:
        items: Encoded catalog (rows are the item rows used everywhere below).
        item_embeddings: ``(len(items), dim)`` two-tower item embeddings.
        stats: Engagement statistics of the catalog rows.
        similarity: Item-item scores between catalog rows.
        vocabularies: Encodings (item vocabulary indices are how histories are given).
    """

    items: ItemFeatures
    item_embeddings: FloatArray
    stats: ItemStats
    similarity: SimilarityLookup
    vocabularies: Vocabularies
    _row_of_index: IntArray = field(init=False, repr=False)
    _tag_bits: npt.NDArray[np.uint64] | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n_items = len(self.items)
        assert self.item_embeddings.shape[0] == n_items, (
            f"{self.item_embeddings.shape[0]} item embeddings for {n_items} catalog items"
        )
        assert len(self.stats.ctr) == n_items, f"{len(self.stats.ctr)} item stats for {n_items} catalog items"
        object.__setattr__(self, "_row_of_index", self.items.rows_of_id_index(len(self.vocabularies.item)))
        object.__setattr__(self, "_tag_bits", tag_bitsets(self.items.tags))

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.item_embeddings.shape[1])

    def rows_of_indices(self, item_indices: IntArray) -> IntArray:
        """Catalog row of each item vocabulary index (-1 for padding or items not in the catalog)."""
        return np.where(item_indices > UNKNOWN, self._row_of_index[item_indices], -1)

    def _shares_a_tag(
        self, history_rows: IntArray, present: npt.NDArray[np.bool_], candidate_rows: IntArray
    ) -> npt.NDArray[np.bool_]:
        """``(batch, history)``: whether each history item has a tag of the row's candidate."""
        out = np.zeros(history_rows.shape, dtype=bool)
        bits = self._tag_bits
        if bits is not None:
            # One AND per history item and word, rather than comparing every pair of tags.
            for start in range(0, len(candidate_rows), _TAG_CHUNK):
                part = slice(start, start + _TAG_CHUNK)
                history_bits = bits[np.maximum(history_rows[part], 0)]
                candidate_bits = bits[candidate_rows[part]][:, None, :]
                out[part] = (history_bits & candidate_bits).any(axis=2) & present[part]
            return out
        for start in range(0, len(candidate_rows), _TAG_CHUNK):
            part = slice(start, start + _TAG_CHUNK)
            # (rows, history, history tags, candidate tags); padding (0) never matches.
            history_tags = np.where(
                present[part, :, None], self.items.tags[np.maximum(history_rows[part], 0)], -1
            )
            candidate_tags = self.items.tags[candidate_rows[part]][:, None, None, :]
            shared = (history_tags[..., None] == candidate_tags) & (candidate_tags != UNKNOWN)
            out[part] = shared.any(axis=(2, 3))
        return out

    def build(
        self,
        user_embeddings: FloatArray,
        history: IntArray,
        candidate_rows: IntArray,
        surface: IntArray,
        device: IntArray,
        hour: IntArray,
        cf_score: FloatArray | None = None,
        cf_rank: FloatArray | None = None,
        interests: IntArray | None = None,
        region: IntArray | None = None,
        language: IntArray | None = None,
    ) -> dict[str, npt.NDArray[np.generic]]:
        """The ranker inputs of a batch of (user, candidate) pairs.

        Args:
            user_embeddings: ``(batch, dim)`` two-tower user embeddings.
            history: ``(batch, history_length)`` item vocabulary indices of recent positives.
            candidate_rows: ``(batch,)`` catalog rows of the candidates.
            surface: ``(batch,)`` surface vocabulary indices.
            device: ``(batch,)`` device vocabulary indices.
            hour: ``(batch,)`` hour indices (:func:`hour_of_day`; 0 unknown).
            cf_score: ``(batch,)`` EASE score of each candidate for its user (zeros when the
                release has no collaborative model).
            cf_rank: ``(batch,)`` 1-based rank of each candidate in its user's EASE order over
                the catalog (read as ``log1p``; zeros without a collaborative model).
            interests: ``(batch, k)`` the user's onboarding interests as ``category`` vocabulary
                indices, 0-padded (none when omitted).
            region: ``(batch,)`` the request's region as a ``region`` index (unknown when omitted).
            language: ``(batch,)`` the request's language as a ``language`` index.

        Returns:
            Columns named as :data:`RANKER_INPUTS`, ``position`` at the top slot.
        """
        batch = len(candidate_rows)
        assert user_embeddings.shape == (batch, self.dim), (
            f"user embeddings {user_embeddings.shape} do not match {batch} candidates of dim {self.dim}"
        )
        assert history.shape[0] == batch, f"{history.shape[0]} histories for {batch} candidates"
        in_range = (candidate_rows >= 0) & (candidate_rows < len(self.items))
        assert in_range.all(), "candidate rows out of range"
        item_embeddings = self.item_embeddings[candidate_rows]
        history_rows = self.rows_of_indices(history)
        present = history_rows >= 0
        n_history = present.sum(axis=1)
        similarity = self.similarity.pair_scores(history_rows, candidate_rows[:, None])
        category = self.items.category[candidate_rows]
        history_category = np.where(present, self.items.category[np.maximum(history_rows, 0)], -1)
        same_category = (history_category == category[:, None]) & (category[:, None] != UNKNOWN)
        creator = self.items.creator[candidate_rows]
        history_creator = np.where(present, self.items.creator[np.maximum(history_rows, 0)], -1)
        same_creator = (history_creator == creator[:, None]) & (creator[:, None] != UNKNOWN)
        same_tag = self._shares_a_tag(history_rows, present, candidate_rows)
        denominator = np.maximum(n_history, 1)
        if interests is None:
            interest_match = np.zeros(batch, dtype=np.float32)
        else:
            assert interests.shape[0] == batch, f"{interests.shape[0]} interest rows for {batch} candidates"
            interest_match = ((interests == category[:, None]) & (category[:, None] != UNKNOWN)).any(axis=1)
        dense = np.stack(
            [
                (user_embeddings * item_embeddings).sum(axis=1),
                similarity.max(axis=1, initial=0.0),
                similarity.sum(axis=1) / denominator,
                same_category.sum(axis=1) / denominator,
                self.stats.log_popularity[candidate_rows],
                self.stats.ctr[candidate_rows],
                self.stats.like_rate[candidate_rows],
                (self.items.id_index[candidate_rows] > UNKNOWN).astype(np.float32),
                np.zeros(batch, dtype=np.float32) if cf_score is None else cf_score,
                np.zeros(batch, dtype=np.float32) if cf_rank is None else np.log1p(cf_rank),
                self.stats.creator_ctr[candidate_rows],
                interest_match.astype(np.float32),
                _matches(region, self.items.region[candidate_rows], batch),
                _matches(language, self.items.language[candidate_rows], batch),
                same_tag.sum(axis=1) / denominator,
                same_creator.sum(axis=1) / denominator,
            ],
            axis=1,
        ).astype(np.float32)
        return {
            "user_embedding": np.asarray(user_embeddings, dtype=np.float32),
            "item_embedding": np.asarray(item_embeddings, dtype=np.float32),
            "dense": dense,
            "surface": np.asarray(surface, dtype=np.int64),
            "device": np.asarray(device, dtype=np.int64),
            "hour": np.asarray(hour, dtype=np.int64),
            # The top slot; logged impressions replace it with the slot they were shown in.
            "position": np.zeros(batch, dtype=np.int64),
        }


_TAG_CHUNK: Final = 2048
"""Rows compared at once by :meth:`RankerFeatureBuilder._shares_a_tag` (bounds its memory)."""

MAX_TAG_WORDS: Final = 16
"""Largest tag vocabulary, in 64-bit words (1,024 tags), kept as one bit set per item."""


def tag_bitsets(tags: IntArray) -> npt.NDArray[np.uint64] | None:
    """Each item's tags as a bit set: ``(items, words)``, bit ``t % 64`` of word ``t // 64`` for tag ``t``.

    Whether two items share a tag is then a few ANDs instead of ``max_tags ** 2`` comparisons: in
    the ranker, a request's 500 candidates against 20 history items each, that comparison cost
    more than the model's forward pass. Padding (:data:`UNKNOWN`) sets no bit.

    Args:
        tags: ``(items, max_tags)`` tag vocabulary indices, 0-padded.

    Returns:
        The bit sets, or None when the vocabulary needs more than :data:`MAX_TAG_WORDS` words
        (the pairwise comparison is then the cheaper one).
    """
    tags = np.asarray(tags, dtype=np.int64)
    words = int(tags.max(initial=0)) // 64 + 1
    if words > MAX_TAG_WORDS:
        return None
    bits = np.zeros((tags.shape[0], words), dtype=np.uint64)
    rows, slots = np.nonzero(tags > UNKNOWN)
    values = tags[rows, slots]
    one = np.left_shift(np.uint64(1), (values % 64).astype(np.uint64))
    np.bitwise_or.at(bits, (rows, values // 64), one)
    return bits


def _matches(user: IntArray | None, item: IntArray, batch: int) -> FloatArray:
    """1.0 where a known user value equals the item's, else 0.0."""
    if user is None:
        return np.zeros(batch, dtype=np.float32)
    return np.asarray((user == item) & (user != UNKNOWN), dtype=np.float32)


@dataclass(frozen=True)
class RankerSizes:
    """Input sizes of the ranker.

    Attributes:
        embedding_dim: Two-tower embedding dimension.
        surface: Surface vocabulary rows.
        device: Device vocabulary rows.
    """

    embedding_dim: int
    surface: int
    device: int


class MultiTaskRanker(nn.Module):
    """Shared bottom MLP over embeddings, dense and context features, with one head per task."""

    dense_mean: Tensor
    dense_std: Tensor

    def __init__(self, config: RankerConfig, sizes: RankerSizes) -> None:
        """Build the model.

        Args:
            config: Layer sizes and dropout.
            sizes: Input sizes.
        """
        super().__init__()
        self.config = config
        self.sizes = sizes
        self.surface = nn.Embedding(sizes.surface, config.context_dim, padding_idx=UNKNOWN)
        self.device_embedding = nn.Embedding(sizes.device, config.context_dim, padding_idx=UNKNOWN)
        self.hour = nn.Embedding(HOURS, config.context_dim, padding_idx=UNKNOWN)
        n_dense = len(DENSE_FEATURES)
        # Standardisation constants of the dense features, set from the training examples and saved
        # with the weights so serving standardises exactly as training did.
        self.register_buffer("dense_mean", torch.zeros(n_dense))
        self.register_buffer("dense_std", torch.ones(n_dense))
        width = 3 * sizes.embedding_dim + n_dense + 3 * config.context_dim
        layers: list[nn.Module] = []
        for size in config.hidden_dims:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(config.dropout)]
            width = size
        self.bottom = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(width, 1) for name in HEADS})
        # Both start at zero: an untrained model is the MLP alone, whatever the objective.
        self.wide = nn.Linear(n_dense, len(BINARY_HEADS), bias=False)
        nn.init.zeros_(self.wide.weight)
        self.position_bias = nn.Embedding(POSITIONS, len(HEADS))
        nn.init.zeros_(self.position_bias.weight)
        # The standardised EASE score goes straight into the click and like logits with a learned
        # weight. With the listwise objective the heads start at zero, so the untrained ranker
        # orders candidates exactly as EASE does and training can only move it from there.
        self.cf_weight = nn.Parameter(torch.tensor(float(config.cf_residual)))
        if config.objective == "listwise":
            for head in self.heads.values():
                assert isinstance(head, nn.Linear)
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)

    def set_dense_statistics(self, dense: FloatArray) -> None:
        """Fix the standardisation of the dense features from training examples."""
        assert dense.ndim == 2 and dense.shape[1] == len(DENSE_FEATURES), (
            f"dense must be (n, {len(DENSE_FEATURES)}), got {dense.shape}"
        )
        mean = torch.as_tensor(dense.mean(axis=0), dtype=torch.float32)
        std = torch.as_tensor(dense.std(axis=0), dtype=torch.float32).clamp(min=MIN_DENSE_STD)
        self.dense_mean.copy_(mean)
        self.dense_std.copy_(std)

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Score a batch.

        Args:
            batch: Tensors named as :data:`RANKER_INPUTS`.

        Returns:
            ``(batch,)`` outputs per head: logits for the binary heads, ``log1p`` seconds for
            ``watch_time``.
        """
        user, item = batch["user_embedding"], batch["item_embedding"]
        dense = (batch["dense"] - self.dense_mean) / self.dense_std
        # A column that never varied in training taught the model nothing, yet at serving it can
        # carry values the network never saw (the EASE columns of a ranker trained on examples
        # without them become thousands of standard deviations wide). It stays at its training value.
        dense = dense * (self.dense_std > MIN_DENSE_STD).to(dense.dtype)
        if not self.config.reads_two_tower():
            user, item = torch.zeros_like(user), torch.zeros_like(item)
            keep = torch.ones(dense.shape[-1], dtype=dense.dtype)
            keep[TWO_TOWER_SCORE_COLUMN] = 0.0
            dense = dense * keep
        features = torch.cat(
            [
                user,
                item,
                user * item,
                dense,
                self.surface(batch["surface"]),
                self.device_embedding(batch["device"]),
                self.hour(batch["hour"]),
            ],
            dim=-1,
        )
        hidden = self.bottom(features)
        outputs = {name: head(hidden).squeeze(-1) for name, head in self.heads.items()}
        wide = self.wide(dense)
        for n, name in enumerate(BINARY_HEADS):
            outputs[name] = outputs[name] + wide[..., n]
        residual = self.cf_weight * dense[..., CF_SCORE_COLUMN]
        outputs["click"] = outputs["click"] + residual
        outputs["like"] = outputs["like"] + residual
        position = batch.get("position")
        if position is not None:
            slot_bias = self.position_bias(position.clamp(0, POSITIONS - 1))
            for n, name in enumerate(HEADS):
                outputs[name] = outputs[name] + slot_bias[..., n]
        return outputs


class MultiTaskTask(nn.Module):
    """Sum of binary cross-entropy on click, like and purchase and squared error on watch time.

    Squared error on ``log1p`` seconds is several times any cross-entropy, and the shared layers
    would learn mostly for it; ``watch_weight`` (the trainer passes one over the label's variance)
    puts it on the scale of the others.
    """

    def __init__(self, watch_weight: float = 1.0) -> None:
        """Configure the task.

        Args:
            watch_weight: Multiplier of the watch-time squared error.
        """
        super().__init__()
        self.watch_weight = watch_weight

    def forward(
        self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]
    ) -> tuple[Tensor, dict[str, float]]:
        """The loss of a batch.

        Args:
            outputs: The ranker's outputs.
            labels: ``click``, ``like``, ``purchase`` (0/1) and ``watch_log1p``.

        Returns:
            The total loss and each head's value.
        """
        parts = {
            name: F.binary_cross_entropy_with_logits(outputs[name], labels[name].float())
            for name in BINARY_HEADS
        }
        parts["watch_time"] = self.watch_weight * F.mse_loss(
            outputs["watch_time"], labels["watch_log1p"].float()
        )
        total = torch.stack(list(parts.values())).sum()
        return total, {name: value.item() for name, value in parts.items()}


def softmax_list_loss(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Softmax cross-entropy of each list's positives against the whole list, averaged over lists.

    Args:
        logits: ``(lists, size)`` scores.
        labels: ``(lists, size)`` 0/1 relevance.
        mask: ``(lists, size)`` 1 for real candidates, 0 for padding.

    Returns:
        The mean over lists with at least one positive (0 when none has).
    """
    real = mask > 0
    log_p = torch.log_softmax(logits.masked_fill(~real, -1e9), dim=1)
    target = labels.float() * real.float()
    count = target.sum(dim=1)
    per_list = -(target * log_p).sum(dim=1) / count.clamp(min=1.0)
    has = count > 0
    return per_list[has].mean() if bool(has.any()) else logits.sum() * 0.0


class ListwiseTask(nn.Module):
    """Listwise click and like heads over candidate lists, with the other heads pointwise.

    The click and like heads get :func:`softmax_list_loss` on their labels plus
    ``pointwise_weight`` times binary cross-entropy (which fixes the level of the logits, so the
    heads stay probabilities); purchase gets binary cross-entropy and watch time squared error, on
    real candidates only.
    """

    def __init__(self, pointwise_weight: float) -> None:
        """Configure the task.

        Args:
            pointwise_weight: Weight of the calibrating binary cross-entropy.
        """
        super().__init__()
        self.pointwise_weight = pointwise_weight

    def forward(
        self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]
    ) -> tuple[Tensor, dict[str, float]]:
        """The loss of a batch of lists.

        Args:
            outputs: The ranker's outputs, each ``(lists, size)``.
            labels: :data:`LABELS` and ``mask``, each ``(lists, size)``.

        Returns:
            The total loss and each part's value.
        """
        mask = labels["mask"].float()
        real = mask.sum().clamp(min=1.0)

        def bce(name: str) -> Tensor:
            raw = F.binary_cross_entropy_with_logits(outputs[name], labels[name].float(), reduction="none")
            return (raw * mask).sum() / real

        parts = {
            f"list_{name}": softmax_list_loss(outputs[name], labels[name], mask) for name in ("click", "like")
        }
        for name in BINARY_HEADS:
            weight = self.pointwise_weight if name in ("click", "like") else 1.0
            parts[f"bce_{name}"] = weight * bce(name)
        error = (outputs["watch_time"] - labels["watch_log1p"].float()) ** 2
        parts["watch_time"] = (error * mask).sum() / real
        total = torch.stack(list(parts.values())).sum()
        return total, {name: value.item() for name, value in parts.items()}


def _tensors(arrays: Mapping[str, npt.NDArray[np.generic]]) -> dict[str, Tensor]:
    out = {}
    for name, values in arrays.items():
        dtype = torch.int64 if np.issubdtype(values.dtype, np.integer) else torch.float32
        out[name] = torch.as_tensor(np.asarray(values), dtype=dtype)
    return out


def watch_scale_of(watch_log1p: npt.NDArray[np.floating[Any]]) -> float:
    """Mean ``log1p`` watch time over the examples with any watch time (1 when there are none).

    Args:
        watch_log1p: The ``watch_log1p`` labels of the ranker's training examples.

    Returns:
        The scale :meth:`RankerServing.relative_watch` divides the watch head by.
    """
    watched = watch_log1p[watch_log1p > 0]
    return float(watched.mean()) if len(watched) else 1.0


class RankerServing:
    """Request-time scoring with a trained :class:`MultiTaskRanker`.

    Attributes:
        model: The model, in eval mode.
        builder: The feature builder (catalog, item embeddings, statistics, item-item scores).
        surface_weights: Head weights per surface (``default`` for the others).
    """

    def __init__(
        self,
        model: MultiTaskRanker,
        builder: RankerFeatureBuilder,
        surface_weights: Mapping[str, HeadWeights],
        watch_scale: float = 1.0,
    ) -> None:
        """Wrap a trained model.

        Args:
            model: The trained ranker (unwrapped from DDP).
            builder: Features of the same release.
            surface_weights: Head weights per surface; must hold ``default``.
            watch_scale: Typical ``log1p`` watch time of a watched item (:func:`watch_scale_of`):
                the watch head is divided by it before weighting.
        """
        assert "default" in surface_weights, "surface_weights needs a 'default' entry"
        assert watch_scale > 0, "watch_scale must be positive"
        self.watch_scale = float(watch_scale)
        self.model = model.eval()
        self.builder = builder
        self.surface_weights = dict(surface_weights)

    @torch.no_grad()
    def predict(
        self, inputs: Mapping[str, npt.NDArray[np.generic]], *, batch_size: int = 8192
    ) -> dict[str, FloatArray]:
        """Per-head predictions: probabilities for the binary heads, ``log1p`` seconds for watch time."""
        n_rows = len(inputs["dense"])
        out = {name: np.zeros(n_rows, dtype=np.float32) for name in HEADS}
        for start in range(0, n_rows, batch_size):
            chunk = _tensors({k: v[start : start + batch_size] for k, v in inputs.items()})
            raw = self.model(chunk)
            for name in HEADS:
                values = torch.sigmoid(raw[name]) if name in BINARY_HEADS else raw[name]
                out[name][start : start + batch_size] = values.numpy()
        return out

    def relative_watch(self, watch_log1p: FloatArray) -> FloatArray:
        """The watch head in units of a typical watch, comparable with the heads' probabilities.

        The head predicts ``log1p`` seconds (5-9 for minutes of video) while the other heads are
        probabilities below 1; weighted as they are, the watch head would rank by item length.
        """
        return np.asarray(watch_log1p / self.watch_scale, dtype=np.float32)

    def combine(self, predictions: Mapping[str, FloatArray], surface: str) -> FloatArray:
        """The final score of each row on a surface: the weighted sum of the head outputs."""
        weights = self.surface_weights.get(surface, self.surface_weights["default"])
        return np.asarray(
            weights.click * predictions["click"]
            + weights.like * predictions["like"]
            + weights.purchase * predictions["purchase"]
            + weights.watch_time * self.relative_watch(predictions["watch_time"]),
            dtype=np.float32,
        )

    def score(
        self,
        user_embedding: FloatArray,
        history: IntArray,
        candidate_rows: IntArray,
        *,
        surface: str = "default",
        device: str | None = None,
        hour: int | None = None,
        cf_score: FloatArray | None = None,
        cf_rank: FloatArray | None = None,
        interests: IntArray | None = None,
        region: int = UNKNOWN,
        language: int = UNKNOWN,
    ) -> FloatArray:
        """Score one user's candidates.

        Args:
            user_embedding: ``(dim,)`` two-tower user embedding.
            history: ``(history_length,)`` item vocabulary indices of recent positives.
            candidate_rows: Catalog rows of the candidates.
            surface: Request surface (weights and the surface embedding).
            device: Device class, if known.
            hour: UTC hour of day (0-23), if known.
            cf_score: EASE score of each candidate (see :meth:`RankerFeatureBuilder.build`).
            cf_rank: EASE rank of each candidate.
            interests: ``(k,)`` the user's onboarding interests as ``category`` indices.
            region: The user's ``region`` index.
            language: The user's ``language`` index.

        Returns:
            One score per candidate, same order; higher is better.
        """
        n_rows = len(candidate_rows)
        vocabularies = self.builder.vocabularies
        inputs = self.builder.build(
            np.repeat(user_embedding[None, :], n_rows, axis=0),
            np.repeat(history[None, :], n_rows, axis=0),
            candidate_rows,
            np.full(n_rows, vocabularies.surface.index(surface), dtype=np.int64),
            np.full(n_rows, vocabularies.device.index(device), dtype=np.int64),
            np.full(n_rows, 0 if hour is None else hour + 1, dtype=np.int64),
            cf_score,
            cf_rank,
            None if interests is None else np.repeat(interests[None, :], n_rows, axis=0),
            np.full(n_rows, region, dtype=np.int64),
            np.full(n_rows, language, dtype=np.int64),
        )
        return self.combine(self.predict(inputs), surface)

    def save(self, directory: str | Path) -> None:
        """Write the weights, the model shape and the item statistics."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), root / WEIGHTS_FILE)
        shape = {
            "config": self.model.config.model_dump(mode="json"),
            "sizes": asdict(self.model.sizes),
            "surface_weights": {k: v.model_dump() for k, v in self.surface_weights.items()},
            "watch_scale": self.watch_scale,
        }
        (root / MODEL_FILE).write_text(json.dumps(shape, indent=2))

    @classmethod
    def load(cls, directory: str | Path, builder: RankerFeatureBuilder) -> RankerServing:
        """Read what :meth:`save` wrote.

        Args:
            directory: The directory given to :meth:`save`.
            builder: The feature builder of the same release.

        Returns:
            The serving module.
        """
        root = Path(directory)
        shape = json.loads((root / MODEL_FILE).read_text())
        model = MultiTaskRanker(RankerConfig.model_validate(shape["config"]), RankerSizes(**shape["sizes"]))
        model.load_state_dict(torch.load(root / WEIGHTS_FILE, map_location="cpu", weights_only=True))
        weights = {k: HeadWeights.model_validate(v) for k, v in shape["surface_weights"].items()}
        return cls(model, builder, weights, float(shape.get("watch_scale", 1.0)))
