"""Typed configuration of the offline pipeline: data, models, training, retrieval, evaluation.

Every model is strict (``extra="forbid"``) and frozen, with a docstring under each field; a YAML
file given to ``rayrec train --config`` is validated against :class:`TrainConfig` before anything
runs, and the validated config is what the release bundle records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.schema import EventType


class StrictConfig(BaseModel):
    """Base of every config model: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetConfig(StrictConfig):
    """How lake events become training and evaluation data."""

    positive_event_types: tuple[EventType, ...] = (
        EventType.CLICK,
        EventType.LIKE,
        EventType.SHARE,
        EventType.PURCHASE,
        EventType.WATCH,
    )
    """Event types that are two-tower positives. MovieLens imports a rating of 4 or more as a
    ``like``, so the default makes "rating >= 4" the MovieLens positive."""
    min_watch_s: Annotated[float, Field(ge=0)] = 30.0
    """A ``watch`` event is positive only when at least this many seconds were watched."""
    train_min_rating: Annotated[float, Field(ge=0)] | None = None
    """When set, a rated event (MovieLens ``view``) is also a two-tower positive when its rating
    reaches this, whatever its type: 3.0 trains on the positives the published protocol evaluates."""
    eval_min_rating: Annotated[float, Field(ge=0)] = 3.0
    """Evaluation positives: a rated event (MovieLens ``view``) counts when its rating reaches this
    (protocol (a) of the evaluation, ratings >= 3); unrated events count by the rules above."""
    protocol: Literal["published", "temporal"] = "published"
    """Evaluation split: ``published`` (per-user random 80/10/10) or ``temporal`` (time cut-offs)."""
    split_seed: int = 42
    """Seed of the ``published`` split, recorded with the results."""
    history_length: Annotated[int, Field(ge=1, le=200)] = 20
    """Previous positive items kept as a user's history (the user tower's sequence input)."""
    max_tags: Annotated[int, Field(ge=1, le=64)] = 8
    """Tags per item the item tower reads (the first ones)."""
    user_buckets: Annotated[int, Field(ge=1)] = 50_000
    """Hash buckets of user ids; unseen users land in a bucket instead of failing."""
    dedupe_partitions: Annotated[int, Field(ge=1)] = 8
    """Hash partitions of the event-id de-duplication shuffle."""
    read_blocks: Annotated[int, Field(ge=1)] | None = None
    """Ray Data read parallelism for the events table; Ray chooses when unset. Small values help
    on small machines: the lake holds one file per day, and a task per file costs more than it reads."""


class TwoTowerConfig(StrictConfig):
    """Shape of the two-tower model."""

    embedding_dim: Annotated[int, Field(ge=4, le=1024)] = 64
    """Dimension of the L2-normalised user and item embeddings (and of the ANN index)."""
    id_dim: Annotated[int, Field(ge=2)] = 32
    """Dimension of the id embeddings (item id, user bucket, history items)."""
    content_dim: Annotated[int, Field(ge=2)] = 16
    """Dimension of each content and profile embedding (type, category, tags, creator, age, …)."""
    hidden_dims: tuple[Annotated[int, Field(ge=1)], ...] = (128,)
    """Hidden layers of each tower's MLP, before the output projection."""
    item_id_dropout: Annotated[float, Field(ge=0, le=1)] = 0.25
    """Share of training rows whose item id embedding is dropped, so the tower learns to embed an
    item from content alone (what new items get)."""
    user_id_dropout: Annotated[float, Field(ge=0, le=1)] = 0.25
    """Share of training rows whose user bucket embedding is dropped, so new users (whose bucket is
    shared with others) lean on history and profile."""


class TwoTowerTrainConfig(StrictConfig):
    """How the two-tower model is trained."""

    epochs: Annotated[int, Field(ge=1)] = 8
    """Passes over the positives."""
    batch_size: Annotated[int, Field(ge=2)] = 512
    """Rows per worker per step; the other rows of a batch are each row's negatives."""
    lr: Annotated[float, Field(gt=0)] = 3e-3
    """Adam learning rate."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    """Adam weight decay."""
    temperature: Annotated[float, Field(gt=0)] = 0.05
    """Softmax temperature dividing the cosine logits."""
    logq_correction: bool = True
    """Subtract the log of each item's in-batch sampling probability from its logit, so popular
    items are not over-penalised as negatives."""
    num_workers: Annotated[int, Field(ge=1)] = 2
    """Ray Train workers (DDP over gloo on CPU)."""
    cpus_per_worker: Annotated[float, Field(gt=0)] = 1.0
    """CPUs reserved by each worker."""
    torch_threads: Annotated[int, Field(ge=1)] = 1
    """Intra-op threads of each worker; one per reserved CPU avoids oversubscription."""
    eval_k: Annotated[int, Field(ge=1)] = 20
    """Cut-off of the validation recall reported after each epoch."""
    eval_max_users: Annotated[int, Field(ge=1)] = 2000
    """Validation users scored per epoch (a fixed sample; all users are scored in the final
    evaluation)."""
    seed: int = 0
    """Seed of initialisation, dropout and shuffling."""


class HeadWeights(StrictConfig):
    """How much each ranker head counts in one surface's final score."""

    click: float = 1.0
    """Weight of P(click)."""
    like: float = 1.0
    """Weight of P(like)."""
    purchase: float = 1.0
    """Weight of P(purchase)."""
    watch_time: float = 0.1
    """Weight of the predicted log1p watch seconds."""


