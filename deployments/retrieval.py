"""The ``retrieval`` deployment: the heavy retrieval state behind one ``DeploymentHandle`` call per request.

Holds the serving release (two-tower user tower, ANN or exact index plus the delta of new items,
item-item table) and answers every model-backed source of a request in one call (see
:mod:`deployments.retrieval_model`). Items added to the catalog after training join the delta
index as they arrive (:mod:`deployments.catalog_follower`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

from core.settings import Settings
from deployments.bundle_slot import BundleSlot, ModelUserConfig
from deployments.catalog_follower import follow_catalog
from deployments.retrieval_model import RetrievalModel, retrieve
from deployments.wire import RetrievalReply, RetrievalRequest
from features.redis_store import RedisStore


@serve.deployment(
    name="retrieval",
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 0.3},
    user_config={"bundle": "production"},
    health_check_period_s=10,
)
class Retrieval:
    """Model-backed candidate sources for the read path.

    Args:
        settings_overrides: Values that win over the replica's ``RAYREC_*`` environment.
    """

    def __init__(self, settings_overrides: dict[str, Any] | None = None) -> None:
        import torch

        # A fractional-CPU replica: more intra-op threads than cores only adds contention.
        torch.set_num_threads(1)
        settings = Settings.from_env(None, **(settings_overrides or {}))
        self._store = RedisStore.from_settings(settings)
        self._redis_timeout_s = settings.redis_timeout_s
        self._slot: BundleSlot[RetrievalModel] = BundleSlot(
            settings.home, lambda release: RetrievalModel.build(release, self._store), name="retrieval"
        )
        self._config = ModelUserConfig()
        self._catalog_task: asyncio.Task[None] | None = None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply a new ``user_config`` (:class:`ModelUserConfig`): bundle and failure drills.

        An invalid config raises (Serve then rejects the update); a bundle that fails to load
        never does (see :mod:`deployments.bundle_slot`).
        """
        self._config = await self._slot.configure(user_config)
        if self._catalog_task is None:
            self._catalog_task = asyncio.ensure_future(
                follow_catalog(self._store, lambda: self._slot.state, redis_timeout_s=self._redis_timeout_s)
            )

    async def retrieve(self, request: RetrievalRequest) -> RetrievalReply:
        """Run the model-backed sources of one request.

        Args:
            request: The request's fields and the sources its surface runs.

        Returns:
            Candidates per source, with failures per source.
        """
        await self._config.drill("retrieval")
        _, model = self._slot.served()
        return await retrieve(model, request)

    async def popular(self, k: int) -> list[tuple[str, float]]:
        """The serving release's most popular items (empty without a model)."""
        model = self._slot.state
        return [] if model is None else model.popular[:k]

    async def model_status(self) -> dict[str, object]:
        """What this replica serves (see :class:`deployments.bundle_slot.SlotStatus`)."""
        status = self._slot.status().as_dict()
        model = self._slot.state
        status["deltaItems"] = 0 if model is None else model.index.delta_size
        status["fault"] = self._config.fault
        return status

    async def ping(self) -> float:
        """Nothing: the cost of a hop, measured by the caller."""
        return 0.0

    def __del__(self) -> None:
        task = getattr(self, "_catalog_task", None)
        if task is not None:
            task.cancel()
        store = getattr(self, "_store", None)
        if store is not None:
            store.close()
