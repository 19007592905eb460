"""Training the two-tower model: one epoch loop, run by Ray Train workers or in plain PyTorch.

:func:`train_loop_per_worker` is what ``TorchTrainer`` runs on each worker: it reads the worker's
shard of the positives (``ray.train.get_dataset_shard("train")``), wraps the model in DDP
(``prepare_model``), and after every epoch reports the mean loss, throughput and (rank 0) the
validation recall@k with ``ray.train.report``; the last report carries the checkpoint.
:func:`fit_two_tower` launches it and loads the final checkpoint back.

:func:`fit_two_tower_local` runs the very same :func:`train_epoch` on in-memory arrays without Ray,
which is what the training benchmark compares against to measure Ray Train's overhead.

Negatives are the other rows of a worker's local batch; they are not gathered across workers, so
the number of negatives per row is ``batch_size - 1`` whatever the number of workers.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from training.config import TwoTowerConfig, TwoTowerTrainConfig
from training.encoding import ItemFeatures
from training.two_tower import (
    ITEM_INPUTS,
    USER_INPUTS,
    SampledSoftmaxTask,
    TwoTowerModel,
    TwoTowerSizes,
    to_tensors,
)

if TYPE_CHECKING:
    import ray.data
    import ray.train

    from training.datasets import TrainingData

logger = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]

TRAIN_COLUMNS: Final = (*USER_INPUTS, *ITEM_INPUTS, "log_q")
"""Columns of the positives a training step reads."""

CHECKPOINT_FILE: Final = "model.pt"
_SHUFFLE_BUFFER_BATCHES = 8


@dataclass(frozen=True, eq=False)
class ValidationSet:
    """Held-out positives to report recall@k on after each epoch.

    Attributes:
        user_inputs: The user tower's inputs, one row per validation user.
        items: Items ranked (the catalog).
        target_indptr: CSR row pointers of each user's held-out items.
        target_items: Held-out items, as rows of ``items``.
        exclude_indptr: CSR row pointers of each user's known (training) items.
        exclude_items: Known items, as rows of ``items``; removed from the ranking.
        k: Cut-off.
    """

    user_inputs: dict[str, IntArray]
    items: ItemFeatures
    target_indptr: IntArray
    target_items: IntArray
    exclude_indptr: IntArray
    exclude_items: IntArray
    k: int

    @property
    def n_users(self) -> int:
        """Validation users."""
        return len(self.target_indptr) - 1

    @classmethod
    def from_training_data(
        cls,
        data: TrainingData,
        *,
        part: str = "valid",
        k: int = 20,
        max_users: int | None = None,
        seed: int = 0,
    ) -> ValidationSet:
        """Validation users of the split, with targets and exclusions mapped to catalog rows.

        Args:
            data: The training data (its split, catalog and user histories).
            part: ``"valid"`` or ``"test"``.
            k: Cut-off.
            max_users: Keep a fixed random sample of this many users.
            seed: Seed of the sample.

        Returns:
            The validation set.
        """
        assert part in ("valid", "test"), f"part must be 'valid' or 'test', got {part!r}"
        split = data.split
        targets = split.part("valid" if part == "valid" else "test")
        known = split.known_before("valid" if part == "valid" else "test")
        users = targets.active_users()
        if max_users is not None and len(users) > max_users:
            users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
        catalog_row = data.items.positions(split.train.item_ids.tolist())

        def csr(interactions: Any) -> tuple[IntArray, IntArray]:
            rows, items = interactions.coordinates(users)
            mapped = catalog_row[items]
            keep = mapped >= 0
            counts = np.bincount(rows[keep], minlength=len(users))
            indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            return indptr, mapped[keep].astype(np.int64)

        target_indptr, target_items = csr(targets)
        exclude_indptr, exclude_items = csr(known)
        return cls(
            user_inputs=data.user_inputs(split.train.user_ids[users].tolist()),
            items=data.items,
            target_indptr=target_indptr,
            target_items=target_items,
            exclude_indptr=exclude_indptr,
            exclude_items=exclude_items,
            k=k,
        )


@torch.no_grad()
def validation_recall(model: TwoTowerModel, validation: ValidationSet) -> float:
    """Mean recall@k of the model over the validation users (known items excluded).

    Args:
        model: The model (unwrapped); it is put in eval mode and restored after.
        validation: The validation set.

    Returns:
        Mean over users with targets of ``|top-k ∩ targets| / |targets|``.
    """
    was_training = model.training
    model.eval()
    try:
        item_inputs = to_tensors(validation.items.arrays())
        items = model.item_tower(*(item_inputs[n] for n in ITEM_INPUTS))
        user_inputs = to_tensors(validation.user_inputs)
        users = model.user_tower(*(user_inputs[n] for n in USER_INPUTS))
        scores = (users @ items.T).numpy()
    finally:
        model.train(was_training)
    rows = np.repeat(np.arange(validation.n_users), np.diff(validation.exclude_indptr))
    scores[rows, validation.exclude_items] = -np.inf
    k = min(validation.k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    recalls = []
    for user in range(validation.n_users):
        wanted = validation.target_items[validation.target_indptr[user] : validation.target_indptr[user + 1]]
        if len(wanted):
            recalls.append(len(np.intersect1d(top[user], wanted)) / len(wanted))
    return float(np.mean(recalls)) if recalls else 0.0


@dataclass(frozen=True, eq=False)
class TwoTowerJob:
    """Everything a training worker needs besides its data shard (sent to every worker).

    Attributes:
        model: Model shape.
        train: Training settings.
        sizes: Embedding table rows.
        validation: Held-out users for per-epoch recall (rank 0 only), or ``None``.
    """

    model: TwoTowerConfig
    train: TwoTowerTrainConfig
    sizes: TwoTowerSizes
    validation: ValidationSet | None = None


@dataclass
class EpochStats:
    """What one epoch did on one worker.

    Attributes:
        loss_sum: Sum over steps of the batch loss.
        steps: Optimiser steps.
        rows: Training rows consumed.
        seconds: Wall time of the epoch, data loading included.
    """

    loss_sum: float = 0.0
    steps: int = 0
    rows: int = 0
    seconds: float = 0.0

    @property
    def loss(self) -> float:
        """Mean batch loss (NaN without steps)."""
        return self.loss_sum / self.steps if self.steps else math.nan


def train_epoch(
    model: torch.nn.Module,
    task: SampledSoftmaxTask,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Mapping[str, Tensor]],
) -> EpochStats:
    """One pass of sampled-softmax training over ``batches``.

    Args:
        model: A :class:`TwoTowerModel`, possibly wrapped in DDP.
        task: The loss.
        optimizer: The optimiser of ``model``'s parameters.
        batches: Dicts of tensors with :data:`TRAIN_COLUMNS`.

    Returns:
        The epoch's statistics.
    """
    model.train()
    stats = EpochStats()
    started = time.perf_counter()
    for batch in batches:
        rows = len(batch["log_q"])
        if rows < 2:
            # A single row has no in-batch negative: the softmax would be trivially 1.
            continue
        users, items = model(batch)
        loss = task(users, items, batch["log_q"], batch["item_index"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        stats.loss_sum += loss.item()
        stats.steps += 1
        stats.rows += rows
    stats.seconds = time.perf_counter() - started
    return stats


def _make(job: TwoTowerJob) -> tuple[TwoTowerModel, SampledSoftmaxTask]:
    torch.manual_seed(job.train.seed)
    model = TwoTowerModel(job.model, job.sizes)
    task = SampledSoftmaxTask(job.train.temperature, logq_correction=job.train.logq_correction)
    return model, task


def _optimizer(model: torch.nn.Module, config: TwoTowerTrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def _epoch_metrics(epoch: int, stats: EpochStats, loss: float, rows: int) -> dict[str, float]:
    return {
        "epoch": float(epoch),
        "loss": loss,
        "rows": float(rows),
        "seconds": stats.seconds,
        "samples_per_s": rows / stats.seconds if stats.seconds > 0 else 0.0,
    }


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function of ``TorchTrainer``.

    Args:
        config: ``{"job": TwoTowerJob}`` (the ``train_loop_config``).
    """
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    job: TwoTowerJob = config["job"]
    torch.set_num_threads(job.train.torch_threads)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    model, task = _make(job)
    wrapped = ray.train.torch.prepare_model(model)
    optimizer = _optimizer(wrapped, job.train)
    shard = ray.train.get_dataset_shard("train")
    assert shard is not None, "TorchTrainer was started without a 'train' dataset"
    history: list[dict[str, float]] = []
    for epoch in range(1, job.train.epochs + 1):
        batches = shard.iter_torch_batches(
            batch_size=job.train.batch_size,
            local_shuffle_buffer_size=job.train.batch_size * _SHUFFLE_BUFFER_BATCHES,
            local_shuffle_seed=job.train.seed * 1000 + epoch * 10 + rank,
            drop_last=True,
        )
        stats = train_epoch(wrapped, task, optimizer, batches)
        totals = torch.tensor([stats.loss_sum, stats.steps, stats.rows], dtype=torch.float64)
        if world > 1 and dist.is_initialized():
            dist.all_reduce(totals)
        loss_sum, steps, rows = totals.tolist()
        metrics = _epoch_metrics(epoch, stats, loss_sum / steps if steps else math.nan, int(rows))
        if rank == 0 and job.validation is not None:
            metrics[f"valid_recall@{job.validation.k}"] = validation_recall(model, job.validation)
        history.append(metrics)
        last = epoch == job.train.epochs
        if last and rank == 0:
            with tempfile.TemporaryDirectory() as directory:
                torch.save(model.state_dict(), Path(directory) / CHECKPOINT_FILE)
                (Path(directory) / "history.json").write_text(json.dumps(history))
                checkpoint = ray.train.Checkpoint.from_directory(directory)
                ray.train.report(metrics, checkpoint=checkpoint)
        else:
            ray.train.report(metrics)


