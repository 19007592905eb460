"""Waiting for a benchmark's Serve app to answer before load starts."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp


async def wait_ready(base: str, timeout_s: float) -> None:
    """Poll ``{base}/readyz`` until it answers 200.

    Raises:
        TimeoutError: It did not within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with http.get(f"{base}/readyz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{base}/readyz did not answer 200 within {timeout_s:.0f} s")
