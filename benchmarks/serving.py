"""Read-path latency and throughput: the Serve graph under open-loop load, beside two peers.

Needs a data home and namespace that ``rayrec demo`` (or ``--prepare``) made ready: catalog and
features in Redis and a ``production`` bundle in the registry. ``--prepare`` builds the issue's
setting, a 100k-item synthetic catalog (the ``benchmark`` preset), and trains a smoke-sized bundle
on it. Then, on a local Ray of 2 CPUs:

1. **Serve graph, open loop**: ``GET /api/recommendations`` at fixed arrival rates (``--rates``)
   for ``--duration`` seconds each. Arrivals are scheduled ahead of time and latency is measured
   from the scheduled instant, so a slow server is charged for the queue it causes (no
   coordinated omission). Per rate: p50/p95/p99, errors, fallbacks, skipped sources and the
   answers served whole (neither); per stage, per source and
   per hop: the ingress's own medians from ``GET /api/admin/serving``. Also the cost of one empty
   ``DeploymentHandle`` hop.
2. **Serve graph, saturated**: ``--concurrency`` clients in a closed loop for ``--saturate-s``:
   the sustained maximum throughput.
3. **In-process**: the same :class:`RecommendationService` with the models in this process,
   called sequentially: the pipeline's own cost, no HTTP and no hops. The framework-overhead
   ratio is the Serve graph's p50 at the lowest rate over this p50.
4. **Plain ASGI peer**: the same FastAPI app and service with in-process models in one
   ``uvicorn`` process without Ray (``benchmarks.serving_peer``), driven exactly like 1 and 2.

    python -m benchmarks.serving --home var/bench --namespace bench --prepare
    python -m benchmarks.serving --home var/bench --namespace bench --rates 50,100 --duration 20
    python -m benchmarks.serving --home var/bench --namespace bench --model-placement ingress

Results go to ``benchmarks/results/serving.json``. The load generator runs on the same two cores
as the server; the JSON records the load average before and after, and figures are comparable
only between runs at similar load. Each load phase also records the CPU every process spent
(``cpu``: cores busy and milliseconds per request, by role: each deployment, Redis, HAProxy, Ray's
own processes, the load generator; see :mod:`benchmarks.proc_cpu`), which shows where a request's
time went when the node is out of cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np

from benchmarks import proc_cpu
from core.settings import Settings
from features.redis_store import RedisStore

APP = "rayrec-bench"
TOKEN = "serving-benchmark"
RESULTS = Path(__file__).resolve().parent / "results" / "serving.json"
LIMIT = 20


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
    if not users:
        raise SystemExit(f"no users in namespace {settings.namespace!r}: run with --prepare first")
    rng = np.random.default_rng(7)
    return [users[i] for i in rng.choice(len(users), size=min(n, len(users)), replace=False)]


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "max": float("nan")}
    arr = np.asarray(values)
    return {
        "p50": float(np.percentile(arr, 50)),
        "p95": float(np.percentile(arr, 95)),
        "p99": float(np.percentile(arr, 99)),
        "max": float(arr.max()),
    }


@dataclass
class Run:
    """What one load phase saw."""

    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    fallbacks: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    whole: int = 0
    items: list[int] = field(default_factory=list)
    elapsed_s: float = 0.0

    def record(self, latency_ms: float, status: int | None, body: bytes, error: str | None) -> None:
        self.latencies_ms.append(latency_ms)
        if status is None:
            self.statuses[error or "error"] += 1
            return
        self.statuses[str(status)] += 1
        if status == 200:
            answer = json.loads(body)
            self.count(answer.get("fallback"), answer.get("skippedSources") or {})
            self.items.append(len(answer.get("items", [])))

    def count(self, fallback: str | None, skipped: dict[str, str]) -> None:
        """Count an answer's degraded mode and the sources it went without.

        A late source is skipped without a fallback (seed section 17), so an answer counts as whole
        only with neither: under load it is the model-backed sources that run late first.
        """
        self.fallbacks[fallback or "none"] += 1
        self.skipped.update(skipped.keys())
        if fallback is None and not skipped:
            self.whole += 1

    def summary(self) -> dict[str, Any]:
        ok = self.statuses.get("200", 0)
        return {
            "requests": len(self.latencies_ms),
            "ok": ok,
            "errors": len(self.latencies_ms) - ok,
            "statuses": dict(self.statuses),
            "fallbacks": dict(self.fallbacks),
            "skipped_sources": dict(self.skipped),
            "whole": self.whole,
            "throughput_per_s": ok / self.elapsed_s if self.elapsed_s else 0.0,
            "latency_ms": _quantiles(self.latencies_ms),
            "mean_items": float(np.mean(self.items)) if self.items else 0.0,
        }


def _session(base_url: str, connections: int, timeout_s: float = 30.0) -> aiohttp.ClientSession:
    """The load generator's HTTP client.

    aiohttp rather than httpx: the load generator shares the server's two cores, and at 50
    requests/s httpx cost it 2.7-3.0 ms of CPU per request, aiohttp 1.1 ms (``cpu`` in the
    results); the server gets the difference back.
    """
    return aiohttp.ClientSession(
        base_url=base_url,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        connector=aiohttp.TCPConnector(limit=connections),
    )


async def _one(client: aiohttp.ClientSession, user: str, run: Run, started: float) -> None:
    status: int | None = None
    body = b""
    error: str | None = None
    try:
        async with client.get(
            "/api/recommendations", params={"userId": user, "limit": str(LIMIT)}
        ) as response:
            status, body = response.status, await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        error = type(exc).__name__
    run.record((time.perf_counter() - started) * 1000.0, status, body, error)


async def open_loop(base_url: str, users: list[str], rate: float, duration_s: float) -> Run:
    """Requests at a fixed arrival rate; latency counted from each request's scheduled instant."""
    run = Run()
    async with _session(base_url, 512) as client:
        total = int(rate * duration_s)
        t0 = time.perf_counter()
        tasks = []
        for n in range(total):
            scheduled = t0 + n / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(client, users[n % len(users)], run, scheduled)))
        await asyncio.gather(*tasks)
        run.elapsed_s = time.perf_counter() - t0
    return run


