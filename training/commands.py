"""``rayrec train``, ``rayrec tune``, ``rayrec eval`` and ``rayrec models …``.

Registered into the ``rayrec`` parser by :mod:`cluster.cli`. Heavy imports (Ray, torch) happen
inside the command functions so ``rayrec --help`` stays instant. Commands that need Ray attach to
the cluster the process belongs to (``ray job submit -- rayrec train`` or ``RAY_ADDRESS``) and only
start a local instance, with ``--num-cpus``, when there is none.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.settings import Settings

if TYPE_CHECKING:
    from training.config import TrainConfig


def _home(args: argparse.Namespace) -> str:
    settings = Settings.from_env(home=args.home) if getattr(args, "home", None) else Settings.from_env()
    return settings.home


def _train_config(args: argparse.Namespace) -> TrainConfig:
    from training.config import DatasetConfig, TrainConfig

    if args.config is not None:
        config = TrainConfig.from_yaml(args.config, smoke_test=args.smoke_test)
    else:
        config = TrainConfig.smoke_test() if args.smoke_test else TrainConfig()
    updates: dict[str, Any] = {}
    if args.protocol is not None:
        data = config.data.model_dump()
        data["protocol"] = args.protocol
        updates["data"] = DatasetConfig.model_validate(data)
    if getattr(args, "register_bundle", None) is not None:
        updates["register_bundle"] = args.register_bundle
    # Re-validated as a whole so overrides cannot smuggle in an invalid combination.
    return TrainConfig.model_validate({**config.model_dump(), **updates}) if updates else config


def cmd_train(args: argparse.Namespace) -> int:
    """Train, evaluate and register a release from the lake."""
    from training.pipeline import connect_ray, run_training

    config = _train_config(args)
    connect_ray(num_cpus=args.num_cpus)
    run = run_training(config, home=_home(args))
    timings = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in run.timings_s.items())
    print(f"timings: {timings}")
    if run.bundle is None:
        print("not registered (--no-register)")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Search two-tower hyper-parameters with Ray Tune (ASHA), then train and register the best."""
    from training.pipeline import connect_ray
    from training.tune import TuneConfig, run_tune

    config = _train_config(args)
    tune_config = TuneConfig(num_samples=args.num_samples, max_concurrent=args.max_concurrent)
    connect_ray(num_cpus=args.num_cpus)
    outcome = run_tune(config, tune_config, home=_home(args))
    print(f"best: {json.dumps(outcome.best_params)} (valid recall {outcome.best_metric:.4f})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a registered release (or the baselines alone) on the lake's current split."""
    from core.lake import Lake
    from training.datasets import build_training_data
    from training.pipeline import connect_ray, evaluate_release
    from training.registry import ModelRegistry, RegistryError
    from training.release import load_release

    config = _train_config(args)
    home = _home(args)
    release = None
    if args.model is not None:
        try:
            release = load_release(ModelRegistry(home).load_bundle(args.model))
        except RegistryError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    connect_ray(num_cpus=args.num_cpus)
    data = build_training_data(Lake(home), config.data)
    report, extra = evaluate_release(release, data, config.eval, config.retrieval, config.collaborative)
    print(report.render())
    for name, value in extra.items():
        print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
    if args.output is not None:
        report.to_json(args.output)
        print(f"report written to {args.output}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """List, show, promote and roll back registered releases."""
    from training.registry import BundleError, ModelRegistry, RegistryError

    registry = ModelRegistry(_home(args))
    try:
        if args.action == "list":
            bundles = registry.list()
            if not bundles:
                print(f"no bundles in {registry.root}")
            for info in bundles:
                recall = info.metrics.get("test_two_tower_Recall@20")
                figure = f"  two-tower Recall@20 {recall:.4f}" if isinstance(recall, float) else ""
                aliases = f"  [{', '.join(info.aliases)}]" if info.aliases else ""
                print(f"{info.version}  {info.created_at:%Y-%m-%d %H:%M}Z{figure}{aliases}")
        elif args.action == "show":
            manifest = registry.show(args.version)
            print(manifest.model_dump_json(indent=2, exclude={"metrics"} if args.brief else None))
        elif args.action == "promote":
            version = registry.promote(args.version, args.alias)
            print(f"{args.alias} -> {version}")
        else:
            version = registry.rollback(args.alias)
            print(f"{args.alias} -> {version}")
    except (RegistryError, BundleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _training_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--smoke-test", action="store_true", help="tiny configuration: every stage in minutes"
    )
    parser.add_argument(
        "--config", type=Path, help="YAML file of TrainConfig fields (merged over the defaults)"
    )
    parser.add_argument(
        "--protocol", choices=["published", "temporal"], help="evaluation split (default: from the config)"
    )
    parser.add_argument("--num-cpus", type=int, help="CPUs of a locally started Ray (ignored on a cluster)")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add this package's subcommands to the ``rayrec`` parser.

    Args:
        sub: The ``add_subparsers`` object of the ``rayrec`` parser.
        common: Parent parser with the shared options (``--home``, …).
    """
    train = sub.add_parser("train", parents=[common], help="train, evaluate and register a release")
    _training_options(train)
    train.add_argument(
        "--register",
        dest="register_bundle",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="register the release in the model registry (default: from the config, on)",
    )
    train.set_defaults(func=cmd_train)

    tune = sub.add_parser(
        "tune", parents=[common], help="hyper-parameter search (Ray Tune, ASHA), then train"
    )
    _training_options(tune)
    tune.add_argument(
        "--register", dest="register_bundle", action=argparse.BooleanOptionalAction, default=None
    )
    tune.add_argument("--num-samples", type=int, default=8, help="trials to run")
    tune.add_argument("--max-concurrent", type=int, default=2, help="trials at once")
    tune.set_defaults(func=cmd_tune)

    evaluate = sub.add_parser("eval", parents=[common], help="evaluate a release against the baselines")
    _training_options(evaluate)
    evaluate.add_argument("--model", help="version or alias to evaluate (default: baselines only)")
    evaluate.add_argument("--output", help="write the report as JSON here (path or URI)")
    evaluate.set_defaults(func=cmd_eval)

    # The shared options go on each action, so they read naturally after it (`models list --home …`).
    models = sub.add_parser("models", help="list, show, promote, roll back releases")
    actions = models.add_subparsers(dest="action", required=True)
    actions.add_parser("list", parents=[common], help="registered releases, oldest first")
    show = actions.add_parser("show", parents=[common], help="a release's manifest")
    show.add_argument("version", help="version or alias")
    show.add_argument("--brief", action="store_true", help="leave the metrics out")
    promote = actions.add_parser("promote", parents=[common], help="point an alias at a release")
    promote.add_argument("version", help="version or alias to promote")
    promote.add_argument("--alias", default="production")
    rollback = actions.add_parser(
        "rollback", parents=[common], help="move an alias back to its previous release"
    )
    rollback.add_argument("--alias", default="production")
    models.set_defaults(func=cmd_models)
