"""Serve autoscaling on a local multi-node cluster: replica counts under rising, then falling load.

Starts a head and a worker raylet on this machine (``cluster.local_cluster``), deploys
``ray_config.yaml`` with ``serve deploy`` (the committed config, with the ingress's autoscaling
made small and fast: 1 to 3 replicas, a low ``target_ongoing_requests``, short delays), then
drives closed-loop ``POST /api/events`` load over loopback in phases (rising, peak, falling,
idle), polling ``serve.status()`` once a second. Everything stops by itself and is torn down.

    python -m benchmarks.autoscaling                        # ~3 minutes including start-up
    python -m benchmarks.autoscaling --phases 5:1,15:16,20:0   # a quick look

Writes the per-second timeline and a summary to ``benchmarks/results/autoscaling.json``.

What it measures is the control loop (how fast Serve adds and removes replicas, and where it
places them), not capacity: the nodes offer more logical CPUs than this machine has cores, and
other work shares the machine, so requests per second do not grow with replicas here. Serve's
metric push intervals are lowered to 1 s (``--push-interval-s``) so that a run fits in minutes;
production keeps Ray's default (10 s), which adds up to that much to every reaction time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from cluster.local_cluster import (
    ClusterState,
    LocalClusterSpec,
    alive_nodes,
    dashboard_get,
    free_port,
    start_local_cluster,
    stop_local_cluster,
)
from core.settings import Settings
from features.redis_store import RedisStore

LOOPBACK = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]
APP_NAME = "rayrec"
DEPLOYMENT = "ingress"
TIMEOUTS = aiohttp.ClientTimeout(total=30)


@dataclass(frozen=True)
class Phase:
    """A stretch of constant closed-loop concurrency."""

    duration_s: float
    concurrency: int

    @classmethod
    def parse_list(cls, text: str) -> list[Phase]:
        """``"10:1,20:4"`` → 10 s at 1 connection, then 20 s at 4."""
        phases = []
        for part in text.split(","):
            duration, concurrency = part.split(":")
            phases.append(cls(float(duration), int(concurrency)))
        return phases


@dataclass
class Counters:
    """Requests finished in the current second; swapped out by the sampler."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def serve_config(args: argparse.Namespace, settings: Settings, port: int, path: Path) -> dict[str, Any]:
    """ray_config.yaml with a fast, small autoscaling config for the ingress, on loopback."""
    raw = yaml.safe_load((ROOT / "ray_config.yaml").read_text())
    # All nodes share one address here, so only the head's proxy can bind the port.
    raw["proxy_location"] = "HeadOnly"
    raw["http_options"] = {"host": LOOPBACK, "port": port}
    app = raw["applications"][0]
    app["name"] = APP_NAME
    app["runtime_env"] = {
        "env_vars": {
            "RAYREC_NAMESPACE": settings.namespace,
            "RAYREC_REDIS_URL": settings.redis_url,
            "RAYREC_HOME": settings.home,
        }
    }
    autoscaling = {
        "min_replicas": 1,
        "max_replicas": args.max_replicas,
        "target_ongoing_requests": args.target_ongoing,
        "upscale_delay_s": args.upscale_delay_s,
        "downscale_delay_s": args.downscale_delay_s,
        "look_back_period_s": args.look_back_s,
    }
    ingress = next(d for d in app["deployments"] if d["name"] == DEPLOYMENT)
    ingress["autoscaling_config"] = autoscaling
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    from deployments.config import check_serve_config

    total_cpus = args.cpus_per_node * 2
    _, (report,) = check_serve_config(path, node_cpus=None)
    # Only the ingress sees this load; the other deployments stay at their start replicas.
    needed = sum(line.cpus_max if line.name == DEPLOYMENT else line.cpus_start for line in report.cpu)
    if needed > total_cpus:
        raise SystemExit(
            f"at {args.max_replicas} ingress replicas the app needs {needed:g} CPUs > {total_cpus}"
        )
    return autoscaling


def client_env(cluster: ClusterState) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    return {**env, **cluster.client_env(), "RAY_USAGE_STATS_ENABLED": "0"}


def serve_cli(cluster: ClusterState, *arguments: str) -> None:
    serve = str(Path(sys.executable).parent / "serve")
    result = subprocess.run(
        [serve, *arguments, "--address", cluster.dashboard_url],
        env=client_env(cluster),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"serve {arguments[0]} failed: {result.stderr[-2000:]}")