async def closed_loop(base_url: str, users: list[str], concurrency: int, duration_s: float) -> Run:
    """``concurrency`` clients each sending their next request when the last one answers."""
    run = Run()
    async with _session(base_url, concurrency) as client:
        t0 = time.perf_counter()
        deadline = t0 + duration_s

        async def worker(k: int) -> None:
            n = k
            while time.perf_counter() < deadline:
                await _one(client, users[n % len(users)], run, time.perf_counter())
                n += concurrency

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        run.elapsed_s = time.perf_counter() - t0
    return run


async def _warm(base_url: str, users: list[str], n: int) -> None:
    async with _session(base_url, 4, timeout_s=60.0) as client:
        for k in range(n):
            async with client.get(
                "/api/recommendations", params={"userId": users[k % len(users)], "limit": str(LIMIT)}
            ) as response:
                await response.read()


def drive(
    base_url: str,
    users: list[str],
    args: argparse.Namespace,
    label: str,
    stages: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Warm up, run every open-loop rate, then saturate.

    ``stages``, when given, reads the server's per-stage medians; it is called after each open-loop
    rate, so each rate's stages are its own (the window of recent samples a replica keeps,
    ``deployments.recommender.metrics.WINDOW``, holds about one phase).
    """
    asyncio.run(_warm(base_url, users, args.warmup))
    result: dict[str, Any] = {"open_loop": {}}
    for rate in args.rates:
        before = proc_cpu.snapshot()
        summary = asyncio.run(open_loop(base_url, users, rate, args.duration)).summary()
        summary["cpu"] = proc_cpu.report(before, proc_cpu.snapshot(), summary["ok"])
        result["open_loop"][str(rate)] = summary
        q = summary["latency_ms"]
        print(
            f"[{label}] {rate:>5.0f} req/s open loop: p50 {q['p50']:6.1f}  p95 {q['p95']:6.1f}  "
            f"p99 {q['p99']:6.1f} ms; achieved {summary['throughput_per_s']:.1f}/s; "
            f"errors {summary['errors']}; whole {summary['whole']}/{summary['ok']}; "
            f"fallbacks {summary['fallbacks']}; skipped sources {summary['skipped_sources']}",
            flush=True,
        )
        _print_cpu(label, summary["cpu"])
        if stages is not None:
            summary["ingress_medians_ms"] = stages()
    before = proc_cpu.snapshot()
    summary = asyncio.run(closed_loop(base_url, users, args.concurrency, args.saturate_s)).summary()
    summary["cpu"] = proc_cpu.report(before, proc_cpu.snapshot(), summary["ok"])
    result["saturated"] = summary
    q = summary["latency_ms"]
    print(
        f"[{label}] saturated ({args.concurrency} clients): {summary['throughput_per_s']:.1f} req/s, "
        f"p50 {q['p50']:.1f} p99 {q['p99']:.1f} ms, errors {summary['errors']}, "
        f"whole {summary['whole']}/{summary['ok']}",
        flush=True,
    )
    _print_cpu(label, summary["cpu"])
    return result


def _print_cpu(label: str, cpu: dict[str, Any]) -> None:
    """One line: CPU ms per request by process role, the largest first, and the cores busy."""
    per_request: dict[str, float] = cpu.get("ms_per_request", {})
    if not per_request:
        return
    shares = ", ".join(f"{k} {v:.1f}" for k, v in per_request.items() if k != "total" and v >= 0.1)
    cores = cpu["cores"].get("total", 0.0)
    total = per_request["total"]
    print(f"[{label}]   CPU per request {total:.1f} ms ({cores:.2f} cores): {shares}", flush=True)


def serve_graph(settings: Settings, users: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Phases 1 and 2 on the Serve graph of ``ray_config.yaml``."""
    from ray import serve

    from deployments.commands import connect_ray
    from deployments.reload import deploy, serve_config

    connect_ray(2)
    port = _free_port()
    base: dict[str, Any] = {
        "home": settings.home,
        "namespace": settings.namespace,
        "redis_url": settings.redis_url,
    }
    if args.serving:
        base["serving"] = args.serving
    in_ingress = args.model_placement == "ingress"
    if in_ingress:
        base["model_placement"] = "ingress"
    deploy(serve_config(APP, base, host="127.0.0.1", port=port, env_vars={"RAYREC_ADMIN_TOKEN": TOKEN}))
    try:
        hops = []
        if not in_ingress:  # with the models in the ingress there is no model deployment to ping
            handle = serve.get_deployment_handle("retrieval", APP)
            for _ in range(20):
                handle.ping.remote().result()
            for _ in range(200):
                started = time.perf_counter()
                handle.ping.remote().result()
                hops.append((time.perf_counter() - started) * 1000)
        base_url = f"http://127.0.0.1:{port}"

        def status() -> dict[str, Any]:
            reply: dict[str, Any] = httpx.get(
                f"{base_url}/api/admin/serving", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
            ).json()
            return reply

        result = drive(base_url, users, args, "serve", stages=lambda: status()["latencyMs"])
        final = status()
    finally:
        serve.delete(APP)
    result["hop_ms_driver_to_replica"] = _quantiles(hops)
    result["ingress_medians_ms"] = final["latencyMs"]
    result["models"] = final["models"]
    return result


