"""The read path without Ray: the same service, models in-process, for the serving benchmark's peer.

``benchmarks.serving`` compares the Serve graph with two things built from the same code:

* the pipeline called in-process (:func:`local_service`): no HTTP, no hops, the floor of what
  the read path costs;
* one plain ASGI process (``uvicorn --factory benchmarks.serving_peer:create_peer_app``): the
  same FastAPI app and :class:`RecommendationService`, with the retrieval and ranker models
  called in the process (:class:`~deployments.local_models.InProcessModels`, as an ingress
  replica with ``model_placement: ingress`` holds them) instead of through hops.

Both load the registry's ``production`` bundle from ``RAYREC_HOME`` and read the namespace's
online store, as the Serve replicas do.
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI

from core.settings import Settings
from deployments.api.app import create_app
from deployments.api.services import ApiServices
from deployments.local_models import InProcessModels
from deployments.recommender.options import ServingOptions
from deployments.recommender.service import RecommendationService
from features.redis_store import RedisStore

BUNDLE = "production"


def local_service(
    settings: Settings, store: RedisStore, options: ServingOptions | None = None
) -> RecommendationService:
    """The read path with its models in this process (``options``: the defaults when omitted)."""
    import torch

    torch.set_num_threads(1)
    models = InProcessModels(settings.home, store, redis_timeout_s=settings.redis_timeout_s)
    models.load_now(BUNDLE)
    return RecommendationService(
        store,
        models,
        (options or ServingOptions()).for_placement(models_in_process=True),
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
