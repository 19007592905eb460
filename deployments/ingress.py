"""The HTTP ingress deployment: the FastAPI app of ``deployments.api`` behind Ray Serve."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from core.settings import Settings
from deployments.api.app import create_app
from deployments.api.services import ApiServices


@serve.deployment(name="ingress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.5})
@serve.ingress()
class Ingress:
    """Serves the HTTP API; every replica owns its own Redis pools.

    Args:
        settings_overrides: Values that win over the replica's ``RAYREC_*`` environment (secrets
            stay in the environment, never in the Serve config).
        stream_workers: Handle of the ``stream_workers`` deployment, for the admin stream report.
    """

    def __init__(
        self,
        settings_overrides: dict[str, Any] | None = None,
        stream_workers: DeploymentHandle[Any] | None = None,
    ) -> None:
        self._services = ApiServices.from_settings(Settings.from_env(None, **(settings_overrides or {})))
        if stream_workers is not None:
            workers = stream_workers

            async def stream_stats() -> dict[str, Any]:
                result: dict[str, Any] = await workers.stats.remote()
                return result

            self._services.stream_stats = stream_stats

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Called by Serve after ``__init__``: the app is built over this replica's services."""
        return create_app(self._services)

    def __del__(self) -> None:
        services = getattr(self, "_services", None)
        if services is not None:
            services.close()
