"""PipelineSlots: bounded concurrent pipelines, admitted in arrival order, with a wait limit."""

from __future__ import annotations

import asyncio

import pytest

from deployments.recommender.admission import PipelineSlots
from deployments.recommender.options import ServingOptions


def test_no_limit_admits_everyone_at_once() -> None:
    async def scenario() -> None:
        slots = PipelineSlots(0, max_wait_ms=0)
        assert all([await slots.enter() for _ in range(50)])
        assert slots.running == 50 and slots.waiting == 0
        for _ in range(50):
            slots.leave()
        assert slots.running == 0

    asyncio.run(scenario())


def test_waiting_requests_are_admitted_in_arrival_order_as_slots_free_up() -> None:
    async def scenario() -> None:
        slots = PipelineSlots(2, max_wait_ms=5_000)
        order: list[int] = []
        release = asyncio.Event()

        async def request(n: int) -> None:
            assert await slots.enter()
            order.append(n)
            await release.wait()
            slots.leave()

        tasks = [asyncio.create_task(request(n)) for n in range(5)]
        await asyncio.sleep(0.01)
        # Two run; the other three queue behind them.
        assert order == [0, 1]
        assert (slots.running, slots.waiting) == (2, 3)
        release.set()
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2, 3, 4]
        assert (slots.running, slots.waiting, slots.refused) == (0, 0, 0)

    asyncio.run(scenario())


def test_a_request_that_waits_too_long_is_refused_and_holds_no_slot() -> None:
    async def scenario() -> None:
        slots = PipelineSlots(1, max_wait_ms=20)
        assert await slots.enter()
        started = asyncio.get_running_loop().time()
        assert not await slots.enter()
        assert asyncio.get_running_loop().time() - started >= 0.019
        assert (slots.running, slots.waiting, slots.refused) == (1, 0, 1)
        slots.leave()
        # The refused request took nothing: the slot is free for the next one at once.
        assert await slots.enter()
        assert slots.running == 1

    asyncio.run(scenario())


def test_a_cancelled_wait_leaves_the_slot_to_the_next_request() -> None:
    async def scenario() -> None:
        slots = PipelineSlots(1, max_wait_ms=5_000)
        assert await slots.enter()
        cancelled = asyncio.create_task(slots.enter())
        waiting = asyncio.create_task(slots.enter())
        await asyncio.sleep(0.01)
        cancelled.cancel()
        slots.leave()
        assert await asyncio.wait_for(waiting, 1.0)
        assert slots.running == 1 and slots.waiting == 0
        with pytest.raises(asyncio.CancelledError):
            await cancelled

    asyncio.run(scenario())


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        PipelineSlots(-1, max_wait_ms=10)
    with pytest.raises(ValueError, match="max_wait_ms"):
        PipelineSlots(1, max_wait_ms=-1)


def test_the_default_concurrency_follows_the_model_placement() -> None:
    unset = ServingOptions()
    assert unset.pipeline_concurrency is None
    assert unset.for_placement(models_in_process=True).pipeline_concurrency == 1
    assert unset.for_placement(models_in_process=False).pipeline_concurrency == 0
    # A value given in the application's args wins over the placement's default.
    given = ServingOptions(pipeline_concurrency=3)
    assert given.for_placement(models_in_process=True).pipeline_concurrency == 3
    unlimited = ServingOptions(pipeline_concurrency=0)
    assert unlimited.for_placement(models_in_process=True).pipeline_concurrency == 0
