"""What the ingress writes after answering (the list's Redis copy and its log entry, in one round
trip), and what it answers when it has no pipeline slot to run a request in."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from core.schema import RecommendationLogEntry, ServedItem
from deployments.recommender.options import ServingOptions
from deployments.recommender.service import Recommendation, RecommendationQuery, RecommendationService
from features.last_served import ServedEntry, ServedList
from features.redis_store import RedisStore
from features.stream_codec import decode_log_entry
from tests.integration.no_models import NoModels
from tests.integration.streams import stream_entries


def _served(request_id: str) -> tuple[RecommendationLogEntry, ServedList]:
    entry = RecommendationLogEntry(
        request_id=request_id,
        user_id="u1",
        surface="home",
        items=[ServedItem(item_id="i1", position=0, score=0.5, sources=["trending"], propensity=1.0)],
        model_version="none",
    )
    served = ServedList(
        entries=(ServedEntry("i1", 0.5, "Trending now", ("trending",)),),
        model_version="none",
        served_at_s=time.time(),
    )
    return entry, served


def test_the_copy_and_the_log_entry_are_written_together_and_fail_apart(store: RedisStore) -> None:
    service = RecommendationService(store, NoModels(), ServingOptions())
    stream = store.keys.stream_impressions()
    first, first_list = _served("r1")
    second, second_list = _served("r2")

    async def body() -> tuple[ServedList | None, list[str], ServedList | None]:
        try:
            await service._write_after(first, ("home", "u1", first_list))
            copy = await service._last.recall_remote("home", "u1", budget_ms=1_000)
            logged = [decode_log_entry(f).request_id for _, f in stream_entries(store, stream)]
            # A log that Redis refuses (the stream's key holds another type) is counted as
            # dropped; the list's copy in the same round trip is still written.
            store.client.delete(stream)
            store.client.set(stream, "not a stream")
            await service._write_after(second, ("home", "u2", second_list))
            return copy, logged, await service._last.recall_remote("home", "u2", budget_ms=1_000)
        finally:
            await store.aclient.aclose()
            await store.apool.disconnect()

    copy, logged, second_copy = asyncio.run(body())
    assert copy is not None and [e.item_id for e in copy.entries] == ["i1"]
    assert logged == ["r1"]
    assert second_copy is not None
    assert service._log.written == 1 and service._log.dropped == 1
    assert service.metrics.log_entries.labels("dropped")._value.get() == 1


def test_a_fallback_list_is_logged_without_a_copy(store: RedisStore) -> None:
    service = RecommendationService(store, NoModels(), ServingOptions())
    entry, _ = _served("r3")

    async def body() -> None:
        try:
            await service._write_after(entry, None)
        finally:
            await store.aclient.aclose()
            await store.apool.disconnect()

    asyncio.run(body())
    logged = [decode_log_entry(f) for _, f in stream_entries(store, store.keys.stream_impressions())]
    assert [e.request_id for e in logged] == ["r3"]
    assert service._log.written == 1
    assert store.client.get(store.keys.last_list("home", "u1")) is None


def test_a_request_that_finds_every_pipeline_slot_busy_too_long_gets_the_fallback(store: RedisStore) -> None:
    service = RecommendationService(
        store, NoModels(), ServingOptions(pipeline_concurrency=1, pipeline_wait_ms=20)
    )
    real_run = service._runner.run
    runs: list[str] = []

    async def slow_run(*args: Any, **kwargs: Any) -> Any:
        runs.append("run")
        await asyncio.sleep(0.15)  # holds the only slot far past the 20 ms wait
        return await real_run(*args, **kwargs)

    service._runner.run = slow_run  # type: ignore[method-assign]

    async def body() -> Recommendation:
        try:
            _, second = await asyncio.gather(
                service.recommend(RecommendationQuery(user_id="u1", surface="home", limit=5)),
                service.recommend(RecommendationQuery(user_id="u2", surface="home", limit=5)),
            )
            # Once the slot is free, the next request runs its pipeline again.
            await service.recommend(RecommendationQuery(user_id="u3", surface="home", limit=5))
            return second
        finally:
            await service.close()
            await store.aclient.aclose()
            await store.apool.disconnect()

    second = asyncio.run(body())
    assert runs == ["run", "run"]  # the first and the third request; the second never ran
    assert second.fallback == "popular"
    assert service.slots.refused == 1 and service.slots.running == 0
    assert service.metrics.shed.labels("home")._value.get() == 1
    assert service.metrics.fallbacks.labels("home", "popular")._value.get() >= 1
