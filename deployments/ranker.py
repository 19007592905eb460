"""The ``ranker`` deployment: the multi-task model, batched across concurrent requests.

``@serve.batch`` (Ray 2.60 signature: ``max_batch_size``, ``batch_wait_timeout_s``,
``max_concurrent_batches``) gathers the candidate lists of requests that arrive together, and
:func:`deployments.ranker_model.score_batch` scores them in one forward pass in a worker thread,
so the replica's event loop keeps answering (health checks, the next batch's arrivals).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ray import serve

from core.settings import Settings
from deployments.bundle_slot import BundleSlot, ModelUserConfig
from deployments.ranker_model import RankerModel, score_batch
from deployments.wire import NO_MODEL, RankReply, RankRequest

MAX_BATCH_SIZE = 16
"""Requests scored together at most."""

BATCH_WAIT_S = 0.0
"""How long the first request of a batch waits for company: not at all.

One pass runs at a time, so requests that arrive while it runs queue up and form the next batch
by themselves: under load the batches fill without any wait, and at low load (50 requests/s
arrive 20 ms apart) a wait would almost never find company and only add its length to every
request's latency."""


@serve.deployment(
    name="ranker",
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 0.3},
    user_config={"bundle": "production"},
    health_check_period_s=10,
)
class Ranker:
    """Scores candidates with the serving release's multi-task ranker.

    Args:
        settings_overrides: Values that win over the replica's ``RAYREC_*`` environment.
    """

    def __init__(self, settings_overrides: dict[str, Any] | None = None) -> None:
        import torch

        # A fractional-CPU replica: more intra-op threads than cores only adds contention.
        torch.set_num_threads(1)
        settings = Settings.from_env(None, **(settings_overrides or {}))
        self._slot: BundleSlot[RankerModel] = BundleSlot(settings.home, RankerModel.build, name="ranker")
        self._config = ModelUserConfig()

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply a new ``user_config`` (:class:`ModelUserConfig`): bundle and failure drills.

        ``fault: raise`` makes every call fail and ``fault: slow`` delays it: the drills of the
        ranker fallback (``ranker_prescore``) and of the circuit breaker in front of this
        deployment. A bundle that fails to load never raises (see :mod:`deployments.bundle_slot`).
        """
        self._config = await self._slot.configure(user_config)

    async def rank(self, request: RankRequest) -> RankReply:
        """Score one request's candidates (batched with concurrent requests).

        Args:
            request: The user, the context, the candidates and the surface's head weights.

        Returns:
            One score per candidate, in order; ``scores`` is None without a ranker.
        """
        await self._config.drill("ranker")
        if self._slot.state is None:
            return RankReply(model_version=NO_MODEL, scores=None)
        return await self._batched(request)

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _batched(self, requests: list[RankRequest]) -> list[RankReply]:
        started = time.perf_counter()
        _, model = self._slot.served()
        if model is None:
            return [RankReply(model_version=NO_MODEL, scores=None) for _ in requests]
        replies = await asyncio.to_thread(score_batch, model, requests)
        waited_ms = (time.perf_counter() - started) * 1000.0
        return [
            RankReply(r.model_version, r.scores, r.unknown, r.embeddings, waited_ms, r.batch_size)
            for r in replies
        ]

    async def model_status(self) -> dict[str, object]:
        """What this replica serves (see :class:`deployments.bundle_slot.SlotStatus`)."""
        status = self._slot.status().as_dict()
        status["fault"] = self._config.fault
        return status
