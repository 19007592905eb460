"""Experiments reach serving: admin routes, sticky arms, per-arm sources, the log, and the debug route.

The HTTP app and the recommendation service run in-process over real Redis, on a tiny synthetic
world imported into a temporary lake and replayed into the online store (so the Redis-backed
sources such as ``trending`` have real candidates). The model deployments are replaced by a
gateway that serves no release, as a replica without a promoted bundle would.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from core.lake import Lake
from core.schema import utcnow
from core.settings import Settings
from deployments.api.app import create_app
from deployments.api.services import ApiServices
from deployments.recommender.options import ServingOptions
from deployments.recommender.service import RecommendationService
from features.catalog import CatalogStore
from features.event_replay import replay_events
from features.experiment_store import load_experiments, save_experiments, update_experiments
from features.metrics import StreamMetrics
from features.online_store import OnlineFeatureStore
from features.redis_store import RedisStore
from features.stream_codec import decode_log_entry
from policies.experiments import Arm, ExperimentConfig, ExperimentRegistry, Layer
from policies.surfaces import DEFAULT_SURFACES_PATH
from tests.integration.no_models import NoModels
from tests.integration.streams import stream_entries

pytestmark = pytest.mark.integration

TOKEN = "experiments-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
REFRESH_S = 0.2
WIDEN = 20.0
USERS: list[str] = []
"""The world's most active users, filled in by the ``world`` fixture."""


def _experiment(arms: list[dict[str, Any]], *, exp_id: str = "trend-only") -> dict[str, Any]:
    return {
        "experiment": {"id": exp_id, "salt": f"{exp_id}-salt", "layer": "sources", "arms": arms},
        "buckets": {"start": 0, "end": 10_000},
    }


TWO_ARMS = [
    {"name": "control", "share": 0.5},
    {"name": "trending_only", "share": 0.5, "overrides": {"sources": ["trending"]}},
]


