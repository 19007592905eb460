"""``model_placement: ingress``: the models served inside the ingress replicas, end to end.

The same world and settings as ``test_serving_graph`` (its ``serving_graph`` builds them), but
the application binds no ``retrieval`` or ``ranker`` deployment: each ingress replica loads the
bundle its ``user_config`` names, follows the catalog into its delta index, runs the failure
drills, and swaps bundles in place on promotion and rollback.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from core.settings import Settings
from tests.integration.ray_session import ray_cluster
from tests.integration.test_serving_graph import (
    Graph,
    admin_status,
    recommend,
    serving_graph,
    until,
    whole,
)
from training.registry import ModelRegistry

pytestmark = [pytest.mark.integration, pytest.mark.slow]
__all__ = ["ray_cluster"]

APP = "rayrec-models-in-ingress-test"


@pytest.fixture(scope="module")
def graph(
    ray_cluster: None, redis_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Graph]:
    yield from serving_graph(
        redis_settings, tmp_path_factory, app=APP, suffix="-mi", args={"model_placement": "ingress"}
    )


def set_fault(fault: str | None) -> None:
    from deployments.reload import update_user_configs, wait_running

    update_user_configs(APP, {"ingress": {"fault": fault}})
    wait_running(APP, timeout_s=120)


def test_the_app_has_no_model_deployments_and_serves_the_bundle(graph: Graph) -> None:
    from ray import serve

    deployments = set(serve.status().applications[APP].deployments)
    assert deployments == {"ingress", "stream_workers"}
    body = whole(graph, "/api/recommendations", userId=graph.users[0], limit=20)
    assert body["modelVersion"] == graph.versions[0]
    assert len(body["items"]) == 20
    models = admin_status(graph)["models"]
    assert models["retrieval"]["version"] == models["ranker"]["version"] == graph.versions[0]


def test_a_new_item_reaches_the_ingress_delta_index(graph: Graph) -> None:
    from core.schema import Item, ItemType
    from features.catalog_changes import CatalogChanges

    CatalogChanges(graph.store).put_item(
        Item(
            item_id="brand-new-mi", item_type=ItemType.VIDEO, title="New", category="cat-0", creator_id="cr-n"
        )
    )

    def added() -> bool:
        # Every replica follows the catalog itself: ask until both have been reached.
        counts = [int(admin_status(graph)["models"]["retrieval"]["deltaItems"]) for _ in range(6)]
        return min(counts) >= 1

    until(added, 30, "the new item reaching every replica's delta index")


def test_the_failure_drill_degrades_and_recovers(graph: Graph) -> None:
    user = graph.users[3]
    try:
        set_fault("raise")

        def degraded() -> dict[str, Any] | None:
            body = recommend(graph, user)
            return body if body["fallback"] is not None else None

        body = until(degraded, 60, "the raise drill")
        assert len(body["items"]) == 20
        assert admin_status(graph)["models"]["ranker"]["fault"] == "raise"
    finally:
        set_fault(None)
    whole(graph, "/api/recommendations", userId=user, limit=20)


def test_promotion_and_rollback_swap_in_place_without_errors(graph: Graph) -> None:
    from deployments.reload import apply_bundle

    v1, v2 = graph.versions
    registry = ModelRegistry(str(graph.home))
    statuses: list[int] = []
    versions: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=graph.url, timeout=60) as client:
            n = 0
            while not stop.is_set():
                response = client.get("/api/recommendations", params={"userId": graph.users[n % 10]})
                statuses.append(response.status_code)
                if response.status_code == 200:
                    versions.append(response.json()["modelVersion"])
                n += 1

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        until(lambda: len(versions) >= 10, 60, "traffic before the promotion")
        registry.promote(v2, "production")
        assert apply_bundle(APP, "production") == v2
        served = len(versions)
        until(lambda: len(versions) >= served + 10 and versions[-1] == v2, 60, "traffic on v2")
        registry.rollback("production")
        assert apply_bundle(APP, "production") == v1
        served = len(versions)
        until(lambda: len(versions) >= served + 10 and versions[-1] == v1, 60, "traffic on v1 again")
    finally:
        stop.set()
        worker.join(timeout=60)
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    assert {v1, v2} <= set(versions)


def test_load_now_serves_a_bundle_in_a_process_without_serve(graph: Graph) -> None:
    import asyncio

    from deployments.local_models import InProcessModels

    models = InProcessModels(str(graph.home), graph.store, redis_timeout_s=graph.settings.redis_timeout_s)
    models.load_now(graph.versions[0])
    status = models.status()
    assert status["version"] == graph.versions[0] and status["error"] is None
    popular = asyncio.run(models.popular(5))
    assert len(popular) == 5
