"""``rayrec tune``: two-tower hyper-parameter search with Ray Tune and ASHA early stopping.

The data is built once (:func:`training.datasets.build_training_data`) and shared by every trial
through the object store. Each trial trains the two-tower model in its own process with the plain
PyTorch loop (:func:`training.train_two_tower.fit_two_tower_local`) and reports the validation
recall after every epoch; ASHA stops the trials that trail their rung. A trial is a single
process because on a small cluster a Ray Train worker group per trial would leave no CPU for a
second trial; the search is over the model and the optimiser, which the loop shares with Ray Train.

The best trial's parameters are then written into the :class:`~training.config.TrainConfig` and
the full pipeline runs with them (Ray Train fit, index, ranker, evaluation, registration).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy.typing as npt
from pydantic import Field

from core.lake import Lake
from core.settings import Settings
from training.config import StrictConfig, TrainConfig
from training.datasets import build_training_data
from training.pipeline import TrainingRun, run_training, storage_path_for
from training.train_two_tower import TwoTowerJob, ValidationSet, fit_two_tower_local, positives_to_arrays
from training.two_tower import TwoTowerSizes

logger = logging.getLogger(__name__)

METRIC = "valid_recall"
"""What the search maximises: validation recall at ``two_tower_train.eval_k``."""


class TuneConfig(StrictConfig):
    """The search space and the search."""

    num_samples: Annotated[int, Field(ge=1)] = 8
    """Trials."""
    max_concurrent: Annotated[int, Field(ge=1)] = 2
    """Trials at once."""
    cpus_per_trial: Annotated[float, Field(gt=0)] = 1.0
    """CPUs reserved per trial."""
    lr_range: tuple[float, float] = (1e-3, 1e-2)
    """Learning rate, sampled log-uniformly."""
    embedding_dims: tuple[int, ...] = (32, 64, 128)
    """Embedding dimensions to choose from."""
    temperature_range: tuple[float, float] = (0.02, 0.2)
    """Softmax temperature, sampled log-uniformly."""
    grace_period_epochs: Annotated[int, Field(ge=1)] = 1
    """Epochs every trial gets before ASHA may stop it."""
    reduction_factor: Annotated[int, Field(ge=2)] = 2
    """ASHA keeps 1 in this many trials at each rung."""
    seed: int = 0
    """Seed of the search."""


@dataclass
class TuneOutcome:
    """The search's result.

    Attributes:
        best_params: ``lr``, ``embedding_dim`` and ``temperature`` of the best trial.
        best_metric: Its last validation recall.
        trials: Every trial's parameters, last metric and epochs run.
        run: The full training run with the best parameters.
    """

    best_params: dict[str, Any]
    best_metric: float
    trials: list[dict[str, Any]] = field(default_factory=list)
    run: TrainingRun | None = None


def _trial(
    params: dict[str, Any],
    *,
    base: TrainConfig,
    arrays: dict[str, npt.NDArray[Any]],
    validation: ValidationSet,
    sizes: TwoTowerSizes,
) -> None:
    from ray import tune

    job = _job(base, params, sizes, validation)
    key = f"valid_recall@{validation.k}"

    def report(metrics: dict[str, float]) -> None:
        tune.report({METRIC: metrics[key], "loss": metrics["loss"], "epoch": metrics["epoch"]})

    fit_two_tower_local(arrays, job, on_epoch=report)


def _job(
    base: TrainConfig, params: dict[str, Any], sizes: TwoTowerSizes, validation: ValidationSet
) -> TwoTowerJob:
    config = apply_params(base, params)
    return TwoTowerJob(
        model=config.two_tower, train=config.two_tower_train, sizes=sizes, validation=validation
    )


def apply_params(config: TrainConfig, params: dict[str, Any]) -> TrainConfig:
    """The configuration with a trial's parameters written in (re-validated)."""
    data = config.model_dump()
    data["two_tower"]["embedding_dim"] = int(params["embedding_dim"])
    data["two_tower_train"]["lr"] = float(params["lr"])
    data["two_tower_train"]["temperature"] = float(params["temperature"])
    return TrainConfig.model_validate(data)


def run_tune(
    config: TrainConfig,
    tune_config: TuneConfig,
    *,
    home: str | None = None,
    log: Callable[[str], None] = print,
) -> TuneOutcome:
    """Search, then train (and register, per ``config``) with the best parameters.

    Ray must be initialised.

    Args:
        config: Base configuration; the searched fields are overwritten per trial.
        tune_config: Search space and budget.
        home: Data home; ``RAYREC_HOME`` when omitted.
        log: Where progress lines go.

    Returns:
        The best parameters, every trial, and the final training run.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    home = home or Settings.from_env().home
    data = build_training_data(Lake(home), config.data)
    arrays = positives_to_arrays(data.positives)
    validation = ValidationSet.from_training_data(
        data,
        k=config.two_tower_train.eval_k,
        max_users=config.two_tower_train.eval_max_users,
        seed=config.two_tower_train.seed,
    )
    sizes = TwoTowerSizes.from_vocabularies(data.vocabularies)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=config, arrays=arrays, validation=validation, sizes=sizes),
        {"cpu": tune_config.cpus_per_trial},
    )
    space = {
        "lr": tune.loguniform(*tune_config.lr_range),
        "embedding_dim": tune.choice(list(tune_config.embedding_dims)),
        "temperature": tune.loguniform(*tune_config.temperature_range),
    }
    scheduler = ASHAScheduler(
        max_t=config.two_tower_train.epochs,
        grace_period=min(tune_config.grace_period_epochs, config.two_tower_train.epochs),
        reduction_factor=tune_config.reduction_factor,
    )
    storage = storage_path_for(home)
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            scheduler=scheduler,
            num_samples=tune_config.num_samples,
            max_concurrent_trials=tune_config.max_concurrent,
            search_alg=BasicVariantGenerator(random_state=tune_config.seed),
        ),
        run_config=tune.RunConfig(name="tune_two_tower", storage_path=storage, verbose=0),
    )
    results = tuner.fit()
    best = results.get_best_result(metric=METRIC, mode="max")
    trials = []
    for i in range(len(results)):
        result = results[i]
        metrics = result.metrics or {}
        trials.append(
            {
                "params": {k: (result.config or {}).get(k) for k in space},
                METRIC: metrics.get(METRIC),
                "epochs": metrics.get("training_iteration", 0),
            }
        )
    for trial in trials:
        log(f"  trial {trial}")
    assert best.config is not None and best.metrics is not None, "no trial reported a result"
    params = {k: best.config[k] for k in space}
    log(f"best parameters {params}: {METRIC} {best.metrics[METRIC]:.4f}")
    final = apply_params(config, params)
    final = final.model_copy(update={"description": f"{config.description} tuned {params}".strip()})
    run = run_training(final, home=home, log=log, data=data)
    return TuneOutcome(best_params=params, best_metric=float(best.metrics[METRIC]), trials=trials, run=run)
