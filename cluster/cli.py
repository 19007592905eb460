"""The ``rayrec`` command line: data generation and import, status, and the demo job.

Heavy imports happen inside each command so ``rayrec --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from core.settings import Settings, SettingsError

_COMMAND_MODULES = (
    "training.commands",
    "training.experiment_commands",
    "features.commands",
    "deployments.commands",
    "cluster.ops_commands",
    "cluster.simulate_commands",
)


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, object] = {}
    if getattr(args, "home", None):
        overrides["home"] = args.home
    if getattr(args, "namespace", None):
        overrides["namespace"] = args.namespace
    return Settings.from_env(None, **overrides)


def _open(settings: Settings):  # type: ignore[no-untyped-def]
    """Open the lake and the catalog, failing with one clear line when Redis is down."""
    from core.lake import Lake
    from features.catalog import CatalogStore
    from features.redis_store import RedisStore

    store = RedisStore.from_settings(settings)
    store.ping()
    return Lake(settings.home), CatalogStore(store), store


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate a synthetic world and import it into the lake and the catalog."""
    from training.data_import import run_import
    from training.synthetic import World, WorldConfig, build_truth, save_truth

    settings = _settings(args)
    lake, catalog, store = _open(settings)
    overrides = {
        k: v
        for k, v in {
            "n_users": args.users,
            "n_items": args.items,
            "n_events": args.events,
            "seed": args.seed,
        }.items()
        if v is not None
    }
    config = WorldConfig.preset(args.preset, **overrides)
    print(
        f"generating world '{args.preset}' (seed {config.seed}): "
        f"{config.n_users:,} users, {config.n_items:,} items, {config.n_events:,} events"
    )
    truth = build_truth(config)
    summary = run_import(
        World(config, truth).chunks(),
        lake,
        catalog,
        source=f"synthetic-{config.seed}",
        progress=not args.quiet,
        total_events=config.n_events,
    )
    if "://" not in settings.home:
        truth_dir = Path(settings.home) / "world"
        save_truth(truth, truth_dir)
        print(f"hidden truth (for the user simulator) saved to {truth_dir}")
    print(summary.render())
    store.close()
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """Import MovieLens or a generic events file."""
    from training.data_import import run_import
    from training.importers import ColumnMapping, read_events_file, read_movielens

    settings = _settings(args)
    lake, catalog, store = _open(settings)
    path = Path(args.path)
    if not path.exists():
        print(f"error: {path} does not exist", file=sys.stderr)
        return 2
    if args.kind == "movielens":
        chunks = read_movielens(path)
        source = f"movielens-{path.name}"
    else:
        mapping = ColumnMapping.parse(args.mapping)
        chunks = read_events_file(path, mapping)
        source = f"events-{path.stem}"
    summary = run_import(
        chunks, lake, catalog, source=source, progress=not args.quiet, total_events=chunks.total_events
    )
    print(summary.render())
    store.close()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print what the lake and the online store hold."""
    from core.tables import TABLES

    settings = _settings(args)
    lake, catalog, store = _open(settings)
    print(f"data home: {settings.home}")
    print(f"redis:     {settings.redis_url} (namespace '{settings.namespace}')")
    print("lake rows:")
    for name in TABLES:
        print(f"  {name:<12} {lake.count(name):>12,}")
    print("online catalog:")
    for name, value in catalog.counts().items():
        print(f"  {name:<12} {value:>12,}")
    store.close()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on local Ray: generate, import, warm the online store, train, promote, serve.

    Prints a ``curl`` of the seed's example request for a real user of the demo data, checked to
    answer, and keeps the application up until Ctrl-C (``--no-block`` returns instead).
    """
    from core.schema import utcnow
    from deployments.commands import DEFAULT_APP, block_until_interrupted, serve_app, serve_options
    from deployments.commands import connect_ray as connect_serving_ray
    from features.event_replay import replay_events
    from features.online_store import OnlineFeatureStore
    from training.config import TrainConfig
    from training.pipeline import connect_ray, run_training
    from training.registry import ModelRegistry

    started = time.perf_counter()
    gen = argparse.Namespace(**vars(args), users=None, items=None, events=None, seed=None)
    rc = cmd_generate(gen)
    if rc:
        return rc
    settings = _settings(args)
    lake, _, store = _open(settings)
    # The stream processor fills the online features from live events; a generated world has
    # none yet, so its newest events are replayed through the same fold, re-timed to end now.
    replayed = replay_events(lake, OnlineFeatureStore(store), max_events=50_000, retime_to=utcnow())
    store.close()
    print(f"online store: {replayed:,} recent events replayed into the features")
    rc = cmd_status(args)
    if rc:
        return rc
    # Ray starts with Serve's settings for its workers (the job's runtime_env): the Serve
    # controller and proxies started after training belong to this job and read them.
    connect_serving_ray(args.num_cpus)
    connect_ray(num_cpus=args.num_cpus)
    run = run_training(TrainConfig.smoke_test(promote_to=None), home=settings.home)
    if run.bundle is None:
        print("error: training registered no bundle", file=sys.stderr)
        return 1
    version = ModelRegistry(settings.home).promote(run.bundle.version, "production")
    print(f"production -> {version}")
    curl = serve_app(settings, **serve_options(args))
    print(f"demo finished in {time.perf_counter() - started:.1f} s")
    print(f"try: {curl}")
    if not args.no_block:
        block_until_interrupted(DEFAULT_APP)
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    """Delete this namespace's Redis keys (the lake is left alone unless --lake)."""
    settings = _settings(args)
    if not args.yes:
        print("refusing to reset without --yes", file=sys.stderr)
        return 2
    _, _, store = _open(settings)
    deleted = store.delete_namespace()
    print(f"deleted {deleted:,} keys in namespace '{settings.namespace}'")
    if args.lake:
        import shutil

        lake_dir = Path(settings.home) / "lake"
        if "://" in settings.home:
            print("--lake only removes local lakes", file=sys.stderr)
            return 2
        shutil.rmtree(lake_dir, ignore_errors=True)
        print(f"removed {lake_dir}")
    store.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every ``rayrec`` command."""
    parser = argparse.ArgumentParser(prog="rayrec", description="A recommendation platform on Ray.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", help="data home (path or pyarrow URI); default $RAYREC_HOME or ./var")
    common.add_argument("--namespace", help="Redis key namespace; default $RAYREC_NAMESPACE or 'rayrec'")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", parents=[common], help="generate a synthetic world and import it")
    gen.add_argument("--preset", default="tiny", choices=["tiny", "small", "benchmark"])
    gen.add_argument("--users", type=int)
    gen.add_argument("--items", type=int)
    gen.add_argument("--events", type=int)
    gen.add_argument("--seed", type=int)
    gen.set_defaults(func=cmd_generate)

    imp = sub.add_parser("import", parents=[common], help="import MovieLens or an events file")
    imp.add_argument("kind", choices=["movielens", "events"])
    imp.add_argument("path")
    imp.add_argument(
        "--mapping",
        default="user=user_id,item=item_id,event_type=event_type,timestamp=timestamp:iso",
        help="column mapping for `events`, e.g. 'user=uid,item=iid,timestamp=ts:s,event_type=action'",
    )
    imp.set_defaults(func=cmd_import)

    st = sub.add_parser("status", parents=[common], help="what the lake and the online store hold")
    st.set_defaults(func=cmd_status)

    demo = sub.add_parser("demo", parents=[common], help="the main job on local Ray")
    demo.add_argument("--preset", default="small", choices=["tiny", "small", "benchmark"])
    from deployments.commands import add_serve_options

    add_serve_options(demo)
    demo.set_defaults(func=cmd_demo)

    reset = sub.add_parser("reset", parents=[common], help="delete this namespace's online data")
    reset.add_argument("--yes", action="store_true")
    reset.add_argument("--lake", action="store_true", help="also remove a local lake")
    reset.set_defaults(func=cmd_reset)

    # Each package that owns a workflow adds its own subcommands, so this module never grows
    # into a catch-all: `register(subparsers, common)` in `<package>/commands.py`.
    for module_name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rayrec`` console script."""
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.func(args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        # StoreUnavailable and friends: one clear line, not a traceback, for an operator's typo.
        if type(exc).__name__ == "StoreUnavailable":
            print(f"error: {exc}", file=sys.stderr)
            return 3
        raise
    return rc


if __name__ == "__main__":
    sys.exit(main())
