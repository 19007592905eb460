"""The online serving graph on Ray Serve, end to end, over real HTTP, Redis and a trained bundle.

One module-scoped world: a tiny synthetic world imported into a temporary lake and a test
namespace, its newest events replayed into the online store, the session's smoke-sized release
(``smoke_release``: trained once, promoted to ``production``) copied into its registry (and the
same release registered again as a second version, for the promotion and rollback test), and the
Serve application deployed from
``ray_config.yaml`` on a free loopback port.

The surfaces are the shipped ones with budgets widened twenty-fold: the shared test machine must
not turn a slow moment into a fallback the assertions do not expect. ``home_tight`` gives the
``trending`` source a budget no Redis round trip meets, for the slow-source test.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient

from core.lake import Lake
from core.schema import EntityType, ItemStatus
from core.settings import Settings
from core.types import FeatureMap
from features.catalog_changes import CatalogChanges
from features.online_store import OnlineFeatureStore
from features.redis_store import RedisStore
from features.stream_codec import decode_log_entry
from features.user_context import recent_events
from policies.surfaces import DEFAULT_SURFACES_PATH
from tests.integration.ray_session import ray_cluster
from tests.integration.smoke_release import busiest_users, import_world, smoke_registry
from tests.integration.streams import stream_entries
from training.registry import ModelRegistry
from training.release import load_release

pytestmark = [pytest.mark.integration, pytest.mark.slow]
__all__ = ["ray_cluster"]

APP = "rayrec-serving-test"
ADMIN_TOKEN = "serving-graph-test-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
WIDEN = 20.0
SOURCE = "recently_viewed_related"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _test_surfaces(path: Path) -> Path:
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
    tight = yaml.safe_load(yaml.safe_dump(raw["surfaces"]["home"]))
    for source in tight["sources"]:
        if source["name"] == "trending":
            source["budget_ms"] = 0.001
    raw["surfaces"]["home_tight"] = tight
    path.write_text(yaml.safe_dump(raw))
    return path


@dataclass
class Graph:
    url: str
    home: Path
    settings: Settings
    store: RedisStore
    versions: list[str]
    users: list[str]
    seen: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def graph(
    ray_cluster: None, redis_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Graph]:
    yield from serving_graph(redis_settings, tmp_path_factory, app=APP, suffix="-sg")


def serving_graph(
    redis_settings: Settings,
    tmp_path_factory: pytest.TempPathFactory,
    *,
    app: str,
    suffix: str,
    args: dict[str, Any] | None = None,
) -> Iterator[Graph]:
    """Build the world, install the release, deploy ``app`` with ``args`` over ours; yield; tear down."""
    from ray import serve

    from deployments.reload import deploy, serve_config

    home = tmp_path_factory.mktemp("serving-home")
    settings = Settings.from_env(
        None,
        redis_url=redis_settings.redis_url,
        namespace=f"{redis_settings.namespace}{suffix}",
        home=str(home),
    )
    store = RedisStore.from_settings(settings)
    store.delete_namespace()
    lake = import_world(home, store)
    version = smoke_registry(tmp_path_factory, redis_settings.redis_url, home)
    registry = ModelRegistry(str(home))
    with tempfile.TemporaryDirectory() as staging:
        load_release(registry.load_bundle(version)).save(staging)
        second = registry.register(staging, config={"description": "the same release, registered again"})

    users = busiest_users(lake)

    port = _free_port()
    app_args = {
        "home": str(home),
        "namespace": settings.namespace,
        "redis_url": settings.redis_url,
        "serving": {
            "surfaces_path": str(_test_surfaces(home / "surfaces.yaml")),
            # Three failures open it whatever came before: the traffic here is light and
            # the ratio rule is the unit tests' business.
            "breaker": {"failure_threshold": 3, "failure_ratio": 0.01, "window_s": 30, "cooldown_s": 1.0},
            "user_read_ms": 15 * WIDEN,
            "fallback_read_ms": 10 * WIDEN,
            "sponsored": {
                "campaigns": [{"campaign_id": "camp-1", "item_ids": ["i1", "i2", "i3"], "bid": 2.0}],
            },
        },
        **(args or {}),
    }
    deploy(
        serve_config(
            app, app_args, host="127.0.0.1", port=port, env_vars={"RAYREC_ADMIN_TOKEN": ADMIN_TOKEN}
        ),
        timeout_s=600,
    )
    graph = Graph(f"http://127.0.0.1:{port}", home, settings, store, [version, second.version], users)
    try:
        yield graph
    finally:
        serve.delete(app)
        serve.shutdown()  # type: ignore[no-untyped-call]
        store.delete_namespace()
        store.close()


def get(graph: Graph, path: str, **params: Any) -> httpx.Response:
    with httpx.Client(base_url=graph.url, timeout=60) as client:
        return client.get(path, params=params)


def recommend(
    graph: Graph, user: str, surface: str = "home", limit: int = 20, **params: Any
) -> dict[str, Any]:
    response = get(graph, "/api/recommendations", userId=user, surface=surface, limit=limit, **params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _is_whole(body: dict[str, Any]) -> bool:
    """No fallback, no skipped source; the debug route's account also no error."""
    if "fallbacks" in body:
        return not body["error"] and not body["fallbacks"] and not body["skippedSources"]
    return body["fallback"] is None and not body["skippedSources"]


