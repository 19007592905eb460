"""Read-path latency: the Serve graph per stage, per source and per hop, with the shipped budgets.

Needs a data home and namespace that ``rayrec demo`` prepared (catalog and features in Redis, a
``production`` bundle in the registry). Starts a local Ray (2 CPUs) unless one is reachable,
deploys the application from ``ray_config.yaml`` on a free loopback port, and measures:

1. the cost of a ``DeploymentHandle`` hop: an empty call to the ``retrieval`` deployment from the
   driver, sequentially;
2. ``GET /api/recommendations`` for ``--requests`` requests over the namespace's users, one at a
   time: the HTTP round trip, and (from ``GET /api/admin/serving``) the ingress's own medians per
   pipeline stage, per candidate source, per hop (round trip minus the callee's own time) and in
   total, plus how often each fallback was used.

    python -m benchmarks.serving --home var --namespace rayrec --requests 300

Results go to ``benchmarks/results/serving.json``. The machine is shared: the JSON records the load
average, and figures are only comparable between runs at similar load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from core.settings import Settings
from deployments.commands import connect_ray
from deployments.reload import deploy, serve_config
from features.redis_store import RedisStore

APP = "rayrec-bench"
TOKEN = "serving-benchmark"
RESULTS = Path(__file__).resolve().parent / "results" / "serving.json"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _users(settings: Settings, n: int) -> list[str]:
    store = RedisStore.from_settings(settings)
    try:
        users = sorted(str(u) for u in store.client.smembers(store.keys.users_all()))  # type: ignore[union-attr]
    finally:
        store.close()
    return users[:n] or ["u123"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    args = parser.parse_args()
    from ray import serve

    settings = Settings.from_env(None, home=args.home, namespace=args.namespace)
    connect_ray(2)
    port = _free_port()
    load_before = os.getloadavg()
    base = {"home": settings.home, "namespace": settings.namespace, "redis_url": settings.redis_url}
    deploy(serve_config(APP, base, host="127.0.0.1", port=port, env_vars={"RAYREC_ADMIN_TOKEN": TOKEN}))
    try:
        handle = serve.get_deployment_handle("retrieval", APP)
        for _ in range(20):
            handle.ping.remote().result()
        hops = []
        for _ in range(200):
            started = time.perf_counter()
            handle.ping.remote().result()
            hops.append((time.perf_counter() - started) * 1000)
        users = _users(settings, 200)
        walls: list[float] = []
        fallbacks: Counter[str] = Counter()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            for n in range(args.warmup + args.requests):
                started = time.perf_counter()
                response = client.get(
                    "/api/recommendations", params={"userId": users[n % len(users)], "limit": 20}
                )
                elapsed = (time.perf_counter() - started) * 1000
                response.raise_for_status()
                if n >= args.warmup:
                    walls.append(elapsed)
                    fallbacks[response.json()["fallback"] or "none"] += 1
            status: dict[str, Any] = client.get(
                "/api/admin/serving", headers={"Authorization": f"Bearer {TOKEN}"}
            ).json()
    finally:
        serve.delete(APP)
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "requests": args.requests,
        "hop_ms_driver_to_replica": {
            "p50": statistics.median(hops),
            "p90": sorted(hops)[int(0.9 * len(hops))],
        },
        "http_round_trip_ms": {"p50": statistics.median(walls), "p90": sorted(walls)[int(0.9 * len(walls))]},
        "fallbacks": dict(fallbacks),
        "ingress_ms": status["latencyMs"],
        "models": status["models"],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"hop (empty call, driver -> replica): p50 {result['hop_ms_driver_to_replica']['p50']:.2f} ms")
    print(f"HTTP round trip: p50 {result['http_round_trip_ms']['p50']:.1f} ms; fallbacks {dict(fallbacks)}")
    for series, values in status["latencyMs"].items():
        print(f"  {series:<32} p50 {values['p50']:7.2f} ms  p90 {values['p90']:7.2f} ms")
    print(f"load average {load_before} -> {result['load_average_after']}; written to {RESULTS}")


if __name__ == "__main__":
    main()
