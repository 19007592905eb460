"""``rayrec simulate``: the closed feedback loop, and A/B and A/A tests, through the live application.

Registered into the ``rayrec`` parser by :mod:`cluster.cli`. The command builds a fresh world
(its catalog, users and follow graph; no behaviour unless ``--history-events``) in its own data
home and Redis namespace, deploys the Serve application on local Ray, and then either runs the
closed loop (:class:`training.experiments.closed_loop.ClosedLoop`) or an experiment through the
simulator (:func:`training.experiments.simulated_experiment.run_simulated_experiment`).

Serving and training share one small machine here, one after the other: serving is idle while a
release trains. The application is therefore deployed with one replica per deployment and small
CPU reservations (``--serve-cpus``), so Ray Data and Ray Train find CPUs to schedule on while the
application stays up; stage budgets are widened (``--budget-scale``) so the figures measure the
recommendations rather than how busy the machine was.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from uuid import uuid4

if TYPE_CHECKING:
    from core.settings import Settings
    from training.config import TrainConfig
    from training.synthetic import WorldConfig, WorldTruth

APP: Final = "rayrec-sim"
"""Application name of the simulated deployment (distinct from ``ray_config.yaml``'s ``rayrec``)."""

ADMIN_TOKEN_ENV: Final = "RAYREC_ADMIN_TOKEN"


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def widened_surfaces(
    path: Path, scale: float, ranker_weights: dict[str, float] | None = None, surface: str = "home"
) -> Path:
    """Write the shipped surfaces with every stage and source budget multiplied by ``scale``.

    Args:
        path: The YAML file to write.
        scale: Budget multiplier (1 keeps the shipped budgets).
        ranker_weights: Head weights replacing those of ``surface`` (the heads they name).
        surface: The surface ``ranker_weights`` applies to.

    Returns:
        ``path``.
    """
    import yaml

    from policies.surfaces import DEFAULT_SURFACES_PATH

    raw = yaml.safe_load(DEFAULT_SURFACES_PATH.read_text())
    for body in raw["surfaces"].values():
        budgets = body.get("budgets") or {
            "candidates_ms": 30,
            "features_ms": 30,
            "ranking_ms": 30,
            "rerank_ms": 10,
            "total_ms": 100,
        }
        body["budgets"] = {name: value * scale for name, value in budgets.items()}
        for source in body["sources"]:
            source["budget_ms"] = source.get("budget_ms", 20) * scale
    if ranker_weights:
        body = raw["surfaces"][surface]
        body["ranker_weights"] = {**(body.get("ranker_weights") or {}), **ranker_weights}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def simulation_serve_config(
    settings: Settings,
    *,
    app_name: str,
    port: int,
    budget_scale: float,
    serve_cpus: float,
    admin_token: str,
    ranker_weights: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The Serve config of the simulated application.

    One replica per deployment (no autoscaling) with ``serve_cpus`` reserved each, the shipped
    surfaces with budgets widened ``budget_scale`` times, the admin routes on with ``admin_token``.

    Args:
        settings: Data home, namespace and Redis of the simulation.
        app_name: Application name.
        port: HTTP port of the proxy (loopback).
        budget_scale: Budget multiplier.
        serve_cpus: CPUs reserved per replica.
        admin_token: Bearer token of the admin routes.
        ranker_weights: Head weights of the ``home`` surface replacing the shipped ones.

    Returns:
        A config for :func:`deployments.reload.deploy`.
    """
    from deployments.reload import serve_config

    surfaces = widened_surfaces(
        Path(settings.home) / "simulation" / "surfaces.yaml", budget_scale, ranker_weights
    )
    args = {
        "home": settings.home,
        "namespace": settings.namespace,
        "redis_url": settings.redis_url,
        "serving": {
            "surfaces_path": str(surfaces),
            "user_read_ms": min(1_000.0, 15.0 * budget_scale),
            "fallback_read_ms": min(1_000.0, 10.0 * budget_scale),
        },
    }
    config = serve_config(
        app_name, args, host="127.0.0.1", port=port, env_vars={ADMIN_TOKEN_ENV: admin_token}
    )
    for deployment in config["applications"][0]["deployments"]:
        deployment["ray_actor_options"] = {
            **(deployment.get("ray_actor_options") or {}),
            "num_cpus": serve_cpus,
        }
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = 1
    return config


@dataclass
class SimulatedServing:
    """The simulated application on Serve (:class:`training.experiments.closed_loop.ServingControl`)."""

    app_name: str
    base_url: str
    home: str
    admin_token: str

    @classmethod
    def deploy(
        cls,
        settings: Settings,
        *,
        app_name: str = APP,
        port: int | None = None,
        budget_scale: float = 10.0,
        serve_cpus: float = 0.1,
        ranker_weights: dict[str, float] | None = None,
        timeout_s: float = 600.0,
    ) -> SimulatedServing:
        """Deploy the application (Ray must be initialised) and wait until it answers.

        Args:
            settings: Data home, namespace and Redis.
            app_name: Application name.
            port: HTTP port; a free one when omitted.
            budget_scale: Budget multiplier.
            serve_cpus: CPUs reserved per replica.
            ranker_weights: Head weights of the ``home`` surface replacing the shipped ones.
            timeout_s: How long to wait for the application to run.

        Returns:
            The deployed application.
        """
        import asyncio

        from benchmarks.http_ready import wait_ready
        from deployments.reload import deploy

        chosen = port if port is not None else free_port()
        token = uuid4().hex
        config = simulation_serve_config(
            settings,
            app_name=app_name,
            port=chosen,
            budget_scale=budget_scale,
            serve_cpus=serve_cpus,
            admin_token=token,
            ranker_weights=ranker_weights,
        )
        deploy(config, timeout_s=timeout_s)
        base = f"http://127.0.0.1:{chosen}"
        asyncio.run(wait_ready(base, timeout_s=120))
        return cls(app_name=app_name, base_url=base, home=settings.home, admin_token=token)

    def serve_version(self, version: str) -> None:
        """Hot-swap the model deployments to a registered version and wait until they serve it."""
        from deployments.reload import apply_bundle

        apply_bundle(self.app_name, version, home=self.home)

    def shutdown(self) -> None:
        """Delete the application and stop Serve."""
        from ray import serve

        serve.delete(self.app_name)
        serve.shutdown()  # type: ignore[no-untyped-call]


def loop_train_config(
    *,
    workers: int = 1,
    cpus_per_worker: float = 1.0,
    two_tower_epochs: int = 6,
    ranker_epochs: int = 40,
    ranker_patience: int = 3,
) -> TrainConfig:
    """The smoke-sized training configuration of the loop, with few Ray Train workers.

    The application keeps its CPUs while a release trains, so each Ray Train job gets
    ``workers`` workers of ``cpus_per_worker`` CPUs, not the two full ones of the smoke test.
    The models keep the smoke test's sizes; the epochs are raised because a round's log is
    small (a few thousand events) and one pass over it leaves the ranker undertrained: the ranker
    trains until its click AUC on held-out users stops rising and keeps its best epoch.

    Args:
        workers: Ray Train workers of each job.
        cpus_per_worker: CPUs each worker reserves.
        two_tower_epochs: Epochs of the two-tower model.
        ranker_epochs: Most epochs of the ranker.
        ranker_patience: Epochs without a better validation click AUC before the ranker stops.

    Returns:
        The configuration (registered, not promoted: the loop promotes).
    """
    from training.config import TrainConfig

    base = TrainConfig.smoke_test(promote_to=None).model_dump(mode="json")
    base["two_tower_train"].update(
        num_workers=workers, cpus_per_worker=cpus_per_worker, epochs=two_tower_epochs
    )
    base["ranker"].update(
        num_workers=workers, cpus_per_worker=cpus_per_worker, epochs=ranker_epochs, patience=ranker_patience
    )
    base["description"] = "closed-loop simulation"
    return TrainConfig.model_validate(base)


def make_trainer(home: str, config: TrainConfig, log: Callable[[str], None]) -> Callable[[], str]:
    """A trainer for the loop: ``rayrec train`` on the lake of ``home``, then promote to production.

    Args:
        home: Data home.
        config: Training configuration.
        log: Where the pipeline's progress lines go.

    Returns:
        A callable returning the promoted version.
    """

    def train() -> str:
        from training.pipeline import run_training
        from training.registry import ModelRegistry

        run = run_training(config, home=home, log=log)
        if run.bundle is None:
            raise RuntimeError("training registered no bundle")
        return ModelRegistry(home).promote(run.bundle.version, "production")

    return train


def prepare_world(settings: Settings, config: WorldConfig) -> WorldTruth:
    """Import a world's catalog, users and follow graph (and its events, if any) into a fresh home.

    Args:
        settings: Data home and namespace; the namespace's keys are deleted first.
        config: The world (``n_events=0`` for a cold start).

    Returns:
        The world's truth, also saved under ``<home>/world``.
    """
    from core.lake import Lake
    from features.catalog import CatalogStore
    from features.redis_store import RedisStore
    from training.data_import import run_import
    from training.synthetic import World, build_truth, save_truth

    store = RedisStore.from_settings(settings)
    try:
        store.ping()
        store.delete_namespace()
        truth = build_truth(config)
        run_import(
            World(config, truth).chunks(),
            Lake(settings.home),
            CatalogStore(store),
            source=f"synthetic-{config.seed}",
            progress=False,
            total_events=config.n_events,
        )
    finally:
        store.close()
    save_truth(truth, Path(settings.home) / "world")
    return truth


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run the closed loop, or an A/B or A/A test, through the live application."""
    from core.lake import Lake
    from core.settings import Settings
    from features.redis_store import RedisStore
    from training.experiments.closed_loop import ClosedLoop, TrafficConfig
    from training.pipeline import connect_ray
    from training.synthetic import WorldConfig

    namespace = args.namespace or f"sim-{uuid4().hex[:8]}"
    home = args.home or str(Path("var") / "simulations" / namespace)
    if "://" in home:
        print(
            "error: --home must be a local path (the world's truth is saved beside the lake)", file=sys.stderr
        )
        return 2
    if Path(home, "lake").exists() and any(Path(home, "lake").iterdir()):
        print(f"error: {home} already holds a lake; the simulation starts from a fresh home", file=sys.stderr)
        return 2
    settings = Settings.from_env(None, home=home, namespace=namespace)
    overrides = {k: v for k, v in {"n_users": args.users, "n_items": args.items}.items() if v is not None}
    world = WorldConfig.preset(args.preset, n_events=args.history_events, seed=args.seed, **overrides)
    traffic = TrafficConfig(
        requests_per_user=args.requests_per_user,
        list_size=args.limit,
        concurrency=args.concurrency,
    )
    started = time.perf_counter()
    print(
        f"world '{args.preset}' (seed {world.seed}): {world.n_users:,} users, {world.n_items:,} items, "
        f"{world.n_events:,} events of history; home {home}, namespace {namespace}"
    )
    truth = prepare_world(settings, world)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    connect_ray(num_cpus=args.num_cpus)
    serving = SimulatedServing.deploy(
        settings,
        port=args.port,
        budget_scale=args.budget_scale,
        serve_cpus=args.serve_cpus,
        ranker_weights=args.ranker_weights,
    )
    print(f"application '{APP}' answering at {serving.base_url} after {time.perf_counter() - started:.0f} s")
    log: Callable[[str], None] = print if args.verbose else (lambda _: None)
    trainer = make_trainer(home, loop_train_config(workers=1, cpus_per_worker=args.train_cpus), log)
    users = truth.user_ids[: args.active_users] if args.active_users else truth.user_ids
    loop = ClosedLoop(
        truth, serving, Lake(home), trainer, traffic=traffic, alpha=args.alpha, users=users, seed=args.seed
    )
    out_dir = Path(args.output or Path(home) / "simulation")
    rc = 0
    try:
        if args.mode == "loop":
            report = loop.run(
                args.rounds,
                {"preset": args.preset, "seed": world.seed, "users": world.n_users, "items": world.n_items},
                cold_rounds=args.cold_rounds,
            )
            print(report.render())
            print(f"JSON written to {report.write_json(out_dir / 'closed_loop.json')}")
            print(f"chart written to {report.plot(out_dir / 'closed_loop.png')}")
            if not report.ctr_change > 0:
                print("note: CTR did not rise across retraining in this run")
        else:
            from training.experiments.simulated_experiment import run_simulated_experiment

            store = RedisStore.from_settings(settings)
            try:
                outcome = run_simulated_experiment(
                    loop, store, Lake(home), kind=args.mode, warmup_rounds=args.rounds - 1, alpha=args.alpha
                )
            finally:
                store.close()
            print(outcome.report.render())
            print(outcome.verdict())
            print(f"JSON written to {outcome.report.write_json(out_dir / f'{args.mode}.json')}")
            print(f"chart written to {outcome.report.plot_ctr(out_dir / f'{args.mode}.png')}")
            rc = 0 if outcome.as_expected else 1
    finally:
        if not args.keep_serving:
            serving.shutdown()
            # The run's online data is of no use once the app is gone; the lake and registry stay.
            store = RedisStore.from_settings(settings)
            try:
                store.delete_namespace()
            finally:
                store.close()
    print(f"simulation finished in {time.perf_counter() - started:.0f} s (lake and registry under {home})")
    return rc


def _weights(text: str) -> dict[str, float]:
    weights: dict[str, float] = {}
    for part in text.split(","):
        task, sep, value = part.partition("=")
        try:
            weights[task.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not task.strip():
            raise argparse.ArgumentTypeError(f"--ranker-weights: expected task=weight, got {part!r}")
    return weights


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``simulate`` to the ``rayrec`` parser.

    Args:
        sub: The ``add_subparsers`` object of the ``rayrec`` parser.
        common: Parent parser with the shared options (``--home``, ...).
    """
    sim = sub.add_parser(
        "simulate",
        parents=[common],
        help="closed feedback loop (serve, react, retrain) or an A/B / A/A test through the live app",
    )
    mode = sim.add_mutually_exclusive_group()
    mode.add_argument(
        "--ab", dest="mode", action="store_const", const="ab",
        help="after the warm-up rounds, test default serving against a worse arm (90%% exploration)",
    )  # fmt: skip
    mode.add_argument(
        "--aa", dest="mode", action="store_const", const="aa",
        help="after the warm-up rounds, test two identical arms",
    )  # fmt: skip
    sim.set_defaults(mode="loop", func=cmd_simulate)
    sim.add_argument("--preset", default="tiny", choices=["tiny", "small", "benchmark"], help="world size")
    sim.add_argument("--users", type=int, help="users of the world (default: the preset's)")
    sim.add_argument("--items", type=int, help="items of the world (default: the preset's)")
    sim.add_argument("--seed", type=int, default=0, help="seed of the world and the reactions")
    sim.add_argument(
        "--history-events", type=int, default=0, help="events of history before round 0 (default 0)"
    )
    sim.add_argument(
        "--rounds", type=int, default=4,
        help="rounds of traffic, retraining after the last cold round and between two later ones "
        "(A/B, A/A: warm-up rounds + 1; default 4)",
    )  # fmt: skip
    sim.add_argument(
        "--cold-rounds", type=int, default=2,
        help="rounds served without a model before the first retraining; the last one is the baseline "
        "(its users' sessions already hold a round's items, as in every later round; default 2)",
    )  # fmt: skip
    sim.add_argument("--active-users", type=int, help="users taking part in each round (default: all)")
    sim.add_argument("--requests-per-user", type=int, default=3, help="requests per user per round")
    sim.add_argument("--limit", type=int, default=10, help="items per request")
    sim.add_argument("--concurrency", type=int, default=8, help="users served at once")
    sim.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    sim.add_argument("--budget-scale", type=float, default=10.0, help="multiplier of the stage budgets")
    sim.add_argument("--serve-cpus", type=float, default=0.1, help="CPUs reserved per Serve replica")
    sim.add_argument(
        "--ranker-weights",
        type=_weights,
        help="head weights of the home surface, e.g. 'click=1,watch=0' (default: the shipped ones)",
    )
    sim.add_argument("--train-cpus", type=float, default=1.0, help="CPUs per Ray Train worker")
    sim.add_argument("--num-cpus", type=int, help="CPUs of a locally started Ray (default: all)")
    sim.add_argument("--port", type=int, help="HTTP port of the application (default: a free one)")
    sim.add_argument("--output", help="directory of the JSON and PNG (default <home>/simulation)")
    sim.add_argument(
        "--keep-serving", action="store_true", help="leave the application and its online data in place"
    )
    sim.add_argument("--verbose", action="store_true", help="print the training pipeline's progress")
