"""Options of the read path, given in the ``serving`` block of the application's args."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from policies.circuit_breaker import CircuitBreakerConfig
from retrieval.sources.sponsored_source import SponsoredConfig


class ServingOptions(BaseModel):
    """How the ingress serves recommendations (``args.serving`` in ``ray_config.yaml``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    surfaces_path: str | None = None
    """YAML file of surfaces (``policies/surfaces.yaml`` format) served instead of the shipped ones;
    relative paths are taken from the working directory of the replicas (the repository root)."""

    sponsored: SponsoredConfig = SponsoredConfig()
    """Sponsored campaigns the ``sponsored`` source serves."""

    user_read_ms: Annotated[float, Field(gt=0, le=1000)] = 15.0
    """Budget of the one read of the user's profile and features; late means served without them."""

    fallback_read_ms: Annotated[float, Field(gt=0, le=1000)] = 10.0
    """Budget of the read of the user's last list from Redis when the pipeline failed."""

    popular_refresh_s: Annotated[float, Field(gt=0)] = 30.0
    """How often the in-memory popular list is rebuilt."""

    popular_size: Annotated[int, Field(ge=10, le=10_000)] = 300
    """Items in the popular list."""

    catalog_refresh_s: Annotated[float, Field(gt=0)] = 60.0
    """How often the content index is rebuilt from the catalog."""

    heap_freeze_s: Annotated[float, Field(ge=0)] = 10.0
    """How often the long-lived heap is collected and frozen (:mod:`deployments.recommender.heap`);
    0 leaves the collector as Python sets it."""

    experiments_refresh_s: Annotated[float, Field(gt=0)] = 1.0
    """How often the experiment configuration is re-read from Redis; a failed read keeps the last one."""

    item_record_ttl_s: Annotated[float, Field(ge=0, le=60)] = 1.0
    """How long an item or creator serving record read for one request, and each candidate's map
    merged from it, are reused by the replica's next requests
    (:class:`features.hydration.ItemFeatureHydrator`); engagement features lag by at most this long,
    and catalog fields by at most this long behind the catalog cache. 0 reads and merges them on
    every request."""

    last_list_entries: Annotated[int, Field(ge=1)] = 20_000
    """Users whose last list the replica keeps in memory, per surface together."""

    pipeline_concurrency: Annotated[int, Field(ge=0, le=1024)] | None = None
    """Requests whose pipelines one replica runs at once; later ones wait in arrival order
    (:mod:`deployments.recommender.admission`). 0: no limit. Unset, it follows the model
    placement (:meth:`for_placement`): 1 with the models in the process, no limit with the model
    deployments, whose hops leave the replica waiting while other requests can use it."""

    pipeline_wait_ms: Annotated[float, Field(ge=0, le=10_000)] = 50.0
    """Longest wait for a pipeline slot; a request that waited longer is answered from the
    fallbacks (the user's last list, then popular items) without running its pipeline."""

    hop_allowance_ms: Annotated[float, Field(ge=0, le=50)] = 3.0
    """Taken off each remote source's budget on the far side, for the way back."""

    breaker: CircuitBreakerConfig = CircuitBreakerConfig()
    """The circuit breaker in front of the ranker."""

    def for_placement(self, *, models_in_process: bool) -> ServingOptions:
        """These options with ``pipeline_concurrency`` set for where the models run, if unset.

        Args:
            models_in_process: Whether the models run in the serving process itself.

        Returns:
            The options with a concrete ``pipeline_concurrency``.
        """
        if self.pipeline_concurrency is not None:
            return self
        return self.model_copy(update={"pipeline_concurrency": 1 if models_in_process else 0})
