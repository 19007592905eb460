"""Event ingestion benchmark: the Serve HTTP app end to end, on loopback only.

Starts a local Ray (2 CPUs) and Serve with ``deployments.app.build_app`` on ``127.0.0.1`` (the
ingress, the stream processors and the lake writer all run, as deployed), in a Redis namespace of
its own with a small catalog, then measures two things and tears everything down:

1. freshness: a steady, open-loop flow of events through ``POST /api/events/batch`` (a fixed send
   schedule, 10,000 events/s by default), plus probe events (a ``like`` by a never-seen user on a
   never-seen item, sent through ``POST /api/events``) whose time from ``202`` until both the
   item's and the user's serving records appear in Redis (``OnlineFeatureStore.aget_serving``,
   polled every 5 ms) is recorded: the two feature partitions write them independently, and
   each is reported too; the consumer lag of each group is sampled from Redis meanwhile;
2. throughput: as many events as several concurrent connections push through the batch route
   in ~20 s, with the request bodies (1,000 events each, every event id distinct) built before
   the clock starts so the client's JSON encoding does not count.

Freshness runs first: the throughput phase leaves a backlog behind that would distort it.

    python -m benchmarks.ingest                         # both phases, a few minutes with start-up
    python -m benchmarks.ingest --throughput-s 5 --freshness-s 10 --warmup-s 3   # quick look

Results go to ``benchmarks/results/ingest.json`` and a table is printed. The machine is shared:
the JSON records the load average before and after, and figures are only comparable between
runs at similar load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import socket
import statistics
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from redis.exceptions import RedisError

from benchmarks import http_ready, proc_cpu
from core.schema import EntityType
from core.settings import Settings
from features.metrics import read_stream_status, watched_streams
from features.online_store import OnlineFeatureStore
from features.partitions import PARTITIONS
from features.partitions import groups as feature_groups
from features.redis_store import RedisStore, StoreUnavailable
from features.stream_codec import LAKE_GROUP

FEATURE_GROUPS = feature_groups()
"""The feature partitions' consumer groups, one processor each."""
LOOPBACK = "127.0.0.1"
CATEGORIES = ("music", "sports", "news", "food", "travel", "games", "tech", "fashion")
# The mix of a feed: mostly views, some clicks and skips, fewer likes, shares, watches and hides.
EVENT_MIX = (
    ("view", 0.58),
    ("click", 0.18),
    ("skip", 0.10),
    ("like", 0.07),
    ("share", 0.02),
    ("watch", 0.04),
    ("hide", 0.01),
)
TIMEOUTS = aiohttp.ClientTimeout(total=60)


# -- workload ------------------------------------------------------------------------------------


@dataclass
class Workload:
    """Who acts on what: users uniform, items Zipf-like over a small catalog, a feed's event mix."""

    n_users: int = 50_000
    n_items: int = 10_000
    n_creators: int = 500
    item_skew: float = 0.9
    seed: int = 0
    rng: np.random.Generator = field(init=False)
    item_p: np.ndarray = field(init=False)
    types: list[str] = field(init=False)
    type_p: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        weights = 1.0 / np.arange(1, self.n_items + 1) ** self.item_skew
        self.item_p = weights / weights.sum()
        self.types = [t for t, _ in EVENT_MIX]
        p = np.array([w for _, w in EVENT_MIX])
        self.type_p = p / p.sum()

    def catalog(self) -> dict[str, dict[str, Any]]:
        """Item id to its packed catalog record, as the catalog writer stores it."""
        return {
            f"item-{i}": {
                "item_id": f"item-{i}",
                "item_type": "video",
                "title": f"item {i}",
                "category": CATEGORIES[i % len(CATEGORIES)],
                "creator_id": f"creator-{i % self.n_creators}",
                "status": "active",
                "created_at": "2025-01-01T00:00:00Z",
                "metadata": {},
                "tags": [],
            }
            for i in range(self.n_items)
        }

    def bodies(self, prefix: str, n_bodies: int, per_body: int) -> list[bytes]:
        """Batch request bodies with distinct event ids, JSON-encoded now rather than while timed."""
        total = n_bodies * per_body
        users = self.rng.integers(0, self.n_users, total)
        items = self.rng.choice(self.n_items, total, p=self.item_p)
        kinds = self.rng.choice(len(self.types), total, p=self.type_p)
        regions = ("eu", "us", "apac")
        # Stamped a little in the past: the API refuses events from the future.
        stamp = (datetime.now(UTC) - timedelta(seconds=1)).isoformat().replace("+00:00", "Z")
        out: list[bytes] = []
        for b in range(n_bodies):
            events = []
            for j in range(b * per_body, (b + 1) * per_body):
                kind = self.types[kinds[j]]
                event: dict[str, Any] = {
                    "eventId": f"{prefix}-{j}",
                    "userId": f"user-{users[j]}",
                    "itemId": f"item-{items[j]}",
                    "eventType": kind,
                    "timestamp": stamp,
                    "context": {"surface": "home", "device": "mobile", "region": regions[j % 3]},
                }
                if kind == "watch":
                    event["watchTimeS"] = 30.0
                events.append(event)
            out.append(json.dumps({"events": events}, separators=(",", ":")).encode())
        return out