def in_process(
    settings: Settings, users: list[str], n: int, serving: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Phase 3: the service called in this process, one request at a time."""
    from benchmarks.serving_peer import local_service, warm
    from deployments.recommender.options import ServingOptions
    from deployments.recommender.service import RecommendationQuery

    counted = Run()

    async def run() -> list[float]:
        store = RedisStore.from_settings(settings)
        service = local_service(settings, store, ServingOptions.model_validate(serving or {}))
        await warm(service)
        walls = []
        for k in range(n + 30):
            started = time.perf_counter()
            answer = await service.recommend(
                RecommendationQuery(user_id=users[k % len(users)], surface="home", limit=LIMIT)
            )
            if k >= 30:
                walls.append((time.perf_counter() - started) * 1000.0)
                counted.count(answer.fallback, answer.skipped_sources)
        await service.close()
        await store.aclose()
        store.close()
        return walls

    walls = asyncio.run(run())
    q = _quantiles(walls)
    print(
        f"[in-process] p50 {q['p50']:.1f}  p95 {q['p95']:.1f}  p99 {q['p99']:.1f} ms; "
        f"whole {counted.whole}/{n}",
        flush=True,
    )
    return {
        "requests": n,
        "latency_ms": q,
        "whole": counted.whole,
        "fallbacks": dict(counted.fallbacks),
        "skipped_sources": dict(counted.skipped),
    }


def peer(settings: Settings, users: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Phase 4: one uvicorn process serving the same app with in-process models."""
    port = _free_port()
    env = {
        **os.environ,
        "RAYREC_HOME": str(settings.home),
        "RAYREC_NAMESPACE": settings.namespace,
        "RAYREC_REDIS_URL": settings.redis_url,
    }
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "benchmarks.serving_peer:create_peer_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    process = subprocess.Popen(command, env=env)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the plain ASGI peer did not start")
            time.sleep(0.5)
        return drive(base_url, users, args, "asgi peer")
    finally:
        process.terminate()
        process.wait(timeout=30)


