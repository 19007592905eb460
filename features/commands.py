"""``rayrec features materialize``: offline features from the lake, optionally loaded into Redis.

Registered into the ``rayrec`` parser by :mod:`cluster.cli`. Heavy imports (Ray, pyarrow) happen
inside the command so ``rayrec --help`` stays instant. The command attaches to the Ray cluster the
process belongs to (``ray job submit -- rayrec features materialize`` or ``RAY_ADDRESS``) and only
starts a local instance, with ``--num-cpus``, when there is none.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.settings import Settings


def _as_of(text: str) -> datetime:
    """An ``--as-of`` value: ISO 8601; a value without a time zone is taken as UTC."""
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 instant: {text!r}") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {name: getattr(args, name) for name in ("home", "namespace") if getattr(args, name, None)}
    return Settings.from_env(None, **overrides)


def _connect_ray(num_cpus: int | None, quiet: bool) -> None:
    import os

    import ray

    if not ray.is_initialized():
        # A cluster's resources are not the driver's to declare: num_cpus only sizes a local start.
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False)
    if quiet:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False


def cmd_materialize(args: argparse.Namespace) -> int:
    """Compute every entity's features as of an instant, store them in the lake, optionally load Redis."""
    from core.lake import Lake
    from features import offline
    from features.definitions import VIEWS, view
    from features.params import DEFAULT_PARAMS, FeatureParams

    settings = _settings(args)
    as_of: datetime = args.as_of or datetime.now(UTC)
    try:
        views = tuple(view(name) for name in args.views) if args.views else VIEWS
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    params = (
        FeatureParams.model_validate_json(Path(args.params).read_text()) if args.params else DEFAULT_PARAMS
    )
    lake = Lake(settings.home)
    if not lake.files("events"):
        print(
            f"error: the lake at {lake.root} holds no events; import or generate data first", file=sys.stderr
        )
        return 1

    online: Any = None
    if args.backfill_online:
        # Fail on an unreachable Redis before spending minutes on the job.
        from features.online_store import OnlineFeatureStore
        from features.redis_store import RedisStore

        store = RedisStore.from_settings(settings)
        store.ping()
        online = OnlineFeatureStore(store, params=params)

    _connect_ray(args.num_cpus, args.quiet)
    print(f"materialising {', '.join(v.name for v in views)} as of {as_of.isoformat()} from {lake.root}")
    started = time.perf_counter()
    datasets = offline.materialize(
        lake, as_of=as_of, views=views, params=params, num_partitions=args.partitions
    )
    timings = {"fold": time.perf_counter() - started}
    for feature_view in views:
        mark = time.perf_counter()
        table = offline.collect(feature_view, datasets[feature_view.name])
        written = offline.write_features(lake, feature_view, table)
        timings["collect+write"] = timings.get("collect+write", 0.0) + time.perf_counter() - mark
        where = written[0] if written else "(no entity has events)"
        print(f"  {feature_view.name:<16} {table.num_rows:>10,} entities -> {where}")
        if online is not None:
            mark = time.perf_counter()
            loaded = offline.load_online(online, feature_view, table)
            timings["backfill"] = timings.get("backfill", 0.0) + time.perf_counter() - mark
            print(f"  {'':<16} {loaded:>10,} states loaded into Redis namespace '{settings.namespace}'")
    if online is not None:
        online.store.close()
    print("timings: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items()))
    return 0


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add this package's subcommands to the ``rayrec`` parser.

    Args:
        sub: The ``add_subparsers`` object of the ``rayrec`` parser.
        common: Parent parser with the shared options (``--home``, ``--namespace``, ``--quiet``).
    """
    features = sub.add_parser("features", help="offline features: materialise, backfill the online store")
    actions = features.add_subparsers(dest="action", required=True)
    materialize = actions.add_parser(
        "materialize",
        parents=[common],
        help="fold the lake's events into features with Ray Data and store them in lake/features/",
        description=(
            "Compute every entity's features as of --as-of with the same definitions the stream "
            "processor uses, and write one snapshot per view to lake/features/<view>/. With "
            "--backfill-online, also load the states into Redis (seed a fresh store before the "
            "stream processor applies events after --as-of: loaded states replace what it applied)."
        ),
    )
    materialize.add_argument(
        "--as-of",
        type=_as_of,
        help="instant to compute features for, ISO 8601 (e.g. 2026-01-31T00:00:00Z); default now",
    )
    materialize.add_argument(
        "--backfill-online", action="store_true", help="also write the states into the online store"
    )
    materialize.add_argument(
        "--view", dest="views", action="append", help="only this view (repeatable); default all views"
    )
    materialize.add_argument(
        "--params", help="JSON file of FeatureParams, when the deployment overrides the defaults"
    )
    materialize.add_argument("--partitions", type=int, default=8, help="hash partitions of the shuffles")
    materialize.add_argument("--num-cpus", type=int, help="CPUs of a locally started Ray instance")
    materialize.set_defaults(func=cmd_materialize)
