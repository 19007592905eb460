"""The models in the ingress's own process: ``model_placement: ingress``.

The default graph serves the models from their own deployments, one ``DeploymentHandle`` hop to
``retrieval`` and one to ``ranker`` per request, with the ranker batching concurrent requests.
On a small node the hops cost more than they buy. Measured on the 2-core machine at 50
requests/s on the 100k-item benchmark world (README, Serving graph): each hop costs the ingress
and the model replica CPU of their own, and while the node was out of cores the ranker's answers
came back after the ranking budget, so nearly every list was served in the pre-score order. With
the models in the ingress, the same load and about the same CPU per request had 549 and 708 of
1,000 lists served whole (against 5 and 13), and the saturated throughput rose by about a fifth.

:class:`InProcessModels` is that placement's ``ModelGateway``: the release's retrieval state
and ranker in one :class:`~deployments.bundle_slot.BundleSlot` (one version for both, swapped
together), the catalog follower feeding new items to its delta index, the failure drills of
``ModelUserConfig``, and each call run in the caller's event loop: a 500-candidate forward pass
costs about 3 ms, less than a thread hand-off and the hop it replaces.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from deployments.bundle_slot import BundleSlot, ModelUserConfig
from deployments.catalog_follower import follow_catalog
from deployments.ranker_model import RankerModel, score_batch
from deployments.retrieval_model import RetrievalModel, retrieve
from deployments.wire import NO_MODEL, RankReply, RankRequest, RetrievalReply, RetrievalRequest
from features.redis_store import RedisStore
from training.release import Release


@dataclass(frozen=True, slots=True)
class LocalModels:
    """One release's serving state, both halves.

    Attributes:
        retrieval: The retrieval state (user tower, indexes, item-item table).
        ranker: The ranker, or None for a release without one.
    """

    retrieval: RetrievalModel
    ranker: RankerModel | None

    @classmethod
    def build(cls, release: Release, store: RedisStore) -> LocalModels:
        """Both halves of a loaded release."""
        return cls(RetrievalModel.build(release, store), RankerModel.build(release))


class InProcessModels:
    """A ``ModelGateway`` serving a bundle from this process, reloaded through ``user_config``.

    Args:
        home: Data home of the model registry.
        store: The online store (the retrieval state reads users' histories from it).
        redis_timeout_s: The store's socket timeout, for the catalog follower's blocking reads.
    """

    def __init__(self, home: str, store: RedisStore, *, redis_timeout_s: float) -> None:
        self._store = store
        self._redis_timeout_s = redis_timeout_s
        self._slot: BundleSlot[LocalModels] = BundleSlot(
            home, lambda release: LocalModels.build(release, store), name="models"
        )
        self._config = ModelUserConfig()
        self._follower: asyncio.Task[None] | None = None

    async def apply(self, user_config: dict[str, Any]) -> None:
        """Apply a ``user_config`` (:class:`ModelUserConfig`): the bundle and the failure drills.

        The first bundle loads before this returns; later ones load beside the served one and
        replace it when ready. A bundle that fails to load never raises (see
        :mod:`deployments.bundle_slot`); an invalid config does.
        """
        self._config = await self._slot.configure(user_config)
        if self._follower is None:
            self._follower = asyncio.ensure_future(
                follow_catalog(self._store, self._retrieval, redis_timeout_s=self._redis_timeout_s)
            )

    def load_now(self, bundle: str) -> None:
        """Serve ``bundle`` from now on, loaded in this thread, for a process without Serve.

        No catalog follower runs then: items created later are not retrievable by the model.

        Raises:
            Exception: The bundle did not load.
        """
        self._slot.load_now(bundle)

    def _retrieval(self) -> RetrievalModel | None:
        models = self._slot.state
        return None if models is None else models.retrieval

    async def retrieve(self, request: RetrievalRequest) -> RetrievalReply:
        """Run a request's model-backed sources."""
        await self._config.drill("retrieval")
        _, models = self._slot.served()
        return await retrieve(None if models is None else models.retrieval, request)

    async def rank(self, request: RankRequest) -> RankReply:
        """Score one request's candidates (no batching across requests: they never meet here)."""
        await self._config.drill("ranker")
        _, models = self._slot.served()
        if models is None or models.ranker is None:
            return RankReply(model_version=NO_MODEL, scores=None)
        return score_batch(models.ranker, [request])[0]

    async def popular(self, k: int) -> list[tuple[str, float]]:
        """The served release's most popular items (empty without a model)."""
        model = self._retrieval()
        return [] if model is None else model.popular[:k]

    def status(self) -> dict[str, object]:
        """What this process serves (:class:`~deployments.bundle_slot.SlotStatus`, the drill, new items)."""
        status = self._slot.status().as_dict()
        model = self._retrieval()
        status["deltaItems"] = 0 if model is None else model.index.delta_size
        status["fault"] = self._config.fault
        return status

    async def model_status(self) -> dict[str, Any]:
        """The same status for both models: they are one release here."""
        status = self.status()
        return {"retrieval": status, "ranker": status}

    def close(self) -> None:
        """Stop following the catalog."""
        if self._follower is not None:
            self._follower.cancel()