def whole(graph: Graph, path: str, headers: dict[str, str] | None = None, **params: Any) -> dict[str, Any]:
    """An answer of ``path`` served by the whole pipeline: no fallback, no skipped source.

    Tests of what the pipeline computes read such an answer. On a loaded machine a stage can miss
    its budget and the answer degrades, as designed; the degraded paths have tests of their own.
    """
    answers: list[dict[str, Any]] = []

    def served_whole() -> dict[str, Any] | None:
        with httpx.Client(base_url=graph.url, timeout=60) as client:
            response = client.get(path, params=params, headers=headers)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        answers.append(body)
        return body if _is_whole(body) else None

    try:
        answer: dict[str, Any] = until(served_whole, 60, f"a whole answer of {path}")
    except AssertionError as e:
        seen = [(a.get("fallback", a.get("fallbacks")), a["skippedSources"]) for a in answers[-5:]]
        raise AssertionError(f"{e}; the last answers degraded as {seen}") from None
    return answer


def explain(graph: Graph, user: str, surface: str = "home", limit: int = 20) -> dict[str, Any]:
    """The admin debug route's stage-by-stage account of one request, run whole."""
    return whole(
        graph, "/api/admin/debug/recommendations", headers=ADMIN, userId=user, surface=surface, limit=limit
    )


def stage_candidates(explained: dict[str, Any], stage: str) -> list[dict[str, Any]]:
    """The candidates one stage of an explained request produced."""
    [found] = [s for s in explained["stages"] if s["name"] == stage]
    candidates: list[dict[str, Any]] = found["candidates"]
    return candidates


def online_user(graph: Graph, user: str) -> FeatureMap:
    """The user's online features as the stream processor left them."""
    [features] = OnlineFeatureStore(graph.store).get_features(EntityType.USER, [user])
    return features


def admin_status(graph: Graph) -> dict[str, Any]:
    with httpx.Client(base_url=graph.url, timeout=60) as client:
        response = client.get("/api/admin/serving", headers=ADMIN)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def set_fault(deployment: str, fault: str | None, delay_ms: float = 500.0) -> None:
    from deployments.reload import update_user_configs, wait_running

    update_user_configs(APP, {deployment: {"fault": fault, "fault_delay_ms": delay_ms}})
    wait_running(APP, timeout_s=120)


def until(predicate: Any, timeout_s: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"{what} did not happen within {timeout_s:.0f} s")


# --- the request and its answer ---------------------------------------------------------------