class RankerConfig(StrictConfig):
    """Shape and training of the multi-task ranker."""

    hidden_dims: tuple[Annotated[int, Field(ge=1)], ...] = (128, 64)
    """Shared bottom MLP."""
    context_dim: Annotated[int, Field(ge=2)] = 8
    """Dimension of each context embedding (surface, device, hour of day)."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1
    """Dropout in the shared bottom."""
    epochs: Annotated[int, Field(ge=1)] = 4
    """Passes over the examples (the most, with ``patience``)."""
    patience: Annotated[int, Field(ge=1)] | None = None
    """Stop once this many epochs in a row have not raised the click AUC on the held-out users,
    and keep the weights of the best epoch. ``None`` trains every epoch and keeps the last."""
    batch_size: Annotated[int, Field(ge=2)] = 1024
    """Examples per worker per step."""
    lr: Annotated[float, Field(gt=0)] = 2e-3
    """Adam learning rate."""
    negatives_per_positive: Annotated[int, Field(ge=1)] = 4
    """Negatives per positive when the lake has no impressions."""
    hard_negative_share: Annotated[float, Field(ge=0, le=1)] = 0.5
    """Share of those negatives drawn from the user's two-tower top ``hard_negative_pool`` rather
    than by popularity: the ranker re-orders retrieved candidates, so it must learn to tell apart
    items the retriever already likes."""
    hard_negative_pool: Annotated[int, Field(ge=1)] = 200
    """Retrieval depth hard negatives are drawn from."""
    max_examples: Annotated[int, Field(ge=100)] = 2_000_000
    """Cap on training examples (most recent kept)."""
    impression_window_s: Annotated[float, Field(gt=0)] = 86_400.0
    """An event counts as the outcome of an impression when it follows it within this window."""
    surface_weights: dict[str, HeadWeights] = Field(default_factory=lambda: {"default": HeadWeights()})
    """Head weights per surface; ``default`` is used for surfaces not listed."""
    num_workers: Annotated[int, Field(ge=1)] = 2
    """Ray Train workers."""
    cpus_per_worker: Annotated[float, Field(gt=0)] = 1.0
    """CPUs reserved by each worker."""
    torch_threads: Annotated[int, Field(ge=1)] = 1
    """Intra-op threads of each worker."""
    seed: int = 0
    """Seed of initialisation, sampling and shuffling."""
    objective: Literal["pointwise", "listwise"] = "listwise"
    """How the click and like heads learn when the lake has no impressions: ``listwise`` is a
    softmax cross-entropy over each user's out-of-fold candidate list (see ``oof_folds``), which
    needs the collaborative model; ``pointwise`` is binary cross-entropy on positives and sampled
    negatives. Logged impressions are always learnt pointwise (their labels are outcomes of what
    was shown)."""
    oof_folds: Annotated[int, Field(ge=2, le=20)] = 5
    """Folds of the training positives for the listwise lists: EASE is fitted on all folds but one
    and the held-out fold's positives are the labels of its users' candidate lists."""
    list_size: Annotated[int, Field(ge=8)] = 128
    """Candidates per training list: the first ``list_size`` of the candidates in EASE order
    (chosen without looking at the labels)."""
    pointwise_weight: Annotated[float, Field(ge=0)] = 0.2
    """Weight of the binary cross-entropy added to the listwise loss; it keeps the head outputs
    calibrated probabilities, so the per-surface weighted sum of heads stays meaningful."""
    cf_residual: float = 1.0
    """Initial weight of the standardised EASE score added to the click and like logits."""
    two_tower_inputs: bool | None = None
    """Whether the ranker reads the two-tower embeddings and score. ``None``: not with the
    listwise objective, whose lists come from folds the two-tower model was trained on (its score
    would name the labels there and mislead the ranker at test time), yes otherwise."""

    def reads_two_tower(self) -> bool:
        """The resolved :attr:`two_tower_inputs`."""
        return self.two_tower_inputs if self.two_tower_inputs is not None else self.objective != "listwise"

    @model_validator(mode="after")
    def _has_default(self) -> RankerConfig:
        if "default" not in self.surface_weights:
            raise ValueError("surface_weights needs a 'default' entry for surfaces not listed")
        return self


class RetrievalConfig(StrictConfig):
    """The ANN index and the item-item table built from the trained item embeddings."""

    index: Literal["auto", "scann", "exact"] = "auto"
    """``auto`` picks exact search for small catalogs and ScaNN above ``exact_max_items``."""
    exact_max_items: Annotated[int, Field(ge=1)] = 20_000
    """Largest catalog ``auto`` searches exactly."""
    candidates_k: Annotated[int, Field(ge=1)] = 500
    """Candidates retrieved per user before ranking (two-stage evaluation and serving)."""
    item_neighbours: Annotated[int, Field(ge=1)] = 50
    """Neighbours per item in the item-item table."""
    recall_queries: Annotated[int, Field(ge=1)] = 500
    """Queries used to measure the ANN index's recall against exact search."""


