"""Operator commands: ``rayrec cluster up|down|status`` and ``rayrec config check|render|kuberay``.

Registered into the ``rayrec`` parser by ``cluster.cli``; heavy imports happen inside each command.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

_DEFAULT_SERVE_CONFIG = "ray_config.yaml"
_DEFAULT_RAYSERVICE = "cluster/configs/kuberay-rayservice.yaml"


def _state_file(args: argparse.Namespace) -> Path:
    from cluster.local_cluster import STATE_FILE_NAME, default_state_file
    from core.settings import Settings

    if args.state_dir:
        return Path(args.state_dir) / STATE_FILE_NAME
    return default_state_file(Settings.from_env(None, **({"home": args.home} if args.home else {})))


def cmd_cluster_up(args: argparse.Namespace) -> int:
    """Start a head and worker raylets on this machine and record them in the state file."""
    from cluster.local_cluster import LocalClusterError, LocalClusterSpec, start_local_cluster

    spec = LocalClusterSpec(
        workers=args.workers,
        head_cpus=args.cpus_per_node,
        worker_cpus=args.cpus_per_node,
        object_store_mb=args.object_store_mb,
        auth="disabled" if args.no_auth else "token",
    )
    state_file = _state_file(args)
    print(f"starting a head and {spec.workers} worker raylet(s), {args.cpus_per_node} CPU(s) each ...")
    try:
        state = start_local_cluster(spec, state_file)
    except LocalClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"cluster up; state in {state_file}")
    _print_state(state)
    print("clients (ray job submit, serve deploy, ray.init) need:")
    for name, value in state.client_env().items():
        print(f"  export {name}={value}")
    print(f"  serve deploy {_DEFAULT_SERVE_CONFIG} --address {state.dashboard_url}")
    print(f"  ray job submit --address {state.dashboard_url} --working-dir . -- python -c '...'")
    return 0


def cmd_cluster_down(args: argparse.Namespace) -> int:
    """Stop the recorded local cluster's processes (only those) and forget it."""
    from cluster.local_cluster import ClusterState, LocalClusterError, stop_local_cluster

    state_file = _state_file(args)
    try:
        state = ClusterState.load(state_file)
    except LocalClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stopped = stop_local_cluster(state, remove_temp_dir=not args.keep_logs)
    state_file.unlink(missing_ok=True)
    print(f"stopped {len(stopped)} process(es) of the cluster at {state.dashboard_url}")
    if args.keep_logs:
        print(f"logs kept in {state.temp_dir}")
    return 0


def cmd_cluster_status(args: argparse.Namespace) -> int:
    """Print the recorded cluster: nodes alive, processes, Serve applications."""
    from cluster.local_cluster import ClusterState, LocalClusterError, cluster_processes

    try:
        state = ClusterState.load(_state_file(args))
    except LocalClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _print_state(state)
    processes = cluster_processes(state.temp_dir)
    print(f"processes: {len(processes)} alive")
    if not processes:
        print("the cluster is not running; `rayrec cluster down` forgets it")
        return 1
    return 0 if _print_live(state) else 1


def _print_state(state: Any) -> None:
    print(f"  dashboard:    {state.dashboard_url}")
    print(f"  gcs address:  {state.gcs_address}")
    print(f"  temp dir:     {state.temp_dir}")
    for node in state.nodes:
        print(f"  {node.role:<7} {node.num_cpus} CPU, resource {node.resource}")


def _print_live(state: Any) -> bool:
    from cluster.local_cluster import LocalClusterError, alive_nodes, dashboard_get

    try:
        nodes = alive_nodes(state)
    except LocalClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return False
    print(f"nodes alive: {len(nodes)} of {len(state.nodes)}")
    try:
        details = dashboard_get(state, "/api/serve/applications/")
    except (OSError, ValueError):
        print("serve: not running")
        return len(nodes) == len(state.nodes)
    applications = details.get("applications") or {}
    if not applications:
        print("serve: no applications")
    for name, app in applications.items():
        replicas = {
            dep_name: sum(1 for r in dep["replicas"] if r["state"] == "RUNNING")
            for dep_name, dep in app["deployments"].items()
        }
        print(f"serve app {name}: {app['status']}, running replicas {replicas}")
    return len(nodes) == len(state.nodes)