def test_seed_request_returns_limit_items_with_reasons(graph: Graph) -> None:
    user = graph.users[0]
    body = recommend(graph, user, "home", 20)
    assert set(body) == {
        "requestId",
        "surface",
        "modelVersion",
        "experiment",
        "arm",
        "fallback",
        "skippedSources",
        "items",
    }
    assert body["surface"] == "home" and body["modelVersion"] == graph.versions[0]
    assert body["fallback"] is None and body["experiment"] is None and body["arm"] is None
    assert len(body["items"]) == 20
    assert len({i["itemId"] for i in body["items"]}) == 20
    for position, item in enumerate(body["items"]):
        assert set(item) == {"itemId", "score", "reason", "position", "sources", "propensity"}
        assert item["reason"] and item["sources"] and item["position"] == position
        assert 0.0 < item["propensity"] <= 1.0
    graph.seen["home"] = body


@pytest.mark.parametrize(
    ("params", "field_name"),
    [
        ({"userId": "u1", "limit": 0}, "limit"),
        ({"userId": "u1", "limit": 101}, "limit"),
        ({"userId": "u1", "surface": "nowhere"}, "surface"),
        ({"surface": "home"}, "userId"),
        ({"userId": "u1", "surface": "similar"}, "itemId"),
        ({"userId": "u1", "device": "toaster"}, "device"),
    ],
)
def test_refusals_name_the_field(graph: Graph, params: dict[str, Any], field_name: str) -> None:
    response = get(graph, "/api/recommendations", **params)
    assert response.status_code == 422, response.text
    assert [f["field"] for f in response.json()["fields"]] == [field_name]


def test_every_source_contributes_across_users(graph: Graph) -> None:
    sources: set[str] = set()
    for user in graph.users[:12]:
        body = whole(graph, "/api/recommendations", userId=user, surface="home", limit=100)
        sources.update(s for item in body["items"] for s in item["sources"])
    item = graph.seen["home"]["items"][0]["itemId"]
    body = whole(graph, f"/api/items/{item}/similar", userId=graph.users[1], limit=10)
    assert body["surface"] == "similar" and len(body["items"]) == 10
    assert item not in {i["itemId"] for i in body["items"]}
    sources.update(s for i in body["items"] for s in i["sources"])
    graph.seen["similar"] = (graph.users[1], item, body)
    expected = {
        "two_tower_ann",
        "item_to_item",
        "recently_viewed_related",
        "content",
        "social",
        "trending",
        "popular",
        "sponsored",
        "similar_items",
    }
    assert expected <= sources, expected - sources


def test_every_served_list_is_logged(graph: Graph) -> None:
    served = graph.seen["home"]

    def logged() -> Any:
        entries = [
            decode_log_entry(f) for _, f in stream_entries(graph.store, graph.store.keys.stream_impressions())
        ]
        return next((e for e in entries if e.request_id == served["requestId"]), None)

    entry = until(logged, 30, "the log entry of the seed request")
    assert entry.surface == "home" and entry.model_version == graph.versions[0]
    assert [i.item_id for i in entry.items] == [i["itemId"] for i in served["items"]]
    assert [i.position for i in entry.items] == list(range(20))
    assert [i.sources for i in entry.items] == [i["sources"] for i in served["items"]]
    assert [i.propensity for i in entry.items] == pytest.approx([i["propensity"] for i in served["items"]])
    assert entry.fallback is None

    lake = Lake(str(graph.home))

    def in_lake() -> Any:
        if not lake.count("impressions"):
            return None
        rows = lake.read("impressions").to_pylist()
        return [r for r in rows if r["request_id"] == served["requestId"]] or None

    rows = until(in_lake, 90, "the lake writer writing the impressions")
    assert sorted(r["position"] for r in rows) == list(range(20))


# --- freshness ---------------------------------------------------------------------------------


