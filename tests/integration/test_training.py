"""The offline pipeline end to end on a tiny synthetic world, on a local Ray cluster."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from cluster.cli import main
from core.lake import Lake
from core.settings import Settings
from training.config import TrainConfig
from training.pipeline import TrainingRun, run_training
from training.registry import ModelRegistry
from training.release import load_release
from training.synthetic import WorldConfig, generate_world

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DUPLICATED_EVENTS = 500


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    if started:
        ray.shutdown()


def _world(home: Path) -> dict[str, str]:
    """A tiny world in a fresh lake, plus re-delivered events, an erased user and a removed item."""
    lake = Lake(str(home))
    for i, chunk in enumerate(generate_world(WorldConfig.preset("tiny", seed=11))):
        for table, rows in chunk.items():
            if rows.num_rows:
                lake.append(table, rows, name=f"world-{i}")
    events = lake.read("events")
    # At-least-once delivery: the same events land again in another file.
    lake.append("events", events.slice(0, DUPLICATED_EVENTS), name="redelivered")
    users = lake.read_latest("users")
    items = lake.read_latest("items")
    counts = events.group_by("user_id").aggregate([("event_id", "count")]).sort_by("user_id")
    erased_user = counts.column("user_id")[0].as_py()
    item_counts = events.group_by("item_id").aggregate([("event_id", "count")]).sort_by("item_id")
    removed_item = item_counts.column("item_id")[0].as_py()
    later = pc.max(users.column("updated_at")).as_py() + timedelta(days=1)
    user = users.filter(pc.equal(users.column("user_id"), erased_user))
    lake.append(
        "users",
        user.set_column(user.schema.get_field_index("erased"), "erased", pa.array([True])).set_column(
            user.schema.get_field_index("updated_at"),
            "updated_at",
            pa.array([later], user.schema.field("updated_at").type),
        ),
        name="erasure",
    )
    item = items.filter(pc.equal(items.column("item_id"), removed_item))
    lake.append(
        "items",
        item.set_column(item.schema.get_field_index("status"), "status", pa.array(["removed"])).set_column(
            item.schema.get_field_index("updated_at"),
            "updated_at",
            pa.array([later], item.schema.field("updated_at").type),
        ),
        name="removal",
    )
    kept = events.filter(
        pc.and_(
            pc.not_equal(events.column("user_id"), erased_user),
            pc.not_equal(events.column("item_id"), removed_item),
        )
    )
    return {"erased_user": erased_user, "removed_item": removed_item, "clean_events": str(kept.num_rows)}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    home = tmp_path_factory.mktemp("home")
    return home, _world(home)


@pytest.fixture(scope="module")
def trained(
    ray_session: None, world: tuple[Path, dict[str, str]]
) -> tuple[Path, dict[str, str], TrainingRun, float]:
    home, facts = world
    started = time.perf_counter()
    run = run_training(TrainConfig.smoke_test(), home=str(home))
    return home, facts, run, time.perf_counter() - started


def test_smoke_training_registers_a_bundle_with_metrics(trained) -> None:
    home, facts, run, seconds = trained
    print(f"smoke training took {seconds:.1f} s: {run.timings_s}")
    assert run.bundle is not None
    registry = ModelRegistry(str(home))
    assert [b.version for b in registry.list()] == [run.bundle.version]
    assert registry.resolve("candidate") == run.bundle.version
    manifest = registry.show(run.bundle.version)
    rows = manifest.metrics["evaluation"]["rows"]
    assert {"two_tower", "two_stage", "most_pop", "item_knn", "ease"} <= set(rows)
    assert 0.0 <= rows["two_tower"]["Recall@20"] <= 1.0
    # The tiny catalog is far below the dense limit: the bundle carries EASE and uses it.
    assert manifest.metrics["collaborative"]["shipped"] is True
    assert "cf_ease.npy" in manifest.files
    assert 0.0 < manifest.metrics["candidate_recall@100"] <= 1.0
    interval = manifest.metrics["two_stage_minus_ease_ndcg@10"]
    assert interval["low"] <= interval["mean"] <= interval["high"]
    assert interval["users"] == rows["two_stage"]["users"]
    assert manifest.metrics["index"]["recall_at_100"] == pytest.approx(1.0)
    assert manifest.data.row_counts["clean_events"] == int(facts["clean_events"])
    assert manifest.data.file_counts["events"] > 0 and len(manifest.data.lake_files_sha256) == 64
    assert "user_activity:recent_item_ids" in manifest.feature_set
    assert {"two_tower.pt", "ranker.pt", "items.parquet", "vocabularies.json", "item_embeddings.npy"} <= set(
        manifest.files
    )
    assert any(name.startswith("index/") for name in manifest.files)
    history = manifest.metrics["two_tower"]["history"]
    assert len(history) == TrainConfig.smoke_test().two_tower_train.epochs
    assert all(np.isfinite(epoch["loss"]) for epoch in history)


def test_cleaning_drops_duplicates_erased_users_and_removed_items(trained) -> None:
    _, facts, run, _ = trained
    assert facts["erased_user"] not in run.release.vocabularies.user.values
    assert facts["removed_item"] not in run.release.items.item_ids.tolist()
    assert facts["removed_item"] not in run.release.vocabularies.item.values


def test_release_loads_and_serves(trained) -> None:
    home, _, run, _ = trained
    assert run.bundle is not None
    release = load_release(ModelRegistry(str(home)).load_bundle(run.bundle.version))
    items = release.items.item_ids.tolist()
    user = release.two_tower.user_embedding(items[:3], {"age_group": "25_34"}, user_id="someone-new")
    positions, _ = release.index.search(user[None, :], 10, exclude=[set(items[:3])])
    candidates = release.index.item_ids(positions)[0]
    assert len(candidates) == 10 and not set(candidates) & set(items[:3])
    assert release.ranker is not None
    history = release.two_tower.encode_history([items[:3]])[0]
    scores = release.ranker.score(user, history, release.items.positions(candidates), surface="home")
    assert scores.shape == (10,) and np.isfinite(scores).all()
    assert release.collaborative is not None
    assert release.collaborative.n_items == len(items)
    np.testing.assert_array_equal(release.collaborative.weights, run.release.collaborative.weights)


def test_promote_and_rollback_through_the_cli(trained, capsys, tmp_path: Path) -> None:
    home, _, run, _ = trained
    assert run.bundle is not None
    first = run.bundle.version
    registry = ModelRegistry(str(home))
    # A second release (same files, new version) stands in for a retrained model.
    copy = tmp_path / "copy"
    run.release.save(copy)
    second = registry.register(copy, config={"copy_of": first}).version
    assert main(["models", "promote", first, "--home", str(home)]) == 0
    assert main(["models", "promote", second, "--home", str(home)]) == 0
    assert registry.resolve("production") == second
    assert main(["models", "rollback", "--home", str(home)]) == 0
    assert registry.resolve("production") == first
    assert main(["models", "rollback", "--home", str(home)]) == 2
    assert main(["models", "list", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert f"{first}" in out and "production" in out


def test_erasure_and_opt_out_through_the_api_reach_the_next_training_run(
    ray_session: None, world: tuple[Path, dict[str, str]], redis_settings: Settings
) -> None:
    """``DELETE /api/users/{id}`` and ``PUT .../privacy`` go through the API, the change-log stream
    and the lake writer into the lake; the next run's cleaning step drops the erased user's events
    and the run keeps no profile of that user; the opted-out user's events are dropped the same way
    (and ``features.offline`` keeps no behaviour features of such a user)."""
    from fastapi.testclient import TestClient

    from deployments.api.app import create_app
    from deployments.api.services import ApiServices
    from features.lake_writer import LakeWriter
    from features.metrics import StreamMetrics
    from features.redis_store import RedisStore
    from training.datasets import build_training_data

    home, facts = world
    lake = Lake(str(home))
    before = lake.read_deduped("events")
    counts = (
        before.group_by("user_id")
        .aggregate([("event_id", "count")])
        .sort_by([("event_id_count", "descending"), ("user_id", "ascending")])
    )
    erased, opted_out = [u for u in counts.column("user_id").to_pylist() if u != facts["erased_user"]][:2]
    # Events of the removed item are dropped anyway; the erasure accounts for the rest.
    erased_events = before.filter(
        pc.and_(
            pc.equal(before.column("user_id"), erased),
            pc.not_equal(before.column("item_id"), facts["removed_item"]),
        )
    ).num_rows
    opted_out_events = before.filter(
        pc.and_(
            pc.equal(before.column("user_id"), opted_out),
            pc.not_equal(before.column("item_id"), facts["removed_item"]),
        )
    ).num_rows
    assert erased_events > 0 and opted_out_events > 0

    settings = Settings.from_env(
        None,
        redis_url=redis_settings.redis_url,
        namespace=f"{redis_settings.namespace}-erasure",
        home=str(home),
    )
    services = ApiServices.from_settings(settings)
    try:
        with TestClient(create_app(services)) as client:
            profile = client.put(f"/api/users/{opted_out}", json={"userId": opted_out, "region": "eu"})
            assert profile.status_code == 200, profile.text
            privacy = client.put(f"/api/users/{opted_out}/privacy", json={"personalization": False})
            assert privacy.status_code == 200 and privacy.json()["personalization"] is False, privacy.text
            erasure = client.delete(f"/api/users/{erased}")
            assert erasure.status_code == 204, erasure.text
            assert client.get(f"/api/users/{erased}").status_code == 404
        store = RedisStore.from_settings(settings)
        try:
            LakeWriter(store, lake, "lake-0", metrics=StreamMetrics()).drain()
        finally:
            store.delete_namespace()
            store.close()
    finally:
        services.close()

    users = lake.read_latest("users")
    latest = {row["user_id"]: row for row in users.to_pylist() if row["user_id"] in {erased, opted_out}}
    assert latest[erased]["erased"] is True
    assert latest[opted_out]["personalization"] is False and latest[opted_out]["erased"] is False

    data = build_training_data(lake, TrainConfig.smoke_test().data)
    clean_users = set(data.event_table.column("user_id").to_pylist())
    assert erased not in clean_users and facts["erased_user"] not in clean_users
    assert opted_out not in clean_users
    for user in (erased, opted_out):
        assert user not in set(data.user_table.column("user_id").to_pylist())
        assert user not in data.vocabularies.user.values
    # What was dropped is exactly the two users' events (the earlier erasure stays dropped).
    assert data.row_counts["clean_events"] == int(facts["clean_events"]) - erased_events - opted_out_events