def wait_running(timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(APP_NAME)
        if app is not None and app.status == "RUNNING":
            return
        if app is not None and app.status == "DEPLOY_FAILED":
            raise RuntimeError(f"deploy failed: {app.message}")
        time.sleep(1)
    raise RuntimeError(f"the application was not RUNNING after {timeout_s:g} s")


def replica_sample(cluster: ClusterState, node_names: dict[str, str]) -> dict[str, Any]:
    """Replica counts from ``serve.status()``; target and placement from the Serve REST API."""
    from ray import serve

    sample: dict[str, Any] = {}
    app = serve.status().applications.get(APP_NAME)
    if app is not None:
        deployment = app.deployments[DEPLOYMENT]
        states = {str(getattr(k, "value", k)): v for k, v in deployment.replica_states.items()}
        sample["replicas"] = states
        sample["running"] = states.get("RUNNING", 0)
        sample["trigger"] = str(getattr(deployment.status_trigger, "value", deployment.status_trigger))
    try:
        details = dashboard_get(cluster, "/api/serve/applications/")
        ingress = details["applications"][APP_NAME]["deployments"][DEPLOYMENT]
    except (OSError, ValueError, KeyError):
        return sample
    sample["target"] = ingress.get("target_num_replicas")
    nodes: dict[str, int] = {}
    for replica in ingress["replicas"]:
        if replica["state"] == "RUNNING":
            name = node_names.get(replica["node_id"], replica["node_id"][:8])
            nodes[name] = nodes.get(name, 0) + 1
    sample["nodes"] = nodes
    return sample


async def drive(
    base: str, phases: list[Phase], counters: list[Counters], phase_index: list[int], stop: asyncio.Event
) -> None:
    """Closed-loop load: ``concurrency`` connections, each posting one event after another."""
    body_user = uuid.uuid4().hex[:6]

    async def one_connection(client: aiohttp.ClientSession, slot: int, until: float) -> None:
        n = 0
        while time.monotonic() < until and not stop.is_set():
            n += 1
            event = {
                "userId": f"as-{body_user}-{slot}",
                "itemId": f"item-{n % 500}",
                "eventType": "view",
                "context": {"surface": "home"},
            }
            started = time.perf_counter()
            try:
                async with client.post(f"{base}/api/events", json=event) as response:
                    await response.read()
                    ok = response.status == 202
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok:
                counters[0].latencies_ms.append((time.perf_counter() - started) * 1000)
            else:
                counters[0].errors += 1

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=TIMEOUTS, connector=connector) as client:
        for index, phase in enumerate(phases):
            phase_index[0] = index
            until = time.monotonic() + phase.duration_s
            if phase.concurrency == 0:
                await asyncio.sleep(phase.duration_s)
                continue
            await asyncio.gather(*(one_connection(client, slot, until) for slot in range(phase.concurrency)))
    stop.set()


def sampler(
    cluster: ClusterState,
    node_names: dict[str, str],
    phases: list[Phase],
    counters: list[Counters],
    phase_index: list[int],
    stop: threading.Event,
    timeline: list[dict[str, Any]],
    poll_s: float,
) -> None:
    started = time.monotonic()
    while not stop.is_set():
        tick = time.monotonic()
        finished, counters[0] = counters[0], Counters()
        latencies = sorted(finished.latencies_ms)
        phase = phases[phase_index[0]]
        row: dict[str, Any] = {
            "t_s": round(tick - started, 1),
            "phase": phase_index[0],
            "concurrency": phase.concurrency,
            "requests": len(latencies),
            "errors": finished.errors,
            "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
            "p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))], 1) if latencies else None,
        }
        try:
            row.update(replica_sample(cluster, node_names))
        except Exception as exc:  # a missed sample must not end the run; it is recorded instead
            row["sample_error"] = str(exc)
        timeline.append(row)
        print(
            f"t={row['t_s']:>6}s  conc={row['concurrency']:>3}  req/s={row['requests'] / poll_s:>6.0f}  "
            f"p50={row['p50_ms']}ms  running={row.get('running')}  target={row.get('target')}  "
            f"nodes={row.get('nodes')}",
            flush=True,
        )
        stop.wait(max(0.0, poll_s - (time.monotonic() - tick)))