def test_a_like_changes_the_next_request(graph: Graph) -> None:
    release = load_release(ModelRegistry(str(graph.home)).load_bundle(graph.versions[0]))
    user = graph.users[5]
    related_before = {c["itemId"] for c in stage_candidates(explain(graph, user, "home", 100), SOURCE)}
    history = {e.item_id for e in recent_events(online_user(graph, user))}
    # An item with neighbours in the item-item table, none of which the source offers yet.
    liked = next(
        item
        for item in release.items.item_ids.tolist()
        if len(release.item_similarity.neighbors(item)) >= 5
        and not related_before & {n for n, _ in release.item_similarity.neighbors(item)}
        and item not in history
    )
    neighbours = {n for n, _ in release.item_similarity.neighbors(liked)}
    with httpx.Client(base_url=graph.url, timeout=60) as client:
        sent = client.post("/api/events", json={"userId": user, "itemId": liked, "eventType": "like"})
    assert sent.status_code == 202, sent.text

    def applied() -> bool:
        return liked in online_user(graph, user).get_strings("user_activity:recent_item_ids", ())

    until(applied, 60, "the stream processor applying the like")
    # The candidates, not the served list: whether a neighbour also wins one of the 100 slots
    # depends on the ranker's scores and the exploration draw, which this test does not pin.
    explained = explain(graph, user, "home", 100)
    after = stage_candidates(explained, SOURCE)
    related = [c for c in after if c["itemId"] in neighbours]
    assert related, f"no neighbour of {liked} ({sorted(neighbours)}) in {[c['itemId'] for c in after]}"
    assert all(c["reason"].startswith("Because you liked") for c in related), related
    merged = {c["itemId"]: c for c in stage_candidates(explained, "merge")}
    assert all(SOURCE in merged[c["itemId"]]["sources"] for c in related)


def test_removed_blocked_and_not_interested_hold_on_the_next_request(graph: Graph) -> None:
    user = graph.users[2]
    first = recommend(graph, user, "home", 30)
    ids = [i["itemId"] for i in first["items"] if "sponsored" not in i["sources"]]
    removed, blocked, hidden = ids[0], ids[1], ids[2]
    changes = CatalogChanges(graph.store)
    changes.set_item_status(removed, ItemStatus.REMOVED)
    changes.block_item(blocked, True)
    with httpx.Client(base_url=graph.url, timeout=60) as client:
        feedback = client.post(
            "/api/recommendations/feedback",
            json={"userId": user, "itemId": hidden, "feedback": "not_interested"},
        )
    assert feedback.status_code == 202, feedback.text
    second = recommend(graph, user, "home", 30)
    assert not {removed, blocked, hidden} & {i["itemId"] for i in second["items"]}
    assert len(second["items"]) == 30
    changes.set_item_status(removed, ItemStatus.ACTIVE)
    changes.block_item(blocked, False)


def test_a_user_who_opted_out_gets_only_non_personal_sources(graph: Graph) -> None:
    user = graph.users[3]
    changes = CatalogChanges(graph.store)
    changes.set_personalization(user, False)
    try:
        body = recommend(graph, user, "home", 30)
    finally:
        changes.set_personalization(user, True)
    personal = {"two_tower_ann", "item_to_item", "recently_viewed_related", "content", "social"}
    assert not personal & {s for i in body["items"] for s in i["sources"]}
    assert len(body["items"]) == 30


def test_a_new_item_is_retrievable_at_once(graph: Graph) -> None:
    from core.schema import Item, ItemType

    CatalogChanges(graph.store).put_item(
        Item(
            item_id="brand-new-1",
            item_type=ItemType.VIDEO,
            title="Brand new",
            category="cat-0",
            creator_id="cr-new",
        )
    )

    def added() -> bool:
        return int(admin_status(graph)["models"]["retrieval"]["deltaItems"]) >= 1

    until(added, 30, "the new item reaching the delta index")


# --- faults and fallbacks ------------------------------------------------------------------------


def test_a_slow_source_is_skipped(graph: Graph) -> None:
    body = recommend(graph, graph.users[0], "home_tight", 20)
    assert body["skippedSources"] == {"trending": "timeout"}
    assert body["fallback"] is None and len(body["items"]) == 20
    assert "trending" not in {s for i in body["items"] for s in i["sources"]}


def breakers(graph: Graph, calls: int = 6) -> list[dict[str, Any]]:
    """The ranker breakers of the ingress replicas the status calls reached."""
    return [admin_status(graph)["rankerBreaker"] for _ in range(calls)]


