"""The read path without Ray: the same service, models in-process, for the serving benchmark's peer.

``benchmarks.serving`` compares the Serve graph with two things built from the same code:

* the pipeline called in-process (:func:`local_service`): no HTTP, no hops, the floor of what
  the read path costs;
* one plain ASGI process (``uvicorn --factory benchmarks.serving_peer:create_peer_app``): the
  same FastAPI app and :class:`RecommendationService`, with the retrieval and ranker models
  called in the process instead of through ``DeploymentHandle`` hops.

Both load the registry's ``production`` bundle from ``RAYREC_HOME`` and read the namespace's
online store, as the Serve replicas do.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI

from core.settings import Settings
from deployments.api.app import create_app
from deployments.api.services import ApiServices
from deployments.ranker_model import RankerModel, score_batch
from deployments.recommender.options import ServingOptions
from deployments.recommender.service import RecommendationService
from deployments.retrieval_model import RetrievalModel, retrieve
from deployments.wire import NO_MODEL, RankReply, RankRequest, RetrievalReply, RetrievalRequest
from features.redis_store import RedisStore
from training.registry import ModelRegistry
from training.release import load_release

BUNDLE = "production"


class LocalGateway:
    """A ``ModelGateway`` that runs the retrieval and ranker models in this process.

    Args:
        retrieval: The retrieval model of the release.
        ranker: Its ranker, if the release has one.
    """

    def __init__(self, retrieval: RetrievalModel, ranker: RankerModel | None) -> None:
        self._retrieval = retrieval
        self._ranker = ranker

    @classmethod
    def load(cls, settings: Settings, store: RedisStore, bundle: str = BUNDLE) -> LocalGateway:
        """Load a bundle of the registry under ``settings.home``."""
        release = load_release(ModelRegistry(settings.home).load_bundle(bundle))
        return cls(RetrievalModel.build(release, store), RankerModel.build(release))

    async def retrieve(self, request: RetrievalRequest) -> RetrievalReply:
        """Run a request's model-backed sources."""
        return await retrieve(self._retrieval, request)

    async def rank(self, request: RankRequest) -> RankReply:
        """Score one request's candidates (no batching across requests: one process, one loop)."""
        if self._ranker is None:
            return RankReply(model_version=NO_MODEL, scores=None)
        return score_batch(self._ranker, [request])[0]

    async def popular(self, k: int) -> list[tuple[str, float]]:
        """The release's most popular items."""
        return self._retrieval.popular[:k]

    async def model_status(self) -> dict[str, Any]:
        """The versions served."""
        version = self._retrieval.version
        return {"retrieval": {"version": version}, "ranker": {"version": version}}


def local_service(
    settings: Settings, store: RedisStore, options: ServingOptions | None = None
) -> RecommendationService:
    """The read path with its models in this process (``options``: the defaults when omitted)."""
    import torch

    torch.set_num_threads(1)
    return RecommendationService(
        store,
        LocalGateway.load(settings, store),
        options or ServingOptions(),
        stream_max_len=settings.stream_max_len,
    )


def create_peer_app() -> FastAPI:
    """The API app over in-process models, for ``uvicorn --factory`` (settings from ``RAYREC_*``)."""
    settings = Settings.from_env(None)
    services = ApiServices.from_settings(settings)
    services.recommendations = local_service(settings, services.store)
    return create_app(services)


async def warm(service: RecommendationService) -> None:
    """Let the service load its catalog index and popular list before timing starts."""
    await service.start()
    await asyncio.sleep(0)
