"""The serving tests' world, with one smoke-sized release trained per test session.

The serving graph, the models-in-the-ingress graph and the fault suite each serve the same tiny
synthetic world (seed 7) from a home and a Redis namespace of their own. Each imports the world
itself (seconds), but training the release takes minutes of Ray Train, so it is trained once, in a
home of its own, and its registry (``artifacts/``: bundles and aliases, no absolute paths) is
copied into each world's home. Seed 7 makes every import the same data the release was trained on.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from uuid import uuid4

import pytest

from core.lake import Lake
from core.schema import utcnow
from core.settings import Settings
from features.catalog import CatalogStore
from features.event_replay import replay_events
from features.online_store import OnlineFeatureStore
from features.redis_store import RedisStore

WORLD_SEED = 7
REPLAYED_EVENTS = 20_000
_trained: dict[str, Path] = {}
"""The session's trained registry; a module-level cache because two conftests share the fixture."""


def import_world(home: Path, store: RedisStore, *, replay: bool = True) -> Lake:
    """The tiny seed-7 world into ``home``'s lake and ``store``'s catalog, newest events replayed."""
    from training.data_import import run_import
    from training.synthetic import World, WorldConfig, build_truth

    lake = Lake(str(home))
    config = WorldConfig.preset("tiny", seed=WORLD_SEED)
    run_import(
        World(config, build_truth(config)).chunks(),
        lake,
        CatalogStore(store),
        source=f"synthetic-{WORLD_SEED}",
        progress=False,
    )
    if replay:
        replay_events(lake, OnlineFeatureStore(store), max_events=REPLAYED_EVENTS, retime_to=utcnow())
    return lake


def busiest_users(lake: Lake, n: int = 40) -> list[str]:
    """The ``n`` users with the most events in the lake, busiest first (ties by id)."""
    counts: dict[str, int] = {}
    for user in lake.read("events", columns=["user_id"]).column("user_id").to_pylist():
        counts[user] = counts.get(user, 0) + 1
    return sorted(counts, key=lambda u: (-counts[u], u))[:n]


def _train(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Path:
    from training.config import TrainConfig
    from training.pipeline import run_training

    home = tmp_path_factory.mktemp("smoke-release")
    namespace = f"smoke-{uuid4().hex[:8]}"
    store = RedisStore.from_settings(Settings.from_env(None, redis_url=redis_url, namespace=namespace))
    try:
        # Only the lake matters to training; the catalog written beside it is dropped below.
        import_world(home, store, replay=False)
        started = time.perf_counter()
        config = TrainConfig.smoke_test(promote_to="production")
        run = run_training(config, home=str(home), log=lambda _: None)
        print(f"\nsmoke training took {time.perf_counter() - started:.0f} s: {run.timings_s}")
        assert run.bundle is not None
    finally:
        store.delete_namespace()
        store.close()
    return home / "artifacts"


def smoke_registry(tmp_path_factory: pytest.TempPathFactory, redis_url: str, home: Path) -> str:
    """Copy the session's release (trained on first use) into ``home``; return its version.

    Needs a local Ray cluster (``ray_cluster``) on first use.
    """
    if "artifacts" not in _trained:
        _trained["artifacts"] = _train(tmp_path_factory, redis_url)
    shutil.copytree(_trained["artifacts"], home / "artifacts")
    from training.registry import ModelRegistry

    version = ModelRegistry(str(home)).resolve("production")
    assert version is not None, "the smoke release was not promoted"
    return version