def cmd_config_check(args: argparse.Namespace) -> int:
    """Validate a Serve config against Ray's schema, the typed models and the deployment graph."""
    from deployments.config import ServeConfigError, check_serve_config

    node_cpus = None if args.no_fit_check else args.node_cpus
    try:
        _, reports = check_serve_config(args.path, node_cpus=node_cpus)
    except ServeConfigError as exc:
        print(f"{args.path}: {len(exc.problems)} problem(s)", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print(f"{args.path}: ok")
    for report in reports:
        print(f"application '{report.name}':")
        print(f"  {'deployment':<16} {'replicas':>12} {'CPU/replica':>12} {'CPU start':>10} {'CPU max':>8}")
        for line in report.cpu:
            replicas = f"{line.replicas_start}..{line.replicas_max}"
            print(
                f"  {line.name:<16} {replicas:>12} {line.cpus_per_replica:>12g} "
                f"{line.cpus_start:>10g} {line.cpus_max:>8g}"
            )
        print(f"  {'total':<16} {'':>12} {'':>12} {report.cpus_start:>10g} {report.cpus_max:>8g}")
        if report.overrides:
            print(f"  set over the code's defaults: {', '.join(report.overrides)}")
    return 0


def cmd_config_render(args: argparse.Namespace) -> int:
    """Regenerate the config's deployments from the code (``serve build``-style)."""
    from deployments.config import ServeConfigError, render_serve_config

    try:
        text = render_serve_config(args.path, code_only=args.code_only)
    except ServeConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.write:
        path = Path(args.path)
        partial = path.with_suffix(".rendering")
        partial.write_text(text)
        os.replace(partial, path)
        print(f"rewrote {path}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_config_kuberay(args: argparse.Namespace) -> int:
    """Copy the Serve config into the RayService manifest's ``serveConfigV2``."""
    from cluster.kuberay import ManifestError, embed_serve_config

    manifest = Path(args.manifest)
    current = manifest.read_text()
    try:
        updated = embed_serve_config(current, Path(args.path).read_text())
    except ManifestError as exc:
        print(f"error: {manifest}: {exc}", file=sys.stderr)
        return 1
    if args.check:
        if updated != current:
            print(f"{manifest} is out of step with {args.path}: run `rayrec config kuberay --write`")
            return 1
        print(f"{manifest}: serveConfigV2 is {args.path}")
    elif args.write:
        partial = manifest.with_suffix(".rendering")
        partial.write_text(updated)
        os.replace(partial, manifest)
        print(f"rewrote serveConfigV2 in {manifest}")
    else:
        sys.stdout.write(updated)
    return 0


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``cluster`` and ``config`` to the ``rayrec`` parser.

    Args:
        sub: The ``rayrec`` subparsers.
        common: Options shared by every command (``--home``, ``--namespace``, ``--quiet``).
    """
    cluster = sub.add_parser("cluster", help="a multi-node Ray cluster on this machine")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True)
    state = argparse.ArgumentParser(add_help=False)
    state.add_argument("--state-dir", help="where the state file lives; default $RAYREC_HOME/cluster")

    up = cluster_sub.add_parser("up", parents=[common, state], help="start a head and worker raylets")
    up.add_argument("--workers", type=int, default=1, help="worker raylets besides the head (default 1)")
    up.add_argument("--cpus-per-node", type=int, default=1, help="logical CPUs per node (default 1)")
    up.add_argument("--object-store-mb", type=int, default=200, help="object store per node (default 200)")
    up.add_argument("--no-auth", action="store_true", help="disable Ray token authentication")
    up.set_defaults(func=cmd_cluster_up)

    down = cluster_sub.add_parser("down", parents=[common, state], help="stop the local cluster")
    down.add_argument("--keep-logs", action="store_true", help="keep the cluster's temp dir and logs")
    down.set_defaults(func=cmd_cluster_down)

    status = cluster_sub.add_parser("status", parents=[common, state], help="nodes, processes, Serve apps")
    status.set_defaults(func=cmd_cluster_status)

    config = sub.add_parser("config", help="check or regenerate the Serve config (ray_config.yaml)")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate against Ray's schema and the deployment graph")
    check.add_argument("path", nargs="?", default=_DEFAULT_SERVE_CONFIG)
    check.add_argument("--node-cpus", type=float, default=2.0, help="CPUs the app must fit in (default 2)")
    check.add_argument("--no-fit-check", action="store_true", help="skip the CPU fit check")
    check.set_defaults(func=cmd_config_check)

    render = config_sub.add_parser("render", help="regenerate the deployments section from the code")
    render.add_argument("path", nargs="?", default=_DEFAULT_SERVE_CONFIG)
    render.add_argument("--code-only", action="store_true", help="drop the file's per-deployment values")
    render.add_argument("--write", action="store_true", help="rewrite the file instead of printing")
    render.set_defaults(func=cmd_config_render)

    kuberay = config_sub.add_parser("kuberay", help="copy the Serve config into the RayService manifest")
    kuberay.add_argument("path", nargs="?", default=_DEFAULT_SERVE_CONFIG)
    kuberay.add_argument("--manifest", default=_DEFAULT_RAYSERVICE, help=f"default {_DEFAULT_RAYSERVICE}")
    mode = kuberay.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the manifest instead of printing")
    mode.add_argument("--check", action="store_true", help="exit 1 when the manifest is out of step")
    kuberay.set_defaults(func=cmd_config_kuberay)