# -- the app under test -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_app(
    settings: Settings,
    port: int,
    ingress_replicas: int | None,
    ingress_cpus: float | None,
    ingest_only: bool,
) -> Iterator[str]:
    """Ray + Serve with ``build_app`` on loopback; everything is shut down on exit.

    ``ingest_only`` deploys only what events go through (the ingress and the stream workers),
    leaving out the read path's deployments, to compare with versions of the app that had none.
    """
    import ray
    from ray import serve

    import deployments.app as app_module
    from deployments.commands import ray_runtime_env

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # The Serve settings the product runs with (deployments.commands.SERVE_ENVIRONMENT).
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        namespace=settings.namespace,
        runtime_env=ray_runtime_env(),
    )
    try:
        serve.start(http_options={"host": LOOPBACK, "port": port})
        args = {"namespace": settings.namespace, "redis_url": settings.redis_url, "home": settings.home}
        if ingress_replicas is not None or ingress_cpus is not None:
            # build_app's own graph, with the ingress deployment's options changed as a Serve
            # config file would change them.
            options: dict[str, Any] = {}
            if ingress_replicas is not None:
                options["num_replicas"] = ingress_replicas
            if ingress_cpus is not None:
                options["ray_actor_options"] = {"num_cpus": ingress_cpus}
            app_module.Ingress = app_module.Ingress.options(**options)  # type: ignore[attr-defined]
        if ingest_only:
            from deployments.stream_workers import StreamWorkers

            overrides = app_module.AppArgs.model_validate(args).settings_overrides()
            app = app_module.Ingress.bind(overrides, StreamWorkers.bind(overrides))  # type: ignore[attr-defined]
        else:
            app = app_module.build_app(args)
        serve.run(app, name="ingest-bench", route_prefix="/")
        yield f"http://{LOOPBACK}:{port}"
    finally:
        with contextlib.suppress(Exception):
            serve.delete("ingest-bench")
        with contextlib.suppress(Exception):
            serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()


async def wait_ready(base: str, timeout_s: float = 120.0) -> None:
    await http_ready.wait_ready(base, timeout_s)


# -- measurements ----------------------------------------------------------------------------------


def _rounded(value: float | None) -> int | None:
    return None if value is None else round(value)


def percentiles(values: list[float], *qs: float) -> dict[str, float | None]:
    if not values:
        return {f"p{q:g}": None for q in qs}
    ordered = sorted(values)
    return {f"p{q:g}": ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)] for q in qs}


