"""Two-tower training throughput: Ray Train (TorchTrainer, DDP on CPU) against the same loop in plain PyTorch.

The data is built once (lake -> Ray Data -> positives) and then trained on four ways with the same
model, batch size and epochs:

* ``local_1thread``: plain PyTorch, one process, one intra-op thread;
* ``local_Nthreads``: plain PyTorch, one process, as many threads as Ray Train gets CPUs;
* ``ray_1worker``: Ray Train, one worker (one CPU): the cost of the Ray Data iterator and reporting;
* ``ray_Nworkers``: Ray Train, N workers of one CPU each, DDP (gradients all-reduced over gloo).

Throughput is training rows per second within an epoch (data loading included), averaged over the
epochs after the first (which pays for warm-up); ``wall_s`` is the whole fit, worker start-up
included. ``overhead_ratio`` is plain PyTorch's steady throughput over Ray Train's on the same
number of CPUs (above 1: Ray Train is slower).

Usage::

    python benchmarks/training.py                 # MovieLens 100K when present, else synthetic 'small'
    python benchmarks/training.py --smoke-test    # tiny synthetic world, one minute or two
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.lake import Lake
from training.config import DatasetConfig, TwoTowerConfig, TwoTowerTrainConfig
from training.datasets import build_training_data
from training.pipeline import connect_ray
from training.train_two_tower import (
    TwoTowerJob,
    fit_two_tower,
    fit_two_tower_local,
    positives_to_arrays,
)
from training.two_tower import TwoTowerSizes

RESULTS = Path(__file__).resolve().parent / "results" / "training.json"
MOVIELENS = (
    Path(os.environ.get("RAYREC_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
    / "ml-100k"
)


def fill_lake(home: Path, source: str) -> str:
    lake = Lake(str(home))
    chunks: Iterator[dict[str, pa.Table]]
    if source == "movielens":
        from training.importers import read_movielens

        chunks = read_movielens(MOVIELENS)
    else:
        from training.synthetic import WorldConfig, generate_world

        chunks = generate_world(WorldConfig.preset("tiny" if source == "synthetic-tiny" else "small"))
    for i, chunk in enumerate(chunks):
        for table, rows in chunk.items():
            if rows.num_rows:
                lake.append(table, rows, name=f"bench-{i}")
    return source


def steady(history: list[dict[str, float]]) -> float:
    later = history[1:] or history
    return sum(epoch["samples_per_s"] for epoch in later) / len(later)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke-test", action="store_true")
    parser.add_argument("--source", choices=["movielens", "synthetic-small", "synthetic-tiny"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    source = args.source or (
        "synthetic-tiny" if args.smoke_test else "movielens" if MOVIELENS.exists() else "synthetic-small"
    )
    epochs = 2 if args.smoke_test else args.epochs

    connect_ray(num_cpus=args.workers)
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rayrec-bench-") as home:
        fill_lake(Path(home), source)
        started = time.perf_counter()
        data = build_training_data(Lake(home), DatasetConfig(read_blocks=4, dedupe_partitions=4))
        data_s = time.perf_counter() - started
        arrays = positives_to_arrays(data.positives)
        sizes = TwoTowerSizes.from_vocabularies(data.vocabularies)

        def job(workers: int, threads: int) -> TwoTowerJob:
            train = TwoTowerTrainConfig(
                epochs=epochs, batch_size=args.batch_size, num_workers=workers, torch_threads=threads
            )
            return TwoTowerJob(model=TwoTowerConfig(), train=train, sizes=sizes)

        for name, threads in (("local_1thread", 1), (f"local_{args.workers}threads", args.workers)):
            result = fit_two_tower_local(arrays, job(1, threads))
            runs[name] = {"cpus": threads, "samples_per_s": steady(result.history), "wall_s": result.seconds}
            print(f"{name}: {runs[name]}")
        for name, workers in (("ray_1worker", 1), (f"ray_{args.workers}workers", args.workers)):
            result = fit_two_tower(
                data.positives, job(workers, 1), storage_path=str(Path(home) / "ray_runs"), name=name
            )
            runs[name] = {"cpus": workers, "samples_per_s": steady(result.history), "wall_s": result.seconds}
            print(f"{name}: {runs[name]}")

    n = args.workers
    report = {
        "benchmark": "two-tower training throughput, Ray Train vs plain PyTorch",
        "command": " ".join(["python", "benchmarks/training.py", *sys.argv[1:]]),
        "source": source,
        "rows_per_epoch": len(arrays["log_q"]),
        "epochs": epochs,
        "batch_size": args.batch_size,
        "data_build_s": round(data_s, 2),
        "runs": runs,
        "overhead_ratio_1cpu": runs["local_1thread"]["samples_per_s"] / runs["ray_1worker"]["samples_per_s"],
        f"overhead_ratio_{n}cpu": runs[f"local_{n}threads"]["samples_per_s"]
        / runs[f"ray_{n}workers"]["samples_per_s"],
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_1m": os.getloadavg()[0],
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "note": "shared machine: the load average at the end of the run is recorded beside the figures",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
