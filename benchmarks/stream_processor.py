"""Stream processor CPU probe: CPU time per event, by component, of one processor in-process.

Fills a Redis namespace of its own with the catalog and a prepared stream of events shaped like
the ingest benchmark's (``benchmarks.ingest.Workload``: 50k users, Zipf items, a feed's event
mix; each event validated as the API validates it and appended as the intake appends it), then
drains the stream with one :class:`features.stream_processor.StreamProcessor` twice over fresh
copies of the stream:

1. unprofiled, timing the whole drain with ``time.process_time`` (this process' CPU, which other
   jobs on the machine do not inflate) and wall time, plus the Redis server's own CPU from
   ``INFO cpu``;
2. under ``cProfile``, to split that CPU into components (decode, idempotency and catalog reads,
   state reads, folds, serving records and encoding, the commit script, acknowledging). The
   profiler slows Python down, so the split is reported as shares applied to the unprofiled
   total.

The process collects garbage as the processor actor's does (:func:`features.consumer_loop.relax_gc`);
``--default-gc`` keeps Python's defaults, for comparison.

    python -m benchmarks.stream_processor                    # 50,000 events, batches of 2,000
    python -m benchmarks.stream_processor --events 20000 --batch 500

Results go to ``benchmarks/results/stream_processor.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from benchmarks.ingest import LOOPBACK, Workload
from core.schema import UserEvent
from core.settings import Settings
from features.consumer_loop import relax_gc
from features.metrics import StreamMetrics
from features.partitions import PARTITIONS
from features.partitions import partition as partition_named
from features.redis_store import RedisStore
from features.stream_codec import encode_event
from features.stream_processor import GROUP, StreamProcessor

# Component -> (module path fragment, function name) pairs whose cumulative time it owns. The
# first matching component wins, so the more specific ones come first.
COMPONENTS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    (
        "read stream (XREADGROUP)",
        (("features/stream_consumer.py", "next_batch"),),
    ),
    (
        "decode entries",
        (
            ("features/stream_processor.py", "_decode"),
            ("features/stream_codec.py", "decode_event"),
            ("features/stream_codec.py", "decode_record"),
            ("features/records.py", "from_event"),
        ),
    ),
    ("acknowledge (XACK)", (("features/stream_consumer.py", "ack"),)),
    (
        "commit script (Lua, round trip)",
        (("features/online_store.py", "_apply"),),
    ),
    (
        "folds",
        (
            ("features/user_activity.py", "update"),
            ("features/item_engagement.py", "update"),
            ("features/creator_quality.py", "update"),
        ),
    ),
    (
        "serving records (serve + encode)",
        (("features/online_store.py", "_record"), ("features/online_store.py", "_queue_record")),
    ),
    ("trending increments", (("features/trending.py", "increments"),)),
    (
        "state decode",
        (
            ("features/online_store.py", "_decode_views"),
            ("features/online_store.py", "_hashes"),
        ),
    ),
)


def prepare_stream(store: RedisStore, workload: Workload, n_events: int, prefix: str) -> int:
    """Append ``n_events`` validated events to the namespace's events stream."""
    stream = store.keys.stream_events()
    appended = 0
    for body in workload.bodies(prefix, max(1, n_events // 1000), 1000):
        events = [UserEvent.model_validate(e) for e in json.loads(body)["events"]]
        pipe = store.client.pipeline(transaction=False)
        for event in events:
            pipe.xadd(stream, encode_event(event))
        pipe.execute()
        appended += len(events)
    return appended


def redis_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def command_usec(client: redis.Redis) -> dict[str, tuple[int, int]]:
    """Calls and microseconds by command, from ``INFO commandstats`` (commands inside scripts too)."""
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for name, v in stats.items()}


def fresh(store: RedisStore, workload: Workload, n_events: int) -> None:
    """An empty namespace holding the catalog and a new stream."""
    store.delete_namespace()
    store.mset_json({store.keys.item(i): rec for i, rec in workload.catalog().items()})
    prepare_stream(store, workload, n_events, f"p{uuid.uuid4().hex[:6]}")


def _processor(store: RedisStore, overlap: bool, partition: str | None) -> StreamProcessor:
    share = None if partition is None else partition_named(partition)
    return StreamProcessor(store, "probe-0", partition=share, metrics=StreamMetrics(), overlap=overlap)


def timed_drain(
    store: RedisStore, batch: int, overlap: bool = False, partition: str | None = None
) -> dict[str, Any]:
    processor = _processor(store, overlap, partition)
    redis_before, commands_before = redis_cpu_s(store.client), command_usec(store.client)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    handled = processor.drain(count=batch)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    redis_cpu = redis_cpu_s(store.client) - redis_before
    commands_after = command_usec(store.client)
    # The server is shared: other clients' commands land here too, so this is an upper bound.
    by_command = {
        name: round((usec - commands_before.get(name, (0, 0))[1]) / max(handled, 1), 2)
        for name, (_calls, usec) in commands_after.items()
        if usec > commands_before.get(name, (0, 0))[1]
    }
    return {
        "events": handled,
        "applied": processor.stats.applied,
        "batches": processor.stats.batches,
        "cpu_s": round(cpu, 3),
        "wall_s": round(wall, 3),
        "cpu_us_per_event": round(cpu / handled * 1e6, 1),
        "wall_us_per_event": round(wall / handled * 1e6, 1),
        "events_per_cpu_s": round(handled / cpu),
        "events_per_wall_s": round(handled / wall),
        "redis_server_cpu_us_per_event": round(redis_cpu / handled * 1e6, 1),
        "redis_command_us_per_event": dict(sorted(by_command.items(), key=lambda kv: -kv[1])),
    }


def profiled_drain(
    store: RedisStore, batch: int, overlap: bool = False, partition: str | None = None
) -> tuple[int, pstats.Stats]:
    processor = _processor(store, overlap, partition)
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    handled = processor.drain(count=batch)
    profiler.disable()
    return handled, pstats.Stats(profiler)


def split(stats: pstats.Stats, total_cpu_s: float, events: int) -> dict[str, Any]:
    """Per-component CPU, as shares of the profiled drain applied to the unprofiled total."""
    raw: dict[tuple[str, int, str], Any] = stats.stats  # type: ignore[attr-defined]
    cumulative: dict[str, float] = {}
    for (path, _line, name), (_cc, _nc, _tt, ct, _callers) in raw.items():
        for component, owners in COMPONENTS:
            if any(path.endswith(fragment) and name == fn for fragment, fn in owners):
                cumulative[component] = cumulative.get(component, 0.0) + ct
                break
    profiled_total = max(float(stats.total_tt), 1e-9)  # type: ignore[attr-defined]
    out: dict[str, Any] = {}
    known = 0.0
    for component, _ in COMPONENTS:
        share = cumulative.get(component, 0.0) / profiled_total
        known += share
        out[component] = round(share * total_cpu_s / events * 1e6, 1)
    out["everything else"] = round(max(0.0, 1.0 - known) * total_cpu_s / events * 1e6, 1)
    return out


def top_functions(stats: pstats.Stats, n: int = 25) -> list[dict[str, Any]]:
    raw: dict[tuple[str, int, str], Any] = stats.stats  # type: ignore[attr-defined]
    rows = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:n]
    return [
        {"function": f"{Path(path).name}:{line}:{name}", "calls": nc, "own_s": round(tt, 3)}
        for (path, line, name), (_cc, nc, tt, _ct, _callers) in rows
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("RAYREC_REDIS_URL", f"redis://{LOOPBACK}:6379/0")
    )
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=2_000, help="most entries per batch (XREADGROUP COUNT)")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled pass")
    parser.add_argument(
        "--overlap",
        action="store_true",
        help="fold each batch while the previous one's write runs, as the processor actor does",
    )
    parser.add_argument(
        "--default-gc",
        action="store_true",
        help="keep Python's default collector thresholds rather than the processor actor's",
    )
    parser.add_argument(
        "--partition",
        choices=[p.name for p in PARTITIONS],
        help="fold one feature partition, as each processor actor does; all of them when omitted",
    )
    parser.add_argument("--label", default="", help="free text stored with the result")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/stream_processor.json"))
    args = parser.parse_args(argv)

    if not args.default_gc:
        relax_gc()  # as StreamProcessorActor does in its own process
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    # A generous timeout: on a shared, busy machine one batch's script can wait seconds for Redis.
    settings = Settings.from_env(redis_url=args.redis_url, namespace=namespace, redis_timeout_s=30.0)
    store = RedisStore.from_settings(settings)
    workload = Workload()
    result: dict[str, Any] = {
        "benchmark": "stream_processor",
        "label": args.label,
        "run_at": datetime.now(UTC).isoformat(),
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "group": GROUP if args.partition is None else partition_named(args.partition).group,
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "gc_threshold": list(gc.get_threshold()),
    }
    try:
        fresh(store, workload, args.events)
        result["timed"] = timed = timed_drain(store, args.batch, args.overlap, args.partition)
        if not args.no_profile:
            fresh(store, workload, args.events)
            handled, stats = profiled_drain(store, args.batch, args.overlap, args.partition)
            result["cpu_us_per_event_by_component"] = split(stats, timed["cpu_s"], handled)
            result["top_functions_own_time"] = top_functions(stats)
    finally:
        result["load_after"] = [round(x, 2) for x in os.getloadavg()]
        store.delete_namespace()
        store.close()

    timed = result["timed"]
    print(f"events {timed['events']:,} in {timed['batches']} batches of up to {args.batch:,}")
    print(
        f"processor CPU {timed['cpu_us_per_event']} us/event "
        f"({timed['events_per_cpu_s']:,} events per CPU-s); "
        f"wall {timed['wall_us_per_event']} us/event ({timed['events_per_wall_s']:,} events/s); "
        f"Redis server CPU {timed['redis_server_cpu_us_per_event']} us/event"
    )
    for component, us in result.get("cpu_us_per_event_by_component", {}).items():
        print(f"  {component.ljust(36)} {us:>7} us/event")
    print(f"load average before / after: {result['load_before']} / {result['load_after']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
