"""The recommendation routes and the service's last-resort fallbacks, with no Redis to talk to.

The store points at a closed port: every Redis call fails at once, as when the online store is
down, so these run without Redis and show the graph still answers ``200`` with the popular list.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.settings import Settings
from deployments.api.app import create_app
from deployments.api.services import ApiServices
from deployments.recommender.options import ServingOptions
from deployments.recommender.service import (
    CACHED_LIST,
    POPULAR,
    USER_FEATURES_UNAVAILABLE,
    RecommendationQuery,
    RecommendationService,
)
from deployments.wire import RankReply, RankRequest, RetrievalReply, RetrievalRequest
from features.last_served import ServedEntry, ServedList
from features.metrics import StreamMetrics

POPULAR_ITEMS = [(f"pop-{n}", 100.0 - n) for n in range(30)]


class NoModels:
    async def retrieve(self, request: RetrievalRequest) -> RetrievalReply:
        return RetrievalReply("none", {s.name: [] for s in request.sources})

    async def rank(self, request: RankRequest) -> RankReply:
        return RankReply("none", None)

    async def popular(self, k: int) -> list[tuple[str, float]]:
        return POPULAR_ITEMS[:k]

    async def model_status(self) -> dict[str, Any]:
        return {"retrieval": {"version": "none"}, "ranker": {"version": "none"}}


@pytest.fixture
def services() -> Iterator[ApiServices]:
    settings = Settings.from_env(
        None, redis_url="redis://127.0.0.1:1/0", redis_timeout_s=0.2, namespace="unit-dead"
    )
    svc = ApiServices.from_settings(settings)
    svc.recommendations = RecommendationService(svc.store, NoModels(), ServingOptions())
    yield svc
    svc.close()


@pytest.fixture
def client(services: ApiServices) -> Iterator[TestClient]:
    with TestClient(create_app(services, stream_metrics=StreamMetrics())) as test_client:
        yield test_client


@pytest.mark.parametrize(
    ("params", "field_name"),
    [
        ({"userId": "u1", "limit": 0}, "limit"),
        ({"userId": "u1", "limit": 101}, "limit"),
        ({"userId": "u1", "limit": "many"}, "limit"),
        ({"userId": "u1", "surface": "nowhere"}, "surface"),
        ({"surface": "home"}, "userId"),
        ({"userId": "bad id!"}, "userId"),
        ({"userId": "u1", "surface": "similar"}, "itemId"),
        ({"userId": "u1", "device": "toaster"}, "device"),
    ],
)
def test_refusals_name_the_field(client: TestClient, params: dict[str, Any], field_name: str) -> None:
    response = client.get("/api/recommendations", params=params)
    assert response.status_code == 422, response.text
    assert [f["field"] for f in response.json()["fields"]] == [field_name]


def test_store_down_serves_the_popular_list(client: TestClient) -> None:
    response = client.get("/api/recommendations", params={"userId": "u1", "surface": "home", "limit": 20})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["fallback"] == POPULAR
    assert body["modelVersion"] == "none"
    assert [i["itemId"] for i in body["items"]] == [i for i, _ in POPULAR_ITEMS[:20]]
    assert [i["position"] for i in body["items"]] == list(range(20))
    assert all(i["reason"] == "Popular right now" and i["sources"] == ["popular"] for i in body["items"])


def test_similar_route_leaves_the_seed_out(client: TestClient) -> None:
    response = client.get("/api/items/pop-0/similar", params={"limit": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["surface"] == "similar" and body["fallback"] == POPULAR
    assert "pop-0" not in [i["itemId"] for i in body["items"]] and len(body["items"]) == 5


def test_the_last_list_in_memory_comes_before_popular(services: ApiServices) -> None:
    service = services.recommendations
    assert service is not None
    remembered = ServedList(
        entries=tuple(
            ServedEntry(f"mine-{n}", 1.0 - n / 10, "Picked for you", ("two_tower_ann",)) for n in range(5)
        ),
        model_version="v9",
        served_at_s=__import__("time").time(),
    )
    service._last.remember("home", "u7", remembered)

    async def body() -> Any:
        try:
            return await service.recommend(RecommendationQuery(user_id="u7", surface="home", limit=3))
        finally:
            await service.close()

    answer = asyncio.run(body())
    assert answer.fallback == CACHED_LIST
    assert [i.item_id for i in answer.items] == ["mine-0", "mine-1", "mine-2"]
    assert answer.model_version == "v9"
    assert answer.items[0].reason == "Picked for you" and answer.items[0].sources == ("two_tower_ann",)


def test_served_lists_round_trip_through_json() -> None:
    served = ServedList((ServedEntry("a", 0.5, "Because", ("x", "y")),), "v1", 12.5)
    assert ServedList.from_json(served.to_json()) == served
    with pytest.raises(ValueError):
        ServedList.from_json('{"v": 1}')


def test_user_features_unavailable_is_reported_after_the_main_fallback(services: ApiServices) -> None:
    service = services.recommendations
    assert service is not None

    async def body() -> Any:
        try:
            return await service.recommend(RecommendationQuery(user_id="u8", surface="home", limit=3))
        finally:
            await service.close()

    answer = asyncio.run(body())
    assert answer.fallback == POPULAR
    dropped = service.metrics.registry.get_sample_value(
        "rayrec_recommendation_fallbacks_total", {"surface": "home", "kind": USER_FEATURES_UNAVAILABLE}
    )
    assert dropped == 1.0