@dataclass
class TwoTowerResult:
    """A trained two-tower model and how training went.

    Attributes:
        model: The trained model, unwrapped, on CPU, in eval mode.
        history: Per-epoch metrics (loss, rows, samples_per_s, validation recall).
        checkpoint_path: Where the final Ray Train checkpoint is stored (``None`` without Ray).
        seconds: Wall time of the fit, worker start-up included.
    """

    model: TwoTowerModel
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint_path: str | None = None
    seconds: float = 0.0


def load_checkpoint(
    checkpoint: ray.train.Checkpoint, job: TwoTowerJob
) -> tuple[TwoTowerModel, list[dict[str, float]]]:
    """Read a checkpoint written by :func:`train_loop_per_worker`.

    Args:
        checkpoint: The checkpoint.
        job: The job it was trained with (for the model shape).

    Returns:
        The model in eval mode, and the per-epoch history.
    """
    model = TwoTowerModel(job.model, job.sizes)
    with checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        history = json.loads((Path(directory) / "history.json").read_text())
    model.load_state_dict(state)
    return model.eval(), history


def fit_two_tower(
    positives: ray.data.Dataset, job: TwoTowerJob, *, storage_path: str, name: str = "two_tower"
) -> TwoTowerResult:
    """Train with Ray Train (``TorchTrainer``, CPU workers, DDP) and load the final checkpoint.

    Args:
        positives: Two-tower rows (:func:`training.datasets.build_training_data`).
        job: Model, training settings and validation set.
        storage_path: Where Ray Train keeps run state and checkpoints (local path or URI).
        name: Run name (a directory under ``storage_path``).

    Returns:
        The trained model with its history.

    Raises:
        ray.train.TrainingFailedError: A worker failed.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    started = time.perf_counter()
    # Materialised before the workers start: once they hold every CPU, Ray Data could not run a
    # single task of a lazy pipeline and the shards would never fill.
    train = positives.select_columns(list(TRAIN_COLUMNS)).materialize()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.train.num_workers,
            use_gpu=False,
            resources_per_worker={"CPU": job.train.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(name=name, storage_path=storage_path),
        datasets={"train": train},
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    assert result.checkpoint is not None, "training finished without a checkpoint"
    model, history = load_checkpoint(result.checkpoint, job)
    return TwoTowerResult(
        model=model,
        history=history,
        checkpoint_path=result.checkpoint.path,
        seconds=time.perf_counter() - started,
    )


def _local_batches(
    arrays: Mapping[str, npt.NDArray[Any]], batch_size: int, rng: np.random.Generator
) -> Iterator[dict[str, Tensor]]:
    n_rows = len(arrays["log_q"])
    order = rng.permutation(n_rows)
    for start in range(0, n_rows - batch_size + 1, batch_size):
        rows = order[start : start + batch_size]
        yield to_tensors({name: arrays[name][rows] for name in TRAIN_COLUMNS})


def fit_two_tower_local(
    arrays: Mapping[str, npt.NDArray[Any]],
    job: TwoTowerJob,
    *,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TwoTowerResult:
    """Train in this process with plain PyTorch: the same epoch loop, no Ray, no DDP.

    Args:
        arrays: Two-tower rows as numpy columns (at least :data:`TRAIN_COLUMNS`).
        job: Model, training settings and validation set.
        on_epoch: Called with each epoch's metrics.

    Returns:
        The trained model with its history.
    """
    missing = [name for name in TRAIN_COLUMNS if name not in arrays]
    assert not missing, f"training arrays lack columns {missing}"
    started = time.perf_counter()
    torch.set_num_threads(job.train.torch_threads)
    model, task = _make(job)
    optimizer = _optimizer(model, job.train)
    rng = np.random.default_rng(job.train.seed)
    history = []
    for epoch in range(1, job.train.epochs + 1):
        stats = train_epoch(model, task, optimizer, _local_batches(arrays, job.train.batch_size, rng))
        metrics = _epoch_metrics(epoch, stats, stats.loss, stats.rows)
        if job.validation is not None:
            metrics[f"valid_recall@{job.validation.k}"] = validation_recall(model, job.validation)
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics)
    return TwoTowerResult(model=model.eval(), history=history, seconds=time.perf_counter() - started)


def positives_to_arrays(
    positives: ray.data.Dataset, columns: Sequence[str] = TRAIN_COLUMNS
) -> dict[str, npt.NDArray[Any]]:
    """Collect the training columns of the positives on the driver as numpy arrays."""
    parts: dict[str, list[npt.NDArray[Any]]] = {name: [] for name in columns}
    for batch in positives.select_columns(list(columns)).iter_batches(batch_size=None, batch_format="numpy"):
        for name in columns:
            parts[name].append(batch[name])
    return {name: np.concatenate(chunks) for name, chunks in parts.items() if chunks}