def test_ranker_failure_and_lateness_serve_the_pre_score_order_behind_a_breaker(graph: Graph) -> None:
    user = graph.users[4]
    try:
        set_fault("ranker", "raise")
        until(lambda: recommend(graph, user)["fallback"] == "ranker_prescore", 60, "the raise drill")
        for _ in range(4):
            body = recommend(graph, user)
            assert body["fallback"] == "ranker_prescore" and len(body["items"]) == 20

        def opened() -> bool:
            # Each ingress replica has its own breaker; requests go on until one has opened.
            body = recommend(graph, user)
            assert body["fallback"] == "ranker_prescore" and len(body["items"]) == 20
            return any(b["openedTotal"] >= 1 for b in breakers(graph))

        until(opened, 60, "a breaker opening")

        slow_ms = 5 * 30 * WIDEN  # far past the ranking budget
        set_fault("ranker", "slow", slow_ms)
        time.sleep(1.5)  # the breaker's cool-down: the next call is a probe that times out
        for _ in range(3):
            started = time.perf_counter()
            body = recommend(graph, user)
            elapsed_ms = (time.perf_counter() - started) * 1000
            assert body["fallback"] == "ranker_prescore" and len(body["items"]) == 20
            assert elapsed_ms < slow_ms
    finally:
        set_fault("ranker", None)
    until(lambda: recommend(graph, user)["fallback"] is None, 60, "the ranker coming back")

    def closed() -> bool:
        recommend(graph, user)
        return all(b["state"] == "closed" for b in breakers(graph))

    until(closed, 60, "every breaker closing")


def test_a_failed_pipeline_serves_the_cached_list_then_popular(graph: Graph) -> None:
    user, item, before = graph.seen["similar"]
    try:
        set_fault("retrieval", "raise")

        def cached() -> Any:
            response = get(graph, f"/api/items/{item}/similar", userId=user, limit=10)
            assert response.status_code == 200, response.text
            body = response.json()
            return body if body["fallback"] == "cached_list" else None

        # A "not interested" after the list was served holds on the cached list too.
        hidden = before["items"][0]["itemId"]
        with httpx.Client(base_url=graph.url, timeout=60) as client:
            sent = client.post(
                "/api/recommendations/feedback",
                json={"userId": user, "itemId": hidden, "feedback": "not_interested"},
            )
        assert sent.status_code == 202, sent.text
        body = until(cached, 60, "the cached list")
        assert [i["itemId"] for i in body["items"]] == [i["itemId"] for i in before["items"][1:]]
        fresh = get(
            graph,
            f"/api/items/{graph.seen['home']['items'][5]['itemId']}/similar",
            userId="u-nobody",
            limit=10,
        )
        assert fresh.status_code == 200 and fresh.json()["fallback"] == "popular"
        assert len(fresh.json()["items"]) == 10
        # A home request still serves: the model-backed sources fail open there.
        home = recommend(graph, user, "home", 20)
        assert set(home["skippedSources"]) >= {"two_tower_ann", "item_to_item"}
    finally:
        set_fault("retrieval", None)


def test_an_unreachable_store_serves_popular(graph: Graph) -> None:
    from ray import serve

    from deployments.api.app import create_app
    from deployments.api.services import ApiServices
    from deployments.model_gateway import HandleGateway
    from deployments.recommender.options import ServingOptions
    from deployments.recommender.service import RecommendationService

    dead = graph.settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0", "redis_timeout_s": 0.2})
    services = ApiServices.from_settings(dead)
    gateway = HandleGateway(
        serve.get_deployment_handle("retrieval", APP), serve.get_deployment_handle("ranker", APP)
    )
    service = RecommendationService(services.store, gateway, ServingOptions())
    services.recommendations = service
    with TestClient(create_app(services)) as client:
        response = client.get("/api/recommendations", params={"userId": graph.users[0], "limit": 10})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["fallback"] == "popular" and len(body["items"]) == 10
        assert all(i["sources"] == ["popular"] for i in body["items"])

        async def drained() -> None:
            await asyncio.sleep(0.3)

        client.portal.call(drained)  # type: ignore[union-attr]
    dropped = service.metrics.registry.get_sample_value(
        "rayrec_recommendation_log_entries_total", {"outcome": "dropped"}
    )
    assert dropped is not None and dropped >= 1
    services.close()


# --- models: promotion, rollback, a broken bundle ---------------------------------------------------