def summarize(timeline: list[dict[str, Any]], phases: list[Phase]) -> dict[str, Any]:
    """Reaction times: from each phase's start to the replica count it leads to."""
    starts = [0.0]
    for phase in phases:
        starts.append(starts[-1] + phase.duration_s)
    peak = max((row.get("running") or 0) for row in timeline)
    peak_index = max(range(len(phases)), key=lambda i: phases[i].concurrency)
    first_up = next((row["t_s"] for row in timeline if (row.get("running") or 0) > 1), None)
    at_peak = next((row["t_s"] for row in timeline if (row.get("running") or 0) == peak), None)
    last_load = max(i for i, p in enumerate(phases) if p.concurrency > 0)
    load_end = starts[last_load + 1]
    back_to_min = next(
        (row["t_s"] for row in timeline if row["t_s"] >= load_end and (row.get("running") or 0) == 1), None
    )
    nodes_at_peak = next((row.get("nodes") for row in timeline if (row.get("running") or 0) == peak), None)
    requests = sum(row["requests"] for row in timeline)
    changes: list[dict[str, Any]] = []
    last: dict[str, Any] = {}
    for row in timeline:
        for key in ("target", "running"):
            value = row.get(key)
            if value is not None and value != last.get(key):
                if key in last:
                    changes.append({"t_s": row["t_s"], key: f"{last[key]} -> {value}"})
                last[key] = value
    return {
        "replica_changes": changes,
        "peak_running_replicas": peak,
        "peak_phase_start_s": starts[peak_index],
        "first_upscale_at_s": first_up,
        "peak_reached_at_s": at_peak,
        "load_ended_at_s": load_end,
        "back_to_min_at_s": back_to_min,
        "downscale_after_load_end_s": None if back_to_min is None else round(back_to_min - load_end, 1),
        "ingress_replicas_by_node_at_peak": nodes_at_peak,
        "requests": requests,
        "errors": sum(row["errors"] for row in timeline),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    phases = Phase.parse_list(args.phases)
    namespace = f"bench-as-{uuid.uuid4().hex[:8]}"
    home = tempfile.mkdtemp(prefix="rayrec-autoscaling-")
    settings = Settings.from_env(redis_url=args.redis_url, namespace=namespace, home=home)
    store = RedisStore.from_settings(settings)
    store.ping()
    push = str(args.push_interval_s)
    spec = LocalClusterSpec(
        workers=1,
        head_cpus=args.cpus_per_node,
        worker_cpus=args.cpus_per_node,
        env={
            "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": push,
            "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": push,
        },
    )
    result: dict[str, Any] = {
        "benchmark": "autoscaling",
        "label": args.label,
        "run_at": datetime.now(UTC).isoformat(),
        "params": {**vars(args), "out": str(args.out)},
        "phases": [{"duration_s": p.duration_s, "concurrency": p.concurrency} for p in phases],
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "load_before": loadavg(),
    }
    cluster = start_local_cluster(spec)
    try:
        # This process becomes a driver of the new cluster, with that cluster's token. Ray reads
        # its authentication settings when it is first imported, so nothing above imports it.
        os.environ.update(cluster.client_env())
        import ray

        ray.init(address=cluster.gcs_address, log_to_driver=False, logging_level=logging.WARNING)
        node_names = {
            node["node_id"]: next(r for r in node["resources_total"] if r.startswith("node_"))
            for node in alive_nodes(cluster)
        }
        port = free_port()
        config_path = Path(home) / "ray_config.autoscaling.yaml"
        result["autoscaling_config"] = serve_config(args, settings, port, config_path)
        deploy_started = time.monotonic()
        serve_cli(cluster, "deploy", str(config_path))
        wait_running(timeout_s=240)
        result["deploy_to_running_s"] = round(time.monotonic() - deploy_started, 1)
        print(f"application RUNNING after {result['deploy_to_running_s']} s; driving load", flush=True)

        timeline: list[dict[str, Any]] = []
        counters = [Counters()]
        phase_index = [0]
        stop_sampling = threading.Event()
        thread = threading.Thread(
            target=sampler,
            args=(cluster, node_names, phases, counters, phase_index, stop_sampling, timeline, args.poll_s),
            daemon=True,
        )
        thread.start()
        try:
            asyncio.run(drive(f"http://{LOOPBACK}:{port}", phases, counters, phase_index, asyncio.Event()))
        finally:
            stop_sampling.set()
            thread.join(timeout=10)
        result["timeline"] = timeline
        result["summary"] = summarize(timeline, phases)
    finally:
        result["load_after"] = loadavg()
        try:
            import ray

            ray.shutdown()
        finally:
            stop_local_cluster(cluster)
            store.delete_namespace()
            store.close()
            shutil.rmtree(home, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("RAYREC_REDIS_URL", f"redis://{LOOPBACK}:6379/0")
    )
    parser.add_argument(
        "--phases",
        default="10:1,20:4,30:16,20:4,45:0",
        help="seconds:connections, in order (default: rise to 16, fall, then idle)",
    )
    parser.add_argument("--max-replicas", type=int, default=3)
    parser.add_argument("--target-ongoing", type=float, default=2.0, help="target_ongoing_requests")
    parser.add_argument("--upscale-delay-s", type=float, default=2.0)
    parser.add_argument("--downscale-delay-s", type=float, default=10.0)
    parser.add_argument(
        "--look-back-s", type=float, default=10.5, help="look_back_period_s (Serve wants > 10)"
    )
    parser.add_argument("--push-interval-s", type=float, default=1.0, help="Serve's metric push intervals")
    parser.add_argument("--cpus-per-node", type=int, default=2, help="logical CPUs per node (2 nodes)")
    parser.add_argument("--poll-s", type=float, default=1.0)
    parser.add_argument("--label", default="", help="free text stored with the result")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "autoscaling.json")
    args = parser.parse_args(argv)
    host = args.redis_url.split("//", 1)[1].split("/", 1)[0].split("@")[-1].split(":")[0]
    if host not in (LOOPBACK, "localhost"):
        parser.error("the benchmark only talks to loopback addresses")

    result = run(args)
    print(json.dumps(result.get("summary", {}), indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