class LagSampler:
    """Samples stream length and each group's lag on the events stream every ``every_s``."""

    def __init__(self, store: RedisStore, every_s: float = 0.5) -> None:
        self.store = store
        self.every_s = every_s
        self.samples: list[dict[str, Any]] = []
        self.missed = 0

    async def run(self, stop: asyncio.Event) -> None:
        streams = {"events": watched_streams(self.store.keys)["events"]}
        start = time.monotonic()
        while not stop.is_set():
            try:
                (status,) = await read_stream_status(self.store.aclient, streams)
            except (RedisError, OSError):
                # A slow answer on a loaded machine costs one sample, not the run.
                self.missed += 1
            else:
                groups = {g.group: g for g in status.groups}
                sample: dict[str, Any] = {"t_s": round(time.monotonic() - start, 2), "length": status.length}
                for name in (*FEATURE_GROUPS, LAKE_GROUP):
                    if name in groups:
                        sample[f"{name}_lag_s"] = round(groups[name].lag_s, 3)
                        sample[f"{name}_undelivered"] = groups[name].undelivered
                        sample[f"{name}_pending"] = groups[name].pending
                        sample[f"{name}_delivered"] = groups[name].delivered
                self.samples.append(sample)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.every_s)

    def finished_per_s(self, group: str, after_s: float) -> float | None:
        """Entries the group finished per second from ``after_s`` on (delivered less pending)."""
        points: list[tuple[float, int]] = [
            (s["t_s"], s[f"{group}_delivered"] - s[f"{group}_pending"])
            for s in self.samples
            if s["t_s"] >= after_s and s.get(f"{group}_delivered") is not None
        ]
        if len(points) < 2 or points[-1][0] <= points[0][0]:
            return None
        return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])

    def summary(self, group: str) -> dict[str, Any]:
        lags = [s[f"{group}_lag_s"] for s in self.samples if f"{group}_lag_s" in s]
        if not lags:
            return {"samples": 0}
        return {
            "samples": len(lags),
            "mean_s": round(statistics.fmean(lags), 3),
            "max_s": round(max(lags), 3),
            "last_s": lags[-1],
            **{k: (None if v is None else round(v, 3)) for k, v in percentiles(lags, 50, 95).items()},
            "last_undelivered": self.samples[-1].get(f"{group}_undelivered"),
        }


async def post_batch(http: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, int]:
    async with http.post(url, data=body, headers={"content-type": "application/json"}) as response:
        if response.status != 202:
            await response.read()
            return response.status, 0
        accepted = (await response.json())["accepted"]
        return response.status, int(accepted)


async def throughput_phase(
    base: str, bodies: list[bytes], seconds: float, connections: int
) -> dict[str, Any]:
    """Closed loop: ``connections`` workers each post the next prebuilt body until time is up."""
    url = f"{base}/api/events/batch"
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    accepted = 0
    next_body = 0
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUTS) as http:
        start = time.perf_counter()
        deadline = start + seconds

        async def worker() -> None:
            nonlocal accepted, next_body
            while time.perf_counter() < deadline and next_body < len(bodies):
                body = bodies[next_body]
                next_body += 1
                sent = time.perf_counter()
                try:
                    status, n = await post_batch(http, url, body)
                except (TimeoutError, aiohttp.ClientError):
                    status, n = 0, 0
                latencies.append(time.perf_counter() - sent)
                statuses[status] += 1
                accepted += n

        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - start
    return {
        "seconds": round(elapsed, 2),
        "connections": connections,
        "requests": sum(statuses.values()),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "events_accepted": accepted,
        "events_per_s": round(accepted / elapsed),
        "bodies_exhausted": next_body >= len(bodies),
        "request_latency_ms": {
            k: (None if v is None else round(v * 1000, 1))
            for k, v in percentiles(latencies, 50, 95, 99).items()
        },
    }