def prepare(settings: Settings) -> None:
    """The 100k-item world in the lake and Redis, and a smoke-sized ``production`` bundle.

    ``rayrec demo`` does exactly that (and checks that the app answers) before it returns.
    """
    # The interpreter running this script, so the command works without an activated venv.
    command = [
        sys.executable,
        "-m",
        "cluster.cli",
        "demo",
        "--preset",
        "benchmark",
        "--no-block",
        "--quiet",
        "--port",
        str(_free_port()),
    ]
    command += ["--home", str(settings.home), "--namespace", settings.namespace]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--prepare", action="store_true", help="generate the 100k-item world and train first")
    parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[50.0, 100.0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per open-loop rate")
    parser.add_argument("--concurrency", type=int, default=16, help="clients of the saturation phase")
    parser.add_argument("--saturate-s", type=float, default=15.0)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--in-process-requests", type=int, default=300)
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument(
        "--model-placement",
        choices=["deployments", "ingress"],
        default="deployments",
        help="the Serve graph's model placement (AppArgs.model_placement)",
    )
    parser.add_argument(
        "--serving",
        type=json.loads,
        default=None,
        help="ServingOptions of the Serve graph and in-process, as JSON, e.g. '{\"item_record_ttl_s\": 0}'",
    )
    args = parser.parse_args()

    settings = Settings.from_env(None, home=args.home, namespace=args.namespace)
    if args.prepare:
        prepare(settings)
    users = _users(settings, 2000)
    load_before = os.getloadavg()
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "namespace": settings.namespace,
        "limit": LIMIT,
        "rates": args.rates,
        "duration_s": args.duration,
        "serving_options": args.serving or {},
        "model_placement": args.model_placement,
    }
    result["serve"] = serve_graph(settings, users, args)
    result["in_process"] = in_process(settings, users, args.in_process_requests, args.serving)
    if not args.skip_peer:
        result["asgi_peer"] = peer(settings, users, args)
    result["load_average_before"] = load_before
    result["load_average_after"] = os.getloadavg()

    low = str(min(args.rates))
    serve_p50 = result["serve"]["open_loop"][low]["latency_ms"]["p50"]
    result["framework_overhead_ratio_p50"] = serve_p50 / result["in_process"]["latency_ms"]["p50"]
    if "asgi_peer" in result:
        result["throughput_ratio_serve_over_peer"] = result["serve"]["saturated"]["throughput_per_s"] / max(
            result["asgi_peer"]["saturated"]["throughput_per_s"], 1e-9
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    hop = result["serve"]["hop_ms_driver_to_replica"]["p50"]
    print(f"hop (empty call, driver -> replica): p50 {hop:.2f} ms")
    print(f"ingress stages at {low}/s (one replica's recent window):")
    for series, values in result["serve"]["open_loop"][low].get("ingress_medians_ms", {}).items():
        print(f"  {series:<32} p50 {values['p50']:7.2f} ms  p90 {values['p90']:7.2f} ms")
    print(
        f"framework overhead (Serve HTTP p50 at {low}/s over in-process p50): "
        f"{result['framework_overhead_ratio_p50']:.2f}x"
    )
    if "throughput_ratio_serve_over_peer" in result:
        print(
            f"max throughput, Serve graph / plain ASGI peer: {result['throughput_ratio_serve_over_peer']:.2f}"
        )
    print(f"load average {load_before} -> {result['load_average_after']}; written to {RESULTS}")


if __name__ == "__main__":
    main()
