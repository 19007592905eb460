"""Synthetic world benchmark: how fast ``training.synthetic`` builds a world's Arrow tables.

Consumes every chunk (users, items, edges, events) as a loader would, without writing to disk, and
reports rows per table, wall time, events per second and peak resident memory.

    python -m benchmarks.generate                      # benchmark preset: 10k users, 100k items, 1M events
    python -m benchmarks.generate --preset tiny        # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from training.synthetic import WorldConfig, generate_world


def peak_rss_mib() -> float:
    """Peak resident set size of this process (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def run(config: WorldConfig) -> dict[str, Any]:
    """Generate the world and time it; the catalog phase ends when its last chunk arrives."""
    rows: dict[str, int] = {}
    chunks: dict[str, int] = {}
    arrow_bytes = 0
    largest_chunk = 0
    catalog_s: float | None = None
    start = time.perf_counter()
    for chunk in generate_world(config):
        for name, table in chunk.items():
            if name != "events":
                catalog_s = time.perf_counter() - start
            rows[name] = rows.get(name, 0) + table.num_rows
            chunks[name] = chunks.get(name, 0) + 1
            arrow_bytes += table.nbytes
            largest_chunk = max(largest_chunk, table.num_rows)
    seconds = time.perf_counter() - start
    catalog_s = seconds if catalog_s is None else catalog_s
    events = rows.get("events", 0)
    events_s = seconds - catalog_s
    return {
        "rows": rows,
        "chunks": chunks,
        "largest_chunk_rows": largest_chunk,
        "arrow_mib": round(arrow_bytes / 2**20, 1),
        "seconds": round(seconds, 3),
        "catalog_seconds": round(catalog_s, 3),
        "events_seconds": round(events_s, 3),
        "events_per_s": round(events / seconds) if seconds > 0 else None,
        "events_per_s_event_phase": round(events / events_s) if events_s > 0 else None,
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=["tiny", "small", "benchmark"], default="benchmark")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/generate.json"))
    args = parser.parse_args(argv)

    config = WorldConfig.preset(args.preset, seed=args.seed)
    print(
        f"generating preset {args.preset}: {config.n_users} users, {config.n_items} items, "
        f"{config.n_events} events (seed {config.seed})",
        flush=True,
    )
    measured = run(config)
    result = {
        "benchmark": "generate",
        "run_at": datetime.now(UTC).isoformat(),
        "params": {"preset": args.preset, "seed": args.seed},
        "config": config.model_dump(mode="json", include={"n_users", "n_items", "n_events", "chunk_rows"}),
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
        **measured,
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
