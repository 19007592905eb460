"""``rayrec experiments report`` and ``rayrec ope``: experiment analysis and off-policy evaluation.

Heavy imports (Ray, the analysis) happen inside the commands so ``rayrec --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REGISTRY_PATH = "experiments/registry.json"
"""Where the experiment registry lives under the data home (an :class:`ExperimentSet` as JSON)."""


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``experiments`` and ``ope`` commands to the ``rayrec`` parser.

    Args:
        sub: The parser's subparsers.
        common: Parent parser with ``--home``, ``--namespace`` and ``--quiet``.
    """
    experiments = sub.add_parser("experiments", help="A/B experiments: analysis reports")
    commands = experiments.add_subparsers(dest="experiments_command", required=True)
    report = commands.add_parser(
        "report", parents=[common], help="per-arm metrics, intervals, SRM and guardrails of an experiment"
    )
    report.add_argument("experiment", help="experiment id")
    report.add_argument(
        "--registry", help=f"experiment registry JSON (path or pyarrow URI); default <home>/{REGISTRY_PATH}"
    )
    report.add_argument("--json", dest="json_out", help="also write the report as JSON here")
    report.add_argument("--png", dest="png_out", help="also draw CTR per arm with intervals as a PNG here")
    report.add_argument(
        "--start", type=_instant, help="first serving instant (ISO 8601); default: the experiment's"
    )
    report.add_argument(
        "--end", type=_instant, help="end of the serving instants (ISO 8601); default: the experiment's"
    )
    report.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    report.add_argument(
        "--attribution-window-h",
        type=float,
        default=24.0,
        help="hours an impression's events count (default 24)",
    )
    report.add_argument("--partitions", type=int, default=4, help="hash partitions per shuffle (default 4)")
    report.add_argument("--num-cpus", type=int, help="CPUs of a local Ray instance (default: all)")
    report.set_defaults(func=cmd_experiments_report)

    from training.experiments.simulator_policy import SIMULATED_POLICIES

    names = sorted(SIMULATED_POLICIES)
    ope = sub.add_parser(
        "ope",
        parents=[common],
        help="off-policy evaluation of a target policy on a simulated log, checked against its simulated CTR",
    )
    ope.add_argument("--target", required=True, choices=names, help="policy to evaluate")
    ope.add_argument("--logging", default="logging", choices=names, help="policy that serves the log")
    ope.add_argument(
        "--preset", default="small", choices=["tiny", "small", "benchmark"], help="world size (default small)"
    )
    ope.add_argument("--users", type=int, help="users taking part (default: all of the preset's)")
    ope.add_argument("--seed", type=int, default=0, help="seed of the world and the simulation")
    ope.add_argument("--clip", type=float, help="clip importance weights at this value")
    ope.add_argument("--interval", choices=["delta", "bootstrap"], default="delta")
    ope.add_argument("--alpha", type=float, default=0.05)
    ope.add_argument(
        "--ray",
        action="store_true",
        help="write the log to a temporary lake and read it back with Ray Data, as for a real log",
    )
    ope.add_argument("--json", dest="json_out", help="also write the result as JSON here")
    ope.set_defaults(func=cmd_ope)


def _instant(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _init_ray(num_cpus: int | None) -> None:
    import ray

    if not ray.is_initialized():
        # Connects to RAY_ADDRESS when set (ray job submit), else starts a local instance.
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


def _read_text(location: str) -> str:
    if "://" in location:
        import pyarrow.fs as pafs

        filesystem, path = pafs.FileSystem.from_uri(location)
        with filesystem.open_input_stream(path) as stream:
            return bytes(stream.read()).decode()
    return Path(location).read_text()


def cmd_experiments_report(args: argparse.Namespace) -> int:
    """Analyse one experiment from the lake and print the report."""
    from pydantic import ValidationError

    from core.lake import Lake
    from core.settings import Settings
    from policies.experiments import ExperimentSet
    from training.experiments.analysis import AnalysisConfig, AnalysisWindow, analyse_experiment

    settings = Settings.from_env(None, **({"home": args.home} if args.home else {}))
    location = args.registry or f"{settings.home.rstrip('/')}/{REGISTRY_PATH}"
    try:
        experiments = ExperimentSet.model_validate_json(_read_text(location))
        experiment = experiments.experiment(args.experiment)
        config = AnalysisConfig(
            alpha=args.alpha,
            partitions=args.partitions,
            window=AnalysisWindow(
                start=args.start, end=args.end, attribution_window_h=args.attribution_window_h
            ),
        )
    except FileNotFoundError:
        print(f"error: no experiment registry at {location} (pass --registry)", file=sys.stderr)
        return 2
    except (KeyError, ValidationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _init_ray(args.num_cpus)
    try:
        report = analyse_experiment(Lake(settings.home), experiment, config)
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.render())
    if args.json_out:
        print(f"JSON written to {report.write_json(args.json_out)}")
    if args.png_out:
        print(f"chart written to {report.plot_ctr(args.png_out)}")
    return 0


def cmd_ope(args: argparse.Namespace) -> int:
    """Estimate a target policy's CTR from a simulated log and compare it with the simulated truth."""
    import numpy as np
    import pyarrow as pa

    from training.experiments.ope import OpeConfig, evaluate_lake, evaluate_slots
    from training.experiments.simulator_policy import SIMULATED_POLICIES, ListSimulator
    from training.synthetic import WorldConfig, build_truth

    world = WorldConfig.preset(args.preset, n_events=0, seed=args.seed)
    users = world.n_users if args.users is None else args.users
    if not 0 < users <= world.n_users:
        print(
            f"error: --users {args.users} exceeds the {world.n_users:,} users of '{args.preset}'",
            file=sys.stderr,
        )
        return 2
    config = OpeConfig(max_weight=args.clip, interval=args.interval, alpha=args.alpha, seed=args.seed)
    truth = build_truth(world)
    simulator = ListSimulator(truth)
    requests = simulator.requests(args.seed, users=np.arange(users))
    logging_policy, target_policy = SIMULATED_POLICIES[args.logging], SIMULATED_POLICIES[args.target]
    served = simulator.serve(requests, logging_policy, args.seed + 1)
    log = simulator.log(served, simulator.respond(served, args.seed + 2), args.seed + 3)
    target = simulator.target(requests, target_policy)
    if args.ray:
        from core.lake import Lake
        from training.synthetic import items_table

        _init_ray(None)
        with tempfile.TemporaryDirectory(prefix="rayrec-ope-") as home:
            lake = Lake(home)
            lake.append("items", items_table(truth))
            lake.append("impressions", log.impressions)
            lake.append("events", log.events)
            result = evaluate_lake(lake, target, config)
    else:
        slots = log.impressions.append_column("clicked", pa.array(log.outcomes.click.ravel()))
        result = evaluate_slots(slots, target, config)
    on_target = simulator.serve(requests, target_policy, args.seed + 4)
    simulated = float(simulator.respond(on_target, args.seed + 5).click.mean())
    expected = simulator.expected_ctr(requests, target_policy)
    print(result.render())
    print(
        f"  target's CTR when it serves the same requests: {simulated:.5f} simulated, {expected:.5f} expected"
    )
    for name, estimate in (("IPS", result.ips), ("SNIPS", result.snips)):
        verdict = "inside" if estimate.contains(simulated) else "OUTSIDE"
        print(f"  {name}: the simulated CTR is {verdict} the interval")
    if args.json_out:
        payload = result.as_dict() | {"simulated_ctr": simulated, "expected_ctr": expected}
        Path(args.json_out).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"JSON written to {args.json_out}")
    return 0