async def freshness_phase(
    base: str,
    store: RedisStore,
    bodies: list[bytes],
    rate: float,
    per_body: int,
    seconds: float,
    warmup_s: float,
    probe_every_s: float,
    poll_s: float,
    settle_s: float,
) -> dict[str, Any]:
    """Open loop: one body every ``per_body / rate`` seconds; probes after ``warmup_s``."""
    url = f"{base}/api/events/batch"
    online = OnlineFeatureStore(store)
    interval = per_body / rate
    run = uuid.uuid4().hex[:8]
    statuses: Counter[int] = Counter()
    accepted = 0
    late_sends = 0
    in_flight_max = 0
    in_flight = 0
    probe_statuses: Counter[int] = Counter()
    # Probe number to its send instant; each probe is seen once its item's and its user's records
    # exist, which the two feature partitions write independently.
    outstanding: dict[int, float] = {}
    seen: dict[EntityType, dict[int, float]] = {EntityType.ITEM: {}, EntityType.USER: {}}
    freshness: dict[int, float] = {}
    stop = asyncio.Event()
    sampler = LagSampler(store)

    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUTS) as http:

        async def send(body: bytes) -> None:
            nonlocal accepted, in_flight, in_flight_max
            in_flight += 1
            in_flight_max = max(in_flight_max, in_flight)
            try:
                status, n = await post_batch(http, url, body)
            except (TimeoutError, aiohttp.ClientError):
                status, n = 0, 0
            finally:
                in_flight -= 1
            statuses[status] += 1
            accepted += n

        def probe_ids(n: int) -> dict[EntityType, str]:
            return {EntityType.ITEM: f"probe-{run}-{n}", EntityType.USER: f"prober-{run}-{n}"}

        async def probe(n: int) -> None:
            ids = probe_ids(n)
            like = {"userId": ids[EntityType.USER], "itemId": ids[EntityType.ITEM], "eventType": "like"}
            try:
                async with http.post(f"{base}/api/events", json=like) as response:
                    await response.read()
                    probe_statuses[response.status] += 1
                    if response.status == 202:
                        outstanding[n] = time.perf_counter()
            except (TimeoutError, aiohttp.ClientError):
                probe_statuses[0] += 1

        async def poll() -> None:
            while not stop.is_set() or outstanding:
                for entity, seen_at in seen.items():
                    waiting = [n for n in outstanding if n not in seen_at]
                    if not waiting:
                        continue
                    try:
                        records = await online.aget_serving(entity, [probe_ids(n)[entity] for n in waiting])
                    except StoreUnavailable:
                        records = [None] * len(waiting)  # seen on a later poll, a little late
                    now = time.perf_counter()
                    for n, record in zip(waiting, records, strict=True):
                        if record is not None:
                            seen_at[n] = now - outstanding[n]
                for n in list(outstanding):
                    if all(n in seen_at for seen_at in seen.values()):
                        outstanding.pop(n)
                        freshness[n] = max(seen_at[n] for seen_at in seen.values())
                if stop.is_set() and time.perf_counter() > settle_deadline:
                    break
                await asyncio.sleep(poll_s)

        tasks: set[asyncio.Task[None]] = set()
        sampler_task = asyncio.create_task(sampler.run(stop))
        settle_deadline = math.inf
        poller = asyncio.create_task(poll())
        start = time.perf_counter()
        total_s = warmup_s + seconds
        n_sends = min(len(bodies), int(total_s / interval))
        next_probe_at = start + warmup_s
        n_probe = 0
        for k in range(n_sends):
            due = start + k * interval
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -interval:
                late_sends += 1  # the client fell behind its own schedule
            task = asyncio.create_task(send(bodies[k]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            while time.perf_counter() >= next_probe_at and next_probe_at < start + total_s:
                probe_task = asyncio.create_task(probe(n_probe))
                tasks.add(probe_task)
                probe_task.add_done_callback(tasks.discard)
                n_probe += 1
                next_probe_at += probe_every_s
        send_elapsed = time.perf_counter() - start
        await asyncio.gather(*list(tasks))
        settle_deadline = time.perf_counter() + settle_s
        stop.set()
        await poller
        await sampler_task

    measured = list(freshness.values())
    missing = len(outstanding)
    # A probe never seen is later than any seen: a percentile that lands on one has no value.
    pct = percentiles(measured + [math.inf] * missing, 50, 95, 99)
    achieved = accepted / send_elapsed
    steady = [s for s in sampler.samples if s["t_s"] >= warmup_s]
    # The slower partition is the one that bounds freshness.
    lags_steady = [max(s.get(f"{g}_lag_s", 0.0) for g in FEATURE_GROUPS) for s in steady]
    kept_up = (
        missing == 0
        and achieved >= 0.95 * rate
        and bool(lags_steady)
        and max(lags_steady) <= 2.0
        and lags_steady[-1] <= 1.0
    )
    return {
        "target_events_per_s": rate,
        "events_per_request": per_body,
        "warmup_s": warmup_s,
        "measured_s": seconds,
        "events_accepted": accepted,
        "achieved_events_per_s": round(achieved),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "late_sends": late_sends,
        "max_requests_in_flight": in_flight_max,
        "probes": n_probe,
        "probe_statuses": {str(k): v for k, v in sorted(probe_statuses.items())},
        "probes_seen": len(measured),
        "probes_never_seen": missing,
        "freshness_ms": {
            k: (None if v is None or math.isinf(v) else round(v * 1000, 1)) for k, v in pct.items()
        },
        "freshness_note": (
            "a probe is seen once both its item's and its user's records exist; null: the "
            "percentile falls on probes never seen within the settle time"
        ),
        **{
            f"freshness_{entity.value}_ms": {
                k: (None if v is None or math.isinf(v) else round(v * 1000, 1))
                for k, v in percentiles(
                    list(seen[entity].values()) + [math.inf] * (len(measured) + missing - len(seen[entity])),
                    50,
                    99,
                ).items()
            }
            for entity in seen
        },
        "freshness_max_ms": round(max(measured) * 1000, 1) if measured else None,
        "consumer_lag_features": {g: sampler.summary(g) for g in FEATURE_GROUPS},
        "consumer_lag_features_after_warmup_max_s": round(max(lags_steady), 3) if lags_steady else None,
        "consumer_lag_lake": sampler.summary(LAKE_GROUP),
        "processor_events_per_s_after_warmup": {
            g: _rounded(sampler.finished_per_s(g, warmup_s)) for g in FEATURE_GROUPS
        },
        "lake_writer_events_per_s_after_warmup": _rounded(sampler.finished_per_s(LAKE_GROUP, warmup_s)),
        "lag_samples_missed": sampler.missed,
        "processor_kept_up": kept_up,
        "lag_samples": sampler.samples,
    }


async def consumer_stats(base: str) -> dict[str, Any]:
    """The /metrics consumer series, when the app has the route."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        http.get(f"{base}/metrics") as response,
    ):
        if response.status != 200:
            return {}
        text = await response.text()
    wanted = (
        "rayrec_consumer_batches_total",
        "rayrec_consumer_batch_seconds_total",
        "rayrec_consumer_entries_total",
        "rayrec_consumer_cpu_seconds_total",
    )
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(wanted):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


# -- driver ------------------------------------------------------------------------------------------


def _cpu_clocks(store: RedisStore) -> dict[str, float]:
    """CPU seconds so far: the whole machine's busy time, Redis' and this process's (the load)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
    info = store.client.info("cpu")
    return {
        "machine": (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"),
        "redis": float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
        "load_generator": time.process_time(),
        "wall": time.monotonic(),
    }


def _cpu_shares(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Cores each clock of :func:`_cpu_clocks` used on average between two readings."""
    wall = after["wall"] - before["wall"]
    return {f"{k}_cores": round((after[k] - before[k]) / wall, 2) for k in after if k != "wall"}


def _consumers_cpu(before: dict[str, float], after: dict[str, float], started: float) -> dict[str, Any]:
    """Each consumer's CPU over a phase: microseconds per entry, and the share of one core it got.

    A consumer that falls behind either costs too much per entry or gets too small a share of
    the machine; the two tell which.
    """
    elapsed = time.monotonic() - started
    out: dict[str, Any] = {}
    for consumer in (*(p.report_name for p in PARTITIONS), "lake_writer"):
        cpu_key = f'rayrec_consumer_cpu_seconds_total{{consumer="{consumer}"}}'
        entries_key = f'rayrec_consumer_entries_total{{consumer="{consumer}"}}'
        if cpu_key not in after or entries_key not in after:
            continue
        cpu_s = after[cpu_key] - before.get(cpu_key, 0.0)
        entries = after[entries_key] - before.get(entries_key, 0.0)
        out[consumer] = {
            "cpu_s": round(cpu_s, 2),
            "entries": int(entries),
            "cpu_us_per_entry": round(cpu_s / entries * 1e6, 1) if entries else None,
            "core_share": round(cpu_s / elapsed, 3) if elapsed > 0 else None,
        }
    return out


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def print_table(result: dict[str, Any]) -> None:
    rows: list[tuple[str, str]] = []
    t = result.get("throughput")
    if t:
        rows += [
            ("batch route, events/s accepted", f"{t['events_per_s']:,}"),
            ("  requests (1,000 events) / statuses", f"{t['requests']} / {t['statuses']}"),
            ("  request latency p50/p95/p99 ms", "/".join(str(v) for v in t["request_latency_ms"].values())),
        ]
    f = result.get("freshness")
    if f:
        fr = f["freshness_ms"]
        rows += [
            (
                "steady flow target / achieved events/s",
                f"{f['target_events_per_s']:,.0f} / {f['achieved_events_per_s']:,}",
            ),
            (
                "freshness p50/p95/p99 ms",
                " / ".join("never seen" if fr[p] is None else str(fr[p]) for p in ("p50", "p95", "p99")),
            ),
            *(
                (
                    f"  {entity} record visible p50/p99 ms",
                    " / ".join(
                        "never seen" if v is None else str(v) for v in f[f"freshness_{entity}_ms"].values()
                    ),
                )
                for entity in ("item", "user")
            ),
            ("  probes seen / never seen", f"{f['probes_seen']} / {f['probes_never_seen']}"),
            *(
                (f"  {group} lag mean/max s", f"{lag.get('mean_s')} / {lag.get('max_s')}")
                for group, lag in f["consumer_lag_features"].items()
            ),
            ("  processors kept up", str(f["processor_kept_up"])),
            *(
                (f"  {group} events/s", str(rate))
                for group, rate in f["processor_events_per_s_after_warmup"].items()
            ),
            ("  lake writer events/s", str(f["lake_writer_events_per_s_after_warmup"])),
        ]
        for consumer, c in f.get("consumers_cpu", {}).items():
            rows.append(
                (
                    f"  {consumer.replace('_', ' ')} CPU us/event / core share",
                    f"{c['cpu_us_per_entry']} / {c['core_share']}",
                )
            )
        cores = f.get("cpu", {})
        if cores:
            rows.append(
                (
                    "  cores busy: machine / Redis / load generator",
                    f"{cores['machine_cores']} / {cores['redis_cores']} / {cores['load_generator_cores']}",
                )
            )
        by_role = f.get("cpu_by_role", {})
        if by_role.get("cores"):
            rows.append(
                (
                    "  cores / CPU us per event, by process",
                    ", ".join(
                        f"{k} {v} / {by_role['us_per_event'].get(k)}" for k, v in by_role["cores"].items()
                    ),
                )
            )
    rows.append(("load average before / after", f"{result['load_before']} / {result['load_after']}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")


async def run_phases(
    args: argparse.Namespace, base: str, store: RedisStore, workload: Workload
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    await wait_ready(base)
    if args.freshness_s > 0:
        per_body = args.steady_batch
        n = math.ceil((args.freshness_s + args.warmup_s) * args.rate / per_body) + 1
        print(f"building {n} bodies of {per_body} events for the steady flow", flush=True)
        bodies = workload.bodies(f"f{uuid.uuid4().hex[:6]}", n, per_body)
        print(
            f"freshness: {args.rate:,.0f} events/s for {args.warmup_s + args.freshness_s:.0f} s", flush=True
        )
        before, started = await consumer_stats(base), time.monotonic()
        clocks, processes = _cpu_clocks(store), proc_cpu.snapshot()
        out["freshness"] = await freshness_phase(
            base,
            store,
            bodies,
            args.rate,
            per_body,
            args.freshness_s,
            args.warmup_s,
            args.probe_every_s,
            0.005,
            args.settle_s,
        )
        out["freshness"]["cpu"] = _cpu_shares(clocks, _cpu_clocks(store))
        # Per event rather than per request: a request of the steady flow carries many events.
        out["freshness"]["cpu_by_role"] = proc_cpu.report(
            processes,
            proc_cpu.snapshot(),
            out["freshness"]["events_accepted"],
            per="us_per_event",
            scale=1e6,
            digits=1,
        )
        out["freshness"]["consumers_cpu"] = _consumers_cpu(before, await consumer_stats(base), started)
        del bodies
    if args.throughput_s > 0:
        n = math.ceil(args.throughput_s * args.max_rate / 1000)
        print(f"building {n} bodies of 1,000 events for the throughput phase", flush=True)
        bodies = workload.bodies(f"t{uuid.uuid4().hex[:6]}", n, 1000)
        before = await consumer_stats(base)
        print(f"throughput: {args.connections} connections for {args.throughput_s:.0f} s", flush=True)
        out["throughput"] = await throughput_phase(base, bodies, args.throughput_s, args.connections)
        after = await consumer_stats(base)
        out["throughput"]["consumers_during"] = {k: round(after[k] - before.get(k, 0.0), 3) for k in after}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("RAYREC_REDIS_URL", f"redis://{LOOPBACK}:6379/0")
    )
    parser.add_argument("--throughput-s", type=float, default=20.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument(
        "--max-rate", type=float, default=60_000, help="events/s the prebuilt bodies can feed"
    )
    parser.add_argument("--freshness-s", type=float, default=30.0)
    parser.add_argument("--warmup-s", type=float, default=10.0)
    parser.add_argument("--settle-s", type=float, default=15.0, help="wait for late probes after the flow")
    parser.add_argument("--rate", type=float, default=10_000)
    parser.add_argument("--steady-batch", type=int, default=200)
    parser.add_argument("--probe-every-s", type=float, default=0.1)
    parser.add_argument("--ingress-replicas", type=int, default=None, help="override the ingress replicas")
    parser.add_argument(
        "--ingress-cpus", type=float, default=None, help="override the CPUs each ingress reserves"
    )
    parser.add_argument(
        "--ingest-only", action="store_true", help="deploy the ingress and stream workers only"
    )
    parser.add_argument(
        "--serve-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment for every Ray process, e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=0 (repeatable)",
    )
    parser.add_argument("--label", default="", help="free text stored with the result (what was measured)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ingest.json"))
    args = parser.parse_args(argv)
    host = args.redis_url.split("//", 1)[1].split("/", 1)[0].split("@")[-1].split(":")[0]
    if host not in (LOOPBACK, "localhost"):
        parser.error("the benchmark only talks to loopback addresses")

    for assignment in args.serve_env:
        name, _, value = assignment.partition("=")
        # Ray's processes inherit the driver's environment; Serve reads these when it starts.
        os.environ[name] = value
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    home = tempfile.mkdtemp(prefix="rayrec-ingest-")
    settings = Settings.from_env(redis_url=args.redis_url, namespace=namespace, home=home)
    store = RedisStore.from_settings(settings)
    workload = Workload()
    result: dict[str, Any] = {
        "benchmark": "ingest",
        "label": args.label,
        "run_at": datetime.now(UTC).isoformat(),
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "workload": {
            "users": workload.n_users,
            "items": workload.n_items,
            "creators": workload.n_creators,
            "item_zipf_s": workload.item_skew,
            "event_mix": dict(EVENT_MIX),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "load_before": loadavg(),
    }
    try:
        store.mset_json({store.keys.item(i): rec for i, rec in workload.catalog().items()})
        with serve_app(
            settings, free_port(), args.ingress_replicas, args.ingress_cpus, args.ingest_only
        ) as base:
            result.update(asyncio.run(run_phases(args, base, store, workload)))
    finally:
        result["load_after"] = loadavg()
        store.delete_namespace()
        store.close()
        shutil.rmtree(home, ignore_errors=True)
    print()
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
