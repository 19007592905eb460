"""``model_placement: ingress``: the models served inside the ingress replicas, end to end.

The same world and settings as ``test_serving_graph`` (its ``serving_graph`` builds them), but
the application binds no ``retrieval`` or ``ranker`` deployment: each ingress replica loads the
bundle its ``user_config`` names, follows the catalog into its delta index, runs the failure
drills, and swaps bundles in place on promotion and rollback.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from core.settings import Settings
from tests.integration.ray_session import ray_cluster
from tests.integration.test_serving_graph import (
    Graph,
    admin_status,
    promote_then_roll_back,
    recommend,
    serving_graph,
    traffic,
    until,
    whole,
)

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
    with traffic(graph) as (statuses, versions):
        promote_then_roll_back(graph, APP, versions)
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    assert set(graph.versions) <= set(versions)


def test_load_now_serves_a_bundle_in_a_process_without_serve(graph: Graph) -> None:
    import asyncio

    from deployments.local_models import InProcessModels

    models = InProcessModels(str(graph.home), graph.store, redis_timeout_s=graph.settings.redis_timeout_s)
    models.load_now(graph.versions[0])
    status = models.status()
    assert status["version"] == graph.versions[0] and status["error"] is None
    popular = asyncio.run(models.popular(5))
    assert len(popular) == 5