class CollaborativeConfig(StrictConfig):
    """The EASE model: a candidate source and the ranker's collaborative features."""

    enabled: bool = True
    """Fit and ship the model (catalogs above ``max_items`` never get one)."""
    l2: Annotated[float, Field(gt=0)] = 300.0
    """Ridge penalty λ of EASE, chosen on the validation part of MovieLens 100K (NDCG@10 0.2435,
    0.2516, 0.2534, 0.2518, 0.2509, 0.2479 at 100, 200, 300, 400, 500, 700)."""
    max_items: Annotated[int, Field(ge=1, le=10_000)] = 10_000
    """Largest catalog that gets the dense items-by-items matrix."""
    history_length: Annotated[int, Field(ge=1)] | None = None
    """Most recent training positives a user's EASE score reads offline; ``None`` reads them all
    (serving reads the positives among the last 50 events the online store keeps)."""
    two_tower_k: Annotated[int, Field(ge=1)] = 100
    """Two-tower candidates in the union; EASE fills the rest of ``candidates_k``."""


class EvalConfig(StrictConfig):
    """Offline evaluation against baselines on the same split."""

    ks: tuple[Annotated[int, Field(ge=1)], ...] = (10, 20)
    """Cut-offs of the ranking metrics."""
    baselines: tuple[Literal["most_pop", "item_knn", "ease"], ...] = ("most_pop", "item_knn", "ease")
    """Baselines scored beside the models."""
    two_stage: bool = True
    """Also evaluate retrieval top-``candidates_k`` re-ranked by the ranker."""
    surface: str = "home"
    """Surface the two-stage evaluation ranks for (its head weights and context embedding)."""
    part: Literal["valid", "test"] = "test"
    """Held-out part the models are scored on: ``valid`` for choosing hyper-parameters, ``test``
    for the reported numbers."""
    bootstrap_samples: Annotated[int, Field(ge=0)] = 1000
    """Paired bootstrap resamples of users for the NDCG@10 difference of two_stage against EASE
    (0 turns it off)."""


class TrainConfig(StrictConfig):
    """Everything one ``rayrec train`` run needs; recorded whole in the release bundle."""

    data: DatasetConfig = DatasetConfig()
    """Lake to training data."""
    two_tower: TwoTowerConfig = TwoTowerConfig()
    """Two-tower model shape."""
    two_tower_train: TwoTowerTrainConfig = TwoTowerTrainConfig()
    """Two-tower training."""
    ranker: RankerConfig = RankerConfig()
    """Multi-task ranker."""
    retrieval: RetrievalConfig = RetrievalConfig()
    """ANN index and item-item table."""
    collaborative: CollaborativeConfig = CollaborativeConfig()
    """EASE candidates and ranker features."""
    eval: EvalConfig = EvalConfig()
    """Evaluation."""
    register_bundle: bool = True
    """Register the result as a new bundle in the model registry."""
    promote_to: str | None = "candidate"
    """Alias pointed at the new bundle (``None``: none). Production is only ever promoted by hand."""
    description: str = ""
    """Free text recorded in the bundle (what this run is for)."""

    @classmethod
    def smoke_test(cls, **overrides: Any) -> TrainConfig:
        """A tiny configuration that exercises every stage in a few minutes on a laptop.

        Args:
            **overrides: Top-level fields to replace (e.g. ``register_bundle=False``).

        Returns:
            The configuration.
        """
        base = cls(
            data=DatasetConfig(dedupe_partitions=2, read_blocks=2, user_buckets=1000),
            two_tower=TwoTowerConfig(embedding_dim=16, id_dim=16, content_dim=8, hidden_dims=(32,)),
            two_tower_train=TwoTowerTrainConfig(epochs=2, batch_size=128, eval_max_users=200),
            ranker=RankerConfig(
                hidden_dims=(32,),
                epochs=1,
                batch_size=256,
                negatives_per_positive=2,
                oof_folds=3,
                list_size=64,
            ),
            retrieval=RetrievalConfig(candidates_k=100, item_neighbours=10, recall_queries=50),
            collaborative=CollaborativeConfig(two_tower_k=50),
            eval=EvalConfig(bootstrap_samples=200),
            description="smoke test",
        )
        return base.model_copy(update=overrides)

    @classmethod
    def from_yaml(cls, path: str | Path, *, smoke_test: bool = False) -> TrainConfig:
        """Load a YAML file, over the default or the smoke-test configuration.

        Nested sections are merged key by key, so a file may set only ``two_tower_train.lr``.

        Args:
            path: The YAML file.
            smoke_test: Start from :meth:`smoke_test` instead of the defaults.

        Returns:
            The validated configuration.

        Raises:
            pydantic.ValidationError: The file holds unknown keys or invalid values.
            ValueError: The file is not a YAML mapping.
        """
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
        base = (cls.smoke_test() if smoke_test else cls()).model_dump(mode="json")
        return cls.model_validate(_merge(base, raw))


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "surface_weights":
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged
