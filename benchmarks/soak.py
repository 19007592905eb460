"""Soak test: the Serve app under a steady load for minutes, watching errors, latency drift and memory.

Starts a local Ray (2 CPUs) and Serve with ``deployments.app.build_app`` on ``127.0.0.1``, in a
Redis namespace and a temporary ``RAYREC_HOME`` of its own, uploads a small catalog through the
API, then for ``--duration-s`` (5 minutes by default) drives two fixed, open-loop flows:

- events: ``--event-rate`` events/s through ``POST /api/events/batch`` in batches of
  ``--batch-size``;
- reads: ``--request-rate`` requests/s of ``GET /api/recommendations`` for random users (or,
  when the app has no such route, ``GET /healthz`` and ``GET /api/items/{id}`` in turn).

A call that is not answered within ``--timeout-s`` counts as an error; calls in flight are capped
(``--max-in-flight``), and a call the cap holds back counts as ``shed`` rather than queueing
without bound. Every ``--sample-every-s`` (10 s) the resident memory of every process of the Ray
instance is sampled (workers are the descendants of this process titled ``ray::…``; the Ray
daemons are reported too).

Reported, per minute: calls, errors, and latency p50/p99 of each flow; latency drift (slope of
the per-minute p99 over the run); and per process a linear fit of RSS over time after
``--warmup-s``: slope in MiB/min with its standard error, growth over the run, and whether memory
stayed flat (growth within the noise of the fit or under 4 MiB). Nothing leaves loopback, and the
run stops by itself: the flows end at the deadline and a watchdog interrupts the process if
teardown hangs.

Every in-memory cache of the app is bounded (the stream processor's entity states, the ingress's
last-served lists, catalog and hydration caches), but a cache still filling looks like a leak. The
defaults therefore use a small population (200 users, 2,000 items: at 500 events/s every user's
recent-items list reaches its cap within the first minute) and leave two minutes out of the fit;
with 5,000 users the processor's states were still growing toward their caps after 5 minutes.

    python -m benchmarks.soak                      # 5 minutes
    python -m benchmarks.soak --duration-s 180     # 3 minutes

JSON goes to ``benchmarks/results/soak.json`` and a summary is printed. The machine is shared:
the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from benchmarks import http_ready
from core.settings import Settings
from features.redis_store import RedisStore

LOOPBACK = "127.0.0.1"
APP_NAME = "rayrec-soak"
ADMIN_TOKEN = f"soak-{uuid.uuid4().hex}"
CATEGORIES = ("music", "sports", "news", "food", "travel", "games", "tech", "fashion")
EVENT_TYPES = ("view", "view", "view", "click", "click", "skip", "like", "share")
FLAT_GROWTH_MIB = 4.0
"""Growth over a run below which memory counts as flat whatever the fit says."""


# -- the app under test ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_app(settings: Settings, port: int) -> Iterator[str]:
    """Ray + Serve with ``build_app`` on loopback; everything is shut down on exit."""
    import ray
    from ray import serve

    from deployments.app import build_app

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Replicas read secrets from their environment, which they inherit from this process.
    os.environ["RAYREC_ADMIN_TOKEN"] = ADMIN_TOKEN
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace=settings.namespace)
    try:
        serve.start(http_options={"host": LOOPBACK, "port": port})
        args = {"namespace": settings.namespace, "redis_url": settings.redis_url, "home": settings.home}
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        yield f"http://{LOOPBACK}:{port}"
    finally:
        with contextlib.suppress(Exception):
            serve.delete(APP_NAME)
        with contextlib.suppress(Exception):
            serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()


async def wait_ready(base: str, timeout_s: float = 180.0) -> None:
    await http_ready.wait_ready(base, timeout_s)


async def upload_catalog(base: str, n_items: int) -> None:
    items = [
        {
            "itemId": f"item-{i}",
            "itemType": "video",
            "title": f"item {i}",
            "category": CATEGORIES[i % len(CATEGORIES)],
            "creatorId": f"creator-{i % 50}",
        }
        for i in range(n_items)
    ]
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        for start in range(0, n_items, 1000):
            async with http.post(
                f"{base}/api/catalog/items", json={"items": items[start : start + 1000]}, headers=headers
            ) as response:
                if response.status != 200:
                    raise RuntimeError(f"catalog upload answered {response.status}: {await response.text()}")


async def has_route(base: str, path: str) -> bool:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        http.get(f"{base}/openapi.json") as response,
    ):
        spec = await response.json()
    return path in spec.get("paths", {})


# -- load ---------------------------------------------------------------------------------------------


@dataclass
class Calls:
    """Every call's outcome: (seconds since start, flow, status or error kind, latency ms)."""

    started: float
    rows: list[tuple[float, str, str, float]] = field(default_factory=list)
    shed: Counter[str] = field(default_factory=Counter)

    def add(self, flow: str, outcome: str, latency_ms: float) -> None:
        self.rows.append((time.monotonic() - self.started, flow, outcome, latency_ms))


def _event_body(n: int, rng: random.Random, n_users: int, n_items: int) -> bytes:
    stamp = (datetime.now(UTC) - timedelta(seconds=1)).isoformat().replace("+00:00", "Z")
    events = [
        {
            "userId": f"user-{rng.randrange(n_users)}",
            "itemId": f"item-{min(n_items - 1, int(rng.paretovariate(1.2)) - 1)}",
            "eventType": rng.choice(EVENT_TYPES),
            "timestamp": stamp,
            "context": {"surface": "home", "device": "mobile"},
        }
        for _ in range(n)
    ]
    return json.dumps({"events": events}, separators=(",", ":")).encode()


async def steady(
    rate_per_s: float,
    until: float,
    calls: Calls,
    flow: str,
    make: Callable[[], Awaitable[tuple[str, float]]],
    max_in_flight: int,
) -> None:
    """Start ``make()`` at a fixed rate until ``until`` (monotonic), never waiting for answers."""
    if rate_per_s <= 0:
        return
    period = 1.0 / rate_per_s
    in_flight: set[asyncio.Task[None]] = set()

    async def one() -> None:
        outcome, latency_ms = await make()
        calls.add(flow, outcome, latency_ms)

    next_at = time.monotonic()
    while next_at < until:
        delay = next_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(in_flight) >= max_in_flight:
            calls.shed[flow] += 1
        else:
            task = asyncio.create_task(one())
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        next_at += period
    if in_flight:
        await asyncio.wait(in_flight)


async def timed(request: Callable[[], Awaitable[int]]) -> tuple[str, float]:
    sent = time.perf_counter()
    try:
        status = await request()
        outcome = str(status)
    except TimeoutError:
        outcome = "timeout"
    except aiohttp.ClientError as exc:
        outcome = type(exc).__name__
    return outcome, (time.perf_counter() - sent) * 1000


# -- memory -------------------------------------------------------------------------------------------


def process_title(cmdline: list[str], name: str) -> str:
    """What a process is: its ``ray::…`` title, else its program, or a Python process's script."""
    if not cmdline:
        return name
    if cmdline[0].startswith("ray::"):
        return cmdline[0].strip()[:80]
    program = Path(cmdline[0]).name
    if program.startswith("python"):
        script = next((arg for arg in cmdline[1:] if not arg.startswith("-")), "")
        return f"python {Path(script).name}" if script else program
    return program[:80]


@dataclass
class MemorySampler:
    """RSS of every descendant process of this one (the local Ray instance), every ``every_s``."""

    every_s: float
    started: float
    samples: dict[int, list[tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))
    titles: dict[int, str] = field(default_factory=dict)

    def sample(self) -> None:
        # psutil ships inside Ray's third-party directory, importable once ray is.
        psutil: Any = importlib.import_module("psutil")
        t_s = time.monotonic() - self.started
        for proc in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                rss_mib = proc.memory_info().rss / 2**20
                self.titles[proc.pid] = process_title(proc.cmdline(), proc.name())
                self.samples[proc.pid].append((t_s, rss_mib))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.every_s)


def memory_fit(points: list[tuple[float, float]], warmup_s: float, duration_s: float) -> dict[str, Any]:
    """Linear fit of RSS (MiB) over minutes after the warm-up: slope, its standard error, growth."""
    kept = [(t / 60.0, rss) for t, rss in points if t >= warmup_s]
    out: dict[str, Any] = {
        "samples": len(kept),
        "rss_first_mib": round(points[0][1], 1),
        "rss_last_mib": round(points[-1][1], 1),
        "rss_max_mib": round(max(r for _, r in points), 1),
    }
    if len(kept) < 3:
        out.update({"slope_mib_per_min": None, "flat": None})
        return out
    t = np.array([p[0] for p in kept])
    y = np.array([p[1] for p in kept])
    slope, intercept = np.polyfit(t, y, 1)
    residuals = y - (slope * t + intercept)
    noise = float(np.std(residuals, ddof=2)) if len(kept) > 2 else 0.0
    spread = float(np.sum((t - t.mean()) ** 2))
    stderr = noise / math.sqrt(spread) if spread > 0 else float("inf")
    minutes = (duration_s - warmup_s) / 60.0
    growth = float(slope) * minutes
    flat = growth <= FLAT_GROWTH_MIB or float(slope) <= 2 * stderr
    out.update(
        {
            "slope_mib_per_min": round(float(slope), 3),
            "slope_stderr_mib_per_min": round(stderr, 3),
            "residual_noise_mib": round(noise, 2),
            "growth_over_run_mib": round(growth, 1),
            "flat": bool(flat),
        }
    )
    return out