@contextmanager
def traffic(graph: Graph) -> Iterator[tuple[list[int], list[str]]]:
    """Requests one after another from a thread while the block runs.

    Yields:
        The statuses of the answers and the model versions of the ``200`` ones, as they come.
    """
    statuses: list[int] = []
    versions: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=graph.url, timeout=60) as client:
            n = 0
            while not stop.is_set():
                response = client.get(
                    "/api/recommendations", params={"userId": graph.users[n % 10], "limit": 20}
                )
                statuses.append(response.status_code)
                if response.status_code == 200:
                    versions.append(response.json()["modelVersion"])
                n += 1

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        until(lambda: len(versions) >= 10, 60, "traffic before the change")
        yield statuses, versions
    finally:
        stop.set()
        worker.join(timeout=60)


def promote_then_roll_back(graph: Graph, app: str, versions: list[str]) -> None:
    """Promote the second version and apply it, then roll back and apply; each seen serving."""
    from deployments.reload import apply_bundle

    v1, v2 = graph.versions
    registry = ModelRegistry(str(graph.home))
    registry.promote(v2, "production")
    assert apply_bundle(app, "production") == v2
    served = len(versions)
    until(lambda: len(versions) >= served + 10 and versions[-1] == v2, 60, "traffic on v2")
    registry.rollback("production")
    assert apply_bundle(app, "production") == v1
    served = len(versions)
    until(lambda: len(versions) >= served + 10 and versions[-1] == v1, 60, "traffic on v1 again")


def test_promotion_and_rollback_serve_without_errors(graph: Graph) -> None:
    from deployments.reload import BundleLoadError, apply_bundle

    v1, v2 = graph.versions
    registry = ModelRegistry(str(graph.home))
    with traffic(graph) as (statuses, versions):
        promote_then_roll_back(graph, APP, versions)

        broken_dir = Path(tempfile.mkdtemp())
        try:
            for path in (graph.home / "artifacts" / "bundles" / v1).iterdir():
                if path.is_dir():
                    shutil.copytree(path, broken_dir / path.name)
                elif path.name != "manifest.json":
                    shutil.copy(path, broken_dir / path.name)
            broken = registry.register(broken_dir, config={"description": "to be corrupted"})
        finally:
            shutil.rmtree(broken_dir)
        weights = graph.home / "artifacts" / "bundles" / broken.version / "ranker.pt"
        weights.write_bytes(weights.read_bytes()[:-16] + b"\0" * 16)
        with pytest.raises(BundleLoadError):
            apply_bundle(APP, broken.version, timeout_s=120)
        served = len(versions)
        until(lambda: len(versions) >= served + 10, 60, "traffic after the broken bundle")
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    assert {v1, v2} <= set(versions)
    assert versions[-1] == v1, "a broken bundle must leave the previous one serving"
    print(f"\n{len(statuses)} requests during promotion, rollback and a broken bundle: all 200")


# --- latency -------------------------------------------------------------------------------------


def test_latency_per_stage_and_hop_cost(graph: Graph) -> None:
    from ray import serve

    handle = serve.get_deployment_handle("retrieval", APP)
    for _ in range(5):
        handle.ping.remote().result()
    hops = []
    for _ in range(50):
        started = time.perf_counter()
        handle.ping.remote().result()
        hops.append((time.perf_counter() - started) * 1000)
    walls = []
    with httpx.Client(base_url=graph.url, timeout=60) as client:
        for n in range(60):
            started = time.perf_counter()
            response = client.get("/api/recommendations", params={"userId": graph.users[n % 20], "limit": 20})
            walls.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200
    latency = admin_status(graph)["latencyMs"]
    print(f"\nhop to a deployment from the driver (empty call): p50 {statistics.median(hops):.2f} ms")
    print(f"HTTP round trip of GET /api/recommendations: p50 {statistics.median(walls):.1f} ms")
    for series, values in latency.items():
        print(
            f"  {series:<32} p50 {values['p50']:7.2f} ms  p90 {values['p90']:7.2f} ms  (n={values['n']:.0f})"
        )
    assert "hop.retrieval" in latency and "hop.ranker" in latency