def _wide_surfaces(path: Path) -> Path:
    # Budgets widened as in the serving-graph tests: the shared machine must not turn a slow
    # moment into a fallback list, whose items come from the popular list and not from the arm.
    raw = yaml.safe_load(DEFAULT_SURFACES_PATH.read_text())
    for body in raw["surfaces"].values():
        body["budgets"] = {
            "candidates_ms": 30 * WIDEN,
            "features_ms": 30 * WIDEN,
            "ranking_ms": 30 * WIDEN,
            "rerank_ms": 10 * WIDEN,
            "total_ms": 100 * WIDEN,
        }
        for source in body["sources"]:
            source["budget_ms"] = source.get("budget_ms", 20) * WIDEN
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def world(redis_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    from training.data_import import run_import
    from training.synthetic import World, WorldConfig, build_truth

    home: Path = tmp_path_factory.mktemp("experiments-home")
    settings = redis_settings.replace(namespace=f"{redis_settings.namespace}-ex", admin_token=TOKEN)
    store = RedisStore.from_settings(settings)
    store.delete_namespace()
    lake = Lake(str(home))
    config = WorldConfig.preset("tiny", seed=11)
    run_import(
        World(config, build_truth(config)).chunks(),
        lake,
        CatalogStore(store),
        source="syn-11",
        progress=False,
    )
    replay_events(lake, OnlineFeatureStore(store), max_events=20_000, retime_to=utcnow())
    counts = Counter(lake.read("events", columns=["user_id"]).column("user_id").to_pylist())
    USERS[:] = sorted(counts, key=lambda u: (-counts[u], u))[:60]
    _wide_surfaces(home / "surfaces.yaml")
    try:
        yield settings.replace(home=str(home))
    finally:
        store.delete_namespace()
        store.close()


@pytest.fixture
def client(world: Settings) -> Iterator[TestClient]:
    services = ApiServices.from_settings(world)
    services.store.client.delete(services.store.keys.experiments())
    surfaces = Path(world.home) / "surfaces.yaml"
    options = ServingOptions(
        experiments_refresh_s=REFRESH_S,
        surfaces_path=str(surfaces),
        user_read_ms=15 * WIDEN,
        fallback_read_ms=10 * WIDEN,
    )
    services.recommendations = RecommendationService(services.store, NoModels(), options)
    with TestClient(
        create_app(services, stream_metrics=StreamMetrics()), raise_server_exceptions=False
    ) as test:
        yield test
    services.store.client.delete(services.store.keys.experiments())
    services.close()


def _recommend(client: TestClient, user: str, **params: Any) -> dict[str, Any]:
    response = client.get("/api/recommendations", params={"userId": user, "surface": "home", **params})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _wait_for_refresh() -> None:
    # Serving re-reads the configuration every REFRESH_S; three periods leave room for a slow read.
    threading.Event().wait(3 * REFRESH_S)


def test_store_round_trip_and_concurrent_updates_keep_every_change(store: RedisStore) -> None:
    assert load_experiments(store).snapshot.experiments == ()
    registry = ExperimentRegistry()
    registry.add_layer(Layer(name="ranking", salt="ranking-salt"))
    save_experiments(store, registry)
    assert load_experiments(store).snapshot == registry.snapshot

    def register(n: int) -> None:
        config = ExperimentConfig(
            id=f"e{n}",
            salt=f"e{n}-salt",
            layer="ranking",
            arms=(Arm(name="a", share=0.5), Arm(name="b", share=0.5)),
        )
        update_experiments(store, lambda r: r.register(config, buckets=(n * 100, n * 100 + 100)))

    threads = [threading.Thread(target=register, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stored = load_experiments(store).snapshot
    assert sorted(e.id for e in stored.experiments) == [f"e{n}" for n in range(8)]
    assert len(stored.layer("ranking").allocations) == 8
    assert stored.version == 9


def test_admin_routes_need_the_token_and_refuse_bad_configs(client: TestClient) -> None:
    assert client.get("/api/admin/experiments").status_code == 401
    bad_token = {"Authorization": "Bearer nope"}
    assert client.get("/api/admin/experiments", headers=bad_token).status_code == 403

    one_arm = client.post(
        "/api/admin/experiments", json=_experiment([{"name": "a", "share": 1.0}]), headers=ADMIN
    )
    assert one_arm.status_code == 422
    assert [f["field"] for f in one_arm.json()["fields"]] == ["experiment.arms"]

    bundle = [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5, "overrides": {"bundle_version": "v7"}}]
    refused = client.post("/api/admin/experiments", json=_experiment(bundle), headers=ADMIN)
    assert refused.status_code == 422
    assert refused.json()["fields"][0]["field"] == "experiment.arms.1.overrides.bundle_version"

    unknown = [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5, "overrides": {"sources": ["nope"]}}]
    refused = client.post("/api/admin/experiments", json=_experiment(unknown), headers=ADMIN)
    assert refused.status_code == 422
    assert refused.json()["fields"][0]["field"] == "experiment.arms.1.overrides.sources"

    assert client.post("/api/admin/experiments", json=_experiment(TWO_ARMS), headers=ADMIN).status_code == 201
    again = client.post("/api/admin/experiments", json=_experiment(TWO_ARMS), headers=ADMIN)
    assert again.status_code == 409 and again.json()["error"] == "conflict"
    overlap = _experiment(TWO_ARMS, exp_id="other")
    overlap["buckets"] = {"start": 5_000, "end": 6_000}
    clash = client.post("/api/admin/experiments", json=overlap, headers=ADMIN)
    assert clash.status_code == 409 and "overlap" in clash.json()["message"]
    assert client.post("/api/admin/experiments/missing/start", headers=ADMIN).status_code == 404
    assert client.post("/api/admin/experiments/missing/stop", headers=ADMIN).status_code == 404

    listed = client.get("/api/admin/experiments", headers=ADMIN).json()
    (only,) = listed["experiments"]
    assert only["id"] == "trend-only" and only["status"] == "stopped" and only["active"] is False
    assert only["buckets"] == {"start": 0, "end": 10_000}


def test_arms_are_sticky_logged_and_change_the_sources(client: TestClient, world: Settings) -> None:
    for user in USERS[:5]:
        body = _recommend(client, user)
        assert body["experiment"] is None and body["arm"] is None

    assert client.post("/api/admin/experiments", json=_experiment(TWO_ARMS), headers=ADMIN).status_code == 201
    started = client.post("/api/admin/experiments/trend-only/start", headers=ADMIN)
    assert started.status_code == 200
    assert started.json()["experiments"][0]["active"] is True
    _wait_for_refresh()

    first = {user: _recommend(client, user) for user in USERS}
    arms = {user: body["arm"] for user, body in first.items()}
    assert all(body["experiment"] == "trend-only" for body in first.values())
    assert set(arms.values()) == {"control", "trending_only"}
    for user in USERS[:20]:
        assert _recommend(client, user)["arm"] == arms[user]

    restricted = [b for b in first.values() if b["arm"] == "trending_only"]
    control = [b for b in first.values() if b["arm"] == "control"]
    assert all(b["fallback"] is None and b["items"] for b in restricted), [
        (b["fallback"], len(b["items"])) for b in restricted
    ]
    assert all(i["sources"] == ["trending"] for b in restricted for i in b["items"])
    control_sources = {s for b in control for i in b["items"] for s in i["sources"]}
    assert control_sources - {"trending"}, control_sources

    store = RedisStore.from_settings(world)
    try:
        request_arms = {b["requestId"]: b["arm"] for b in first.values()}
        logged: dict[str, Any] = {}
        for _ in range(50):
            entries = [decode_log_entry(f) for _, f in stream_entries(store, store.keys.stream_impressions())]
            logged = {e.request_id: e for e in entries if e.request_id in request_arms}
            if len(logged) == len(request_arms):
                break
            threading.Event().wait(0.1)
        assert len(logged) == len(request_arms)
        for request_id, entry in logged.items():
            assert entry.experiment_id == "trend-only" and entry.arm == request_arms[request_id]
            assert [(x.experiment_id, x.arm) for x in entry.experiments] == [("trend-only", entry.arm)]
    finally:
        store.close()

    assert client.post("/api/admin/experiments/trend-only/stop", headers=ADMIN).status_code == 200
    _wait_for_refresh()
    for user in USERS[:10]:
        body = _recommend(client, user)
        assert body["experiment"] is None and body["arm"] is None


def test_anonymous_requests_get_no_arm(client: TestClient) -> None:
    assert client.post("/api/admin/experiments", json=_experiment(TWO_ARMS), headers=ADMIN).status_code == 201
    assert client.post("/api/admin/experiments/trend-only/start", headers=ADMIN).status_code == 200
    _wait_for_refresh()
    seed = _recommend(client, USERS[0])["items"][0]["itemId"]
    response = client.get(f"/api/items/{seed}/similar")
    assert response.status_code == 200, response.text
    assert response.json()["experiment"] is None and response.json()["arm"] is None


def test_debug_route_explains_stages_removals_and_arm(client: TestClient) -> None:
    user = USERS[3]
    plain = _recommend(client, user)
    hidden = plain["items"][0]["itemId"]
    feedback = {"userId": user, "itemId": hidden, "eventType": "hide"}
    assert client.post("/api/events", json=feedback).status_code == 202

    assert client.get("/api/admin/debug/recommendations", params={"userId": user}).status_code == 401
    response = client.get(
        "/api/admin/debug/recommendations", params={"userId": user, "limit": 10}, headers=ADMIN
    )
    assert response.status_code == 200, response.text
    body = response.json()
    kinds = [s["stage"] for s in body["stages"]]
    assert "source" in kinds and "merge" in kinds and "filter" in kinds and "policy" in kinds
    assert kinds.index("merge") < kinds.index("filter") < kinds.index("policy")
    assert hidden in body["removedByFilter"]["exclusion"]
    exclusion = next(s for s in body["stages"] if s["stage"] == "filter" and s["name"] == "exclusion")
    assert hidden in exclusion["removed"]
    assert body["skippedSources"] == {} and body["error"] is None
    items = body["items"]
    assert len(items) == 10 and [i["position"] for i in items] == list(range(10))
    assert hidden not in {i["itemId"] for i in items}
    normal_keys = set(plain["items"][0])
    assert normal_keys <= set(items[0])
    assert all(i["reason"] and 0 < i["propensity"] <= 1 and i["sources"] for i in items)
    assert body["experiments"] == [] and body["overrides"]["params"] == {}

    assert client.post("/api/admin/experiments", json=_experiment(TWO_ARMS), headers=ADMIN).status_code == 201
    assert client.post("/api/admin/experiments/trend-only/start", headers=ADMIN).status_code == 200
    _wait_for_refresh()
    arm_user = next(u for u in USERS if _recommend(client, u)["arm"] == "trending_only")
    explained = client.get(
        "/api/admin/debug/recommendations", params={"userId": arm_user}, headers=ADMIN
    ).json()
    assert explained["experiments"][0]["arm"] == "trending_only"
    assert explained["overrides"]["params"] == {"sources": "trending"}
    assert explained["overrides"]["applied"] == {"sources": "trending"}
    assert explained["sources"] == ["trending"]
    assert {s["name"] for s in explained["stages"] if s["stage"] == "source"} == {"trending"}


def test_a_failed_refresh_keeps_the_last_configuration(world: Settings) -> None:
    store = RedisStore.from_settings(world)
    try:
        registry = ExperimentRegistry()
        registry.add_layer(Layer(name="sources", salt="sources-salt"))
        save_experiments(store, registry)
        service = RecommendationService(store, NoModels(), ServingOptions())

        async def refresh_twice() -> tuple[int, int]:
            await service._refresh_experiments()
            before = service.experiments.version
            store.client.set(store.keys.experiments(), "{not json")
            await service._refresh_experiments()
            return before, service.experiments.version

        before, after = asyncio.run(refresh_twice())
        assert before == after == 1
    finally:
        store.client.delete(store.keys.experiments())
        store.close()
