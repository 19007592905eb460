"""The HTTP ingress deployment: the FastAPI app of ``deployments.api`` behind Ray Serve."""

from __future__ import annotations

import gc
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from core.settings import Settings
from deployments.api.app import create_app
from deployments.api.services import ApiServices
from deployments.local_models import InProcessModels
from deployments.model_gateway import HandleGateway
from deployments.recommender.metrics import default_serving_metrics
from deployments.recommender.options import ServingOptions
from deployments.recommender.service import RecommendationService


@serve.deployment(name="ingress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.5})
@serve.ingress()
class Ingress:
    """Serves the HTTP API; every replica owns its own Redis pools.

    The read path's control flow runs here: the pipeline runner, the Redis-backed sources,
    filters, feature hydration, pre-score and re-ranking, with one hop to ``retrieval`` and one
    to ``ranker`` per request (see ``deployments.recommender.service``). With
    ``model_placement="ingress"`` the replica holds the models itself
    (:mod:`deployments.local_models`) and takes the model deployments' ``user_config``: the
    bundle to serve and the failure drills.

    Args:
        settings_overrides: Values that win over the replica's ``RAYREC_*`` environment (secrets
            stay in the environment, never in the Serve config).
        stream_workers: Handle of the ``stream_workers`` deployment, for the admin stream report.
        retrieval: Handle of the ``retrieval`` deployment; without it and ``ranker`` the replica
            serves no recommendations.
        ranker: Handle of the ``ranker`` deployment.
        serving: The read path's options (:class:`ServingOptions` fields).
        model_placement: ``deployments`` (call ``retrieval`` and ``ranker``) or ``ingress``
            (serve the models in this replica).
    """

    def __init__(
        self,
        settings_overrides: dict[str, Any] | None = None,
        stream_workers: DeploymentHandle[Any] | None = None,
        retrieval: DeploymentHandle[Any] | None = None,
        ranker: DeploymentHandle[Any] | None = None,
        serving: dict[str, Any] | None = None,
        model_placement: str = "deployments",
    ) -> None:
        settings = Settings.from_env(None, **(settings_overrides or {}))
        self._services = ApiServices.from_settings(settings)
        self._models: InProcessModels | None = None
        gateway: InProcessModels | HandleGateway | None = None
        if model_placement == "ingress":
            import torch

            # A fractional-CPU replica: more intra-op threads than cores only adds contention.
            torch.set_num_threads(1)
            self._models = gateway = InProcessModels(
                settings.home, self._services.store, redis_timeout_s=settings.redis_timeout_s
            )
        elif retrieval is not None and ranker is not None:
            gateway = HandleGateway(retrieval, ranker)
        if gateway is not None:
            self._services.recommendations = RecommendationService(
                self._services.store,
                gateway,
                ServingOptions.model_validate(serving or {}).for_placement(
                    models_in_process=self._models is not None
                ),
                stream_max_len=settings.stream_max_len,
                metrics=default_serving_metrics(),
            )
        if stream_workers is not None:
            workers = stream_workers

            async def stream_stats() -> dict[str, Any]:
                result: dict[str, Any] = await workers.stats.remote()
                return result

            self._services.stream_stats = stream_stats

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply the models' ``user_config`` (``ModelUserConfig``) with ``model_placement: ingress``.

        Raises:
            ValueError: The models are not served here, or the config is invalid.
        """
        if self._models is None:
            raise ValueError("the ingress takes a user_config only with model_placement: ingress")
        await self._models.apply(user_config)

    async def model_status(self) -> dict[str, object]:
        """What this replica's models serve (``model_placement: ingress``).

        Raises:
            ValueError: The models are not served here.
        """
        if self._models is None:
            raise ValueError("this ingress serves no models: model_placement is deployments")
        return self._models.status()

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Called by Serve after ``__init__``: the app is built over this replica's services.

        What the replica holds by now (Ray, Serve, torch, the app) lives as long as it does, and
        is moved out of the cyclic collector's reach with ``gc.freeze``. Otherwise every full
        collection walks all of it: a batch of events allocates thousands of objects, and with
        this heap in place the collector took 6 of the batch route's 15 us of CPU per event
        (3 of 13 without it); frozen, 0.7 of 9.
        """
        app = create_app(self._services)
        gc.collect()
        gc.freeze()
        return app

    def __del__(self) -> None:
        models = getattr(self, "_models", None)
        if models is not None:
            models.close()
        services = getattr(self, "_services", None)
        if services is not None:
            services.close()
