"""Awaiting work under a budget that ends on time, whatever the work does with its cancellation.

``asyncio.wait_for`` cancels the work when the time is up and then waits for it to end. The
asyncio Redis client does not end at a cancellation: a command whose reply is on its way
completes (measured with redis-py 8.1: a 1 µs budget on a warm connection returned the reply
after a whole round trip), and ``wait_for`` then returns that late result as if it were on time.
A stage's budget is only as good as its cut, so :func:`within` stops waiting when the time is up,
leaves the cancelled work to end in the background and raises at once.

Only read-only work may be left that way: work that writes shared state (a hydrator setting
candidates' features, a scorer setting their scores) must be waited for, and keeps ``wait_for``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


def _forget(task: asyncio.Future[Any]) -> None:
    # Retrieved so that asyncio does not log the abandoned work's outcome as never retrieved.
    if not task.cancelled():
        task.exception()


def _abandon(task: asyncio.Future[Any]) -> None:
    task.cancel()
    task.add_done_callback(_forget)


async def within(work: Awaitable[T], timeout_s: float) -> T:
    """The result of ``work`` if it ends within ``timeout_s``.

    Args:
        work: Read-only work (see the module docstring).
        timeout_s: Seconds it may take; at most 0 lets it run until its first wait.

    Returns:
        Its result.

    Raises:
        TimeoutError: It did not end in time; it was cancelled and is no longer waited for.
        Exception: Whatever it raised in time.
    """
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait((task,), timeout=max(timeout_s, 0.0))
    except asyncio.CancelledError:
        _abandon(task)
        raise
    if not done:
        _abandon(task)
        raise TimeoutError(f"not done within {timeout_s * 1000.0:.3g} ms")
    return task.result()
