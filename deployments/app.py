"""``build_app``: the whole Serve application, referenced by ``ray_config.yaml``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from ray.serve import Application

from deployments.bundle_slot import ModelUserConfig
from deployments.ingress import Ingress
from deployments.ranker import Ranker
from deployments.recommender.options import ServingOptions
from deployments.retrieval import Retrieval
from deployments.stream_workers import StreamWorkers

_SETTINGS_FIELDS = ("home", "namespace", "redis_url")


class AppArgs(BaseModel):
    """Arguments of the Serve application (the ``args:`` block of ``ray_config.yaml``).

    Secrets (the admin token, client keys) are not arguments: they come from the replicas'
    ``RAYREC_*`` environment, so the config file can be committed.
    """

    model_config = ConfigDict(extra="forbid")

    home: str | None = None
    """Data home (lake, registry); ``$RAYREC_HOME`` when unset."""
    namespace: str | None = None
    """Redis key namespace; ``$RAYREC_NAMESPACE`` when unset."""
    redis_url: str | None = None
    """Online store URL; ``$RAYREC_REDIS_URL`` when unset."""
    serving: ServingOptions = ServingOptions()
    """The read path: surfaces file, sponsored campaigns, budgets, the ranker's circuit breaker."""
    model_placement: Literal["deployments", "ingress"] = "deployments"
    """Where the models run: their own ``retrieval`` and ``ranker`` deployments, or inside each
    ingress replica (``deployments.local_models``: no hops, for small nodes)."""

    def settings_overrides(self) -> dict[str, Any]:
        """The settings given here, to apply over each replica's environment."""
        return {k: v for k, v in self.model_dump(include=set(_SETTINGS_FIELDS)).items() if v is not None}


def build_app(args: dict[str, Any]) -> Application:
    """Bind the deployment graph.

    Args:
        args: The application arguments, validated as :class:`AppArgs`.

    Returns:
        The application for ``serve run`` / ``serve deploy``.
    """
    parsed = AppArgs.model_validate(args)
    overrides = parsed.settings_overrides()
    # serve.deployment turns the classes into Deployments at run time; their stubs do not say so.
    workers = StreamWorkers.bind(overrides)  # type: ignore[attr-defined]
    serving = parsed.serving.model_dump(mode="json")
    if parsed.model_placement == "ingress":
        # The models' user_config moves to the ingress; a config file's entry for it wins.
        ingress = Ingress.options(user_config=ModelUserConfig().model_dump())  # type: ignore[attr-defined]
        app: Application = ingress.bind(overrides, workers, None, None, serving, "ingress")
        return app
    retrieval = Retrieval.bind(overrides)  # type: ignore[attr-defined]
    ranker = Ranker.bind(overrides)  # type: ignore[attr-defined]
    app = Ingress.bind(overrides, workers, retrieval, ranker, serving)  # type: ignore[attr-defined]
    return app