# -- reporting ----------------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)], 1)


def _ok(flow: str, outcome: str) -> bool:
    return outcome.isdigit() and (outcome == "202" if flow == "events" else outcome == "200")


def per_minute(calls: Calls, duration_s: float) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    minutes = max(1, math.ceil(duration_s / 60.0))
    for flow in sorted({row[1] for row in calls.rows}):
        rows = [r for r in calls.rows if r[1] == flow]
        table = []
        for m in range(minutes):
            in_minute = [r for r in rows if m * 60 <= r[0] < (m + 1) * 60]
            latencies = [r[3] for r in in_minute if _ok(flow, r[2])]
            table.append(
                {
                    "minute": m + 1,
                    "calls": len(in_minute),
                    "errors": sum(1 for r in in_minute if not _ok(flow, r[2])),
                    "p50_ms": _pct(latencies, 50),
                    "p99_ms": _pct(latencies, 99),
                }
            )
        out[flow] = table
    return out


def drift(table: list[dict[str, Any]]) -> dict[str, Any]:
    """Slope of the per-minute p99 over the run (ms per minute), over minutes with data."""
    points = [(row["minute"], row["p99_ms"]) for row in table if row["p99_ms"] is not None]
    if len(points) < 3:
        return {"p99_slope_ms_per_min": None}
    slope, _ = np.polyfit([p[0] for p in points], [p[1] for p in points], 1)
    return {
        "p99_slope_ms_per_min": round(float(slope), 2),
        "p99_first_min_ms": points[0][1],
        "p99_last_min_ms": points[-1][1],
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def print_summary(result: dict[str, Any]) -> None:
    print(f"\nsoak: {result['duration_s']:.0f} s, read flow: {result['read_flow']}")
    for flow, stats in result["flows"].items():
        totals = stats["totals"]
        print(
            f"  {flow:<8} calls {totals['calls']:>6}  errors {totals['errors']:>4}  shed {totals['shed']:>4}"
            f"  outcomes {totals['outcomes']}"
        )
        for row in stats["per_minute"]:
            print(
                f"    min {row['minute']:>2}: {row['calls']:>5} calls {row['errors']:>3} errors"
                f"  p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms"
            )
        d = stats["drift"]
        print(f"    p99 drift: {d['p99_slope_ms_per_min']} ms/min")
    print("  memory (RSS, fit after warm-up):")
    for proc in result["memory"]["processes"]:
        fit = proc["fit"]
        slope = fit["slope_mib_per_min"]
        slope_text = (
            "n/a" if slope is None else f"{slope:+.2f} ± {fit['slope_stderr_mib_per_min']:.2f} MiB/min"
        )
        verdict = {True: "flat", False: "GROWING", None: "too few samples"}[fit["flat"]]
        print(
            f"    {proc['title'][:44]:<44} {fit['rss_first_mib']:>7.1f} -> {fit['rss_last_mib']:>7.1f} MiB"
            f"  {slope_text:<26} {verdict}"
        )
    print(f"  all worker memory flat: {result['memory']['workers_flat']}")
    print(f"  load average before / after: {result['load_before']} / {result['load_after']}")


# -- the run ------------------------------------------------------------------------------------------


async def soak(args: argparse.Namespace, base: str) -> dict[str, Any]:
    await wait_ready(base)
    await upload_catalog(base, args.items)
    recommendations = await has_route(base, "/api/recommendations")
    read_flow = "GET /api/recommendations" if recommendations else "GET /healthz + GET /api/items/{id}"
    rng = random.Random(args.seed)
    timeout = aiohttp.ClientTimeout(total=args.timeout_s)
    connector = aiohttp.TCPConnector(limit=args.max_in_flight * 2)
    started = time.monotonic()
    calls = Calls(started=started)
    sampler = MemorySampler(every_s=args.sample_every_s, started=started)
    stop = asyncio.Event()
    until = started + args.duration_s
    reads = 0
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def post_events() -> tuple[str, float]:
            body = _event_body(args.batch_size, rng, args.users, args.items)

            async def request() -> int:
                async with http.post(
                    f"{base}/api/events/batch", data=body, headers={"content-type": "application/json"}
                ) as response:
                    await response.read()
                    return response.status

            return await timed(request)

        async def read() -> tuple[str, float]:
            nonlocal reads
            reads += 1
            if recommendations:
                url = f"{base}/api/recommendations"
                params = {"userId": f"user-{rng.randrange(args.users)}", "limit": "20"}
            elif reads % 2:
                url, params = f"{base}/healthz", {}
            else:
                url, params = f"{base}/api/items/item-{rng.randrange(args.items)}", {}

            async def request() -> int:
                async with http.get(url, params=params) as response:
                    await response.read()
                    return response.status

            return await timed(request)

        memory = asyncio.create_task(sampler.run(stop))
        await asyncio.gather(
            steady(
                args.event_rate / args.batch_size, until, calls, "events", post_events, args.max_in_flight
            ),
            steady(args.request_rate, until, calls, "reads", read, args.max_in_flight),
        )
        stop.set()
        await memory
    elapsed = time.monotonic() - started
    flows: dict[str, Any] = {}
    minutes = per_minute(calls, args.duration_s)
    for flow, table in minutes.items():
        outcomes = Counter(row[2] for row in calls.rows if row[1] == flow)
        flows[flow] = {
            "totals": {
                "calls": sum(outcomes.values()),
                "errors": sum(n for o, n in outcomes.items() if not _ok(flow, o)),
                "shed": calls.shed[flow],
                "outcomes": dict(sorted(outcomes.items())),
            },
            "per_minute": table,
            "drift": drift(table),
        }
    processes: list[dict[str, Any]] = []
    for pid, points in sorted(sampler.samples.items()):
        title = sampler.titles[pid]
        processes.append(
            {
                "pid": pid,
                "title": title,
                "worker": title.startswith("ray::"),
                "fit": memory_fit(points, args.warmup_s, elapsed),
                "samples": [(round(t, 1), round(r, 1)) for t, r in points],
            }
        )
    worker_verdicts = [p["fit"]["flat"] for p in processes if p["worker"] and p["fit"]["flat"] is not None]
    return {
        "duration_s": round(elapsed, 1),
        "read_flow": read_flow,
        "flows": flows,
        "memory": {
            "sample_every_s": args.sample_every_s,
            "warmup_s": args.warmup_s,
            "flat_growth_mib": FLAT_GROWTH_MIB,
            "workers_flat": all(worker_verdicts) if worker_verdicts else None,
            "processes": processes,
        },
    }


def _watchdog(seconds: float) -> threading.Timer:
    # A hung teardown must not leave the run going: SIGINT unwinds through the finally blocks.
    timer = threading.Timer(seconds, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.daemon = True
    timer.start()
    return timer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("RAYREC_REDIS_URL", f"redis://{LOOPBACK}:6379/0")
    )
    parser.add_argument("--duration-s", type=float, default=300.0)
    parser.add_argument("--event-rate", type=float, default=500.0, help="events/s through the batch route")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--request-rate", type=float, default=10.0, help="read requests/s")
    parser.add_argument("--timeout-s", type=float, default=5.0, help="a call slower than this is an error")
    parser.add_argument("--max-in-flight", type=int, default=64, help="per flow; beyond it calls are shed")
    parser.add_argument("--sample-every-s", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=120.0, help="left out of the memory fit")
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/soak.json"))
    args = parser.parse_args(argv)
    host = args.redis_url.split("//", 1)[1].split("/", 1)[0].split("@")[-1].split(":")[0]
    if host not in (LOOPBACK, "localhost"):
        parser.error("the soak only talks to loopback addresses")
    if not 1 <= args.batch_size <= 1000:
        parser.error("--batch-size must be 1-1000")

    watchdog = _watchdog(args.duration_s + 600.0)
    namespace = f"soak-{uuid.uuid4().hex[:8]}"
    home = tempfile.mkdtemp(prefix="rayrec-soak-")
    settings = Settings.from_env(redis_url=args.redis_url, namespace=namespace, home=home)
    store = RedisStore.from_settings(settings)
    result: dict[str, Any] = {
        "benchmark": "soak",
        "run_at": datetime.now(UTC).isoformat(),
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "load_before": loadavg(),
    }
    try:
        with serve_app(settings, free_port()) as base:
            result.update(asyncio.run(soak(args, base)))
    finally:
        result["load_after"] = loadavg()
        store.delete_namespace()
        store.close()
        shutil.rmtree(home, ignore_errors=True)
        watchdog.cancel()
    print_summary(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
