"""The model deployments behind ``DeploymentHandle``s, as the recommendation service calls them."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from ray.serve.handle import DeploymentHandle, DeploymentResponse

from deployments.wire import RankReply, RankRequest, RetrievalReply, RetrievalRequest


class HandleGateway:
    """A ``ModelGateway`` over the ``retrieval`` and ``ranker`` handles.

    Args:
        retrieval: Handle of the retrieval deployment.
        ranker: Handle of the ranker deployment.
    """

    def __init__(self, retrieval: DeploymentHandle[Any], ranker: DeploymentHandle[Any]) -> None:
        self._retrieval = retrieval
        self._ranker = ranker

    def retrieve(self, request: RetrievalRequest) -> DeploymentResponse[RetrievalReply]:
        """Run a request's model-backed sources (one hop)."""
        return cast(DeploymentResponse[RetrievalReply], self._retrieval.retrieve.remote(request))

    def rank(self, request: RankRequest) -> DeploymentResponse[RankReply]:
        """Score a request's candidates (one hop, batched on the far side)."""
        return cast(DeploymentResponse[RankReply], self._ranker.rank.remote(request))

    def popular(self, k: int) -> DeploymentResponse[list[tuple[str, float]]]:
        """The serving release's most popular items."""
        return cast(DeploymentResponse[list[tuple[str, float]]], self._retrieval.popular.remote(k))

    async def model_status(self) -> dict[str, Any]:
        """What a replica of each model deployment serves."""
        retrieval, ranker = await asyncio.gather(
            self._retrieval.model_status.remote(), self._ranker.model_status.remote()
        )
        return {"retrieval": retrieval, "ranker": ranker}
