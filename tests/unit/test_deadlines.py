from __future__ import annotations

import asyncio
import time

import pytest

from core.deadlines import within


async def _stubborn(delay_s: float, ended: list[str]) -> str:
    """Work that finishes what it started when cancelled, as the asyncio Redis client does."""
    try:
        await asyncio.sleep(delay_s)
    except asyncio.CancelledError:
        await asyncio.sleep(delay_s)
        ended.append("finished anyway")
        return "late"
    return "on time"


def test_work_done_in_time_gives_its_result() -> None:
    async def body() -> str:
        return await within(_stubborn(0.0, []), 1.0)

    assert asyncio.run(body()) == "on time"


def test_late_work_is_cut_at_the_budget_even_when_it_ignores_its_cancellation() -> None:
    ended: list[str] = []

    async def body() -> tuple[float, float]:
        started = time.perf_counter()
        with pytest.raises(TimeoutError):
            await within(_stubborn(0.2, ended), 0.01)
        cut = time.perf_counter() - started
        # wait_for waits for the cancelled work and hands back its late result.
        started = time.perf_counter()
        assert await asyncio.wait_for(_stubborn(0.2, []), 0.01) == "late"
        waited = time.perf_counter() - started
        await asyncio.sleep(0.3)  # the abandoned work ends in the background
        return cut, waited

    cut, waited = asyncio.run(body())
    assert cut < 0.15 <= waited
    assert ended == ["finished anyway"]


def test_errors_in_time_are_raised_and_abandoned_failures_are_not_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fails() -> None:
        raise ValueError("broken")

    async def fails_late() -> None:
        try:
            await asyncio.sleep(1.0)
        except asyncio.CancelledError:
            raise RuntimeError("failed while cancelled") from None

    async def body() -> None:
        with pytest.raises(ValueError, match="broken"):
            await within(fails(), 1.0)
        with pytest.raises(TimeoutError):
            await within(fails_late(), 0.0)
        await asyncio.sleep(0.05)

    asyncio.run(body())
    assert "never retrieved" not in caplog.text


def test_cancelling_the_caller_cancels_the_work() -> None:
    async def body() -> bool:
        work = asyncio.ensure_future(asyncio.sleep(10.0))
        caller = asyncio.ensure_future(within(work, 5.0))
        await asyncio.sleep(0.01)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await asyncio.sleep(0)
        return work.cancelled()

    assert asyncio.run(body())
