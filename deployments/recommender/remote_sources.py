"""Candidate-source adapters for the sources the ``retrieval`` deployment serves.

A surface's model-backed sources (``two_tower_ann``, ``collaborative``, ``item_to_item``,
``recently_viewed_related``, ``similar_items``) make ONE call per request, not one each: the first
adapter the runner starts sends the request with every model source of the surface, the others
await the same reply. A hop
costs a few milliseconds of latency and CPU on both sides; four parallel hops would cost four
times the CPU for no latency gain.

Sharing one call means sharing one deadline: each adapter reports the largest budget of the group
as its own, and the retrieval deployment enforces each source's own budget inside (less a hop
allowance), returning whatever finished in time and naming what did not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from core.types import Candidate, RequestContext
from deployments.recommender.scopes import RequestScope, RequestScopes
from deployments.wire import RetrievalReply, RetrievalRequest, SourceSpec
from policies.surfaces import SourceConfig

RetrievalCall = Callable[[RetrievalRequest], Awaitable[RetrievalReply]]
"""Sends a request to the retrieval deployment (a ``DeploymentHandle`` method, or a function in tests)."""


class RemoteSourceError(RuntimeError):
    """The retrieval deployment ran the source and it failed there.

    Attributes:
        source: The source.
    """

    def __init__(self, source: str, detail: str) -> None:
        super().__init__(f"remote source {source!r} failed: {detail}")
        self.source = source


class RemoteRetrievalGroup:
    """The model-backed sources of one surface, fetched with one call per request.

    Args:
        call: Sends a request to the retrieval deployment.
        scopes: Where a request's shared call is kept.
        hop_allowance_ms: Subtracted from each source's budget on the far side, so its answer
            arrives before the ingress stops waiting.
    """

    def __init__(self, call: RetrievalCall, scopes: RequestScopes, *, hop_allowance_ms: float = 3.0) -> None:
        self._call = call
        self._scopes = scopes
        self._hop_allowance_ms = hop_allowance_ms
        self._specs: list[SourceSpec] = []

    @property
    def budget_ms(self) -> float:
        """The group's budget: the largest of its sources'."""
        return max((s.budget_ms for s in self._specs), default=1.0)

    def source(self, config: SourceConfig) -> RemoteSource:
        """Add a source of the surface to the group (a ``SourceFactory`` for the registry).

        Args:
            config: The source's config in the surface.

        Returns:
            Its adapter.
        """
        if any(s.name == config.name for s in self._specs):
            raise ValueError(f"source {config.name!r} is already in this group")
        self._specs.append(SourceSpec(config.name, config.max_candidates, config.budget_ms))
        return RemoteSource(config.name, config.max_candidates, self)

    def _request(self, ctx: RequestContext) -> RetrievalRequest:
        far = tuple(
            SourceSpec(s.name, s.max_candidates, max(1.0, s.budget_ms - self._hop_allowance_ms))
            for s in self._specs
        )
        return RetrievalRequest.of(ctx, far)

    async def _timed(self, ctx: RequestContext, scope: RequestScope | None) -> RetrievalReply:
        started = time.perf_counter()
        reply = await self._call(self._request(ctx))
        if scope is not None:
            scope.hop_ms["retrieval"] = (time.perf_counter() - started) * 1000.0 - reply.elapsed_ms
            scope.retrieval_version = reply.model_version
        return reply

    async def reply(self, ctx: RequestContext) -> RetrievalReply:
        """The request's retrieval reply: started by the first adapter, awaited by all.

        Args:
            ctx: The request.

        Returns:
            The reply.
        """
        scope = self._scopes.get(ctx.request_id)
        if scope is None:
            return await self._timed(ctx, None)
        if scope.retrieval is None:
            scope.retrieval = asyncio.ensure_future(self._timed(ctx, scope))
        # Shielded: one adapter running out of time must not cancel the call the others await.
        return await asyncio.shield(scope.retrieval)


class RemoteSource:
    """One model-backed source, as the pipeline sees it (a ``CandidateSource``).

    Args:
        name: Stage id.
        max_candidates: Candidates it returns at most.
        group: The surface's group that makes the call.
    """

    def __init__(self, name: str, max_candidates: int, group: RemoteRetrievalGroup) -> None:
        self.name = name
        self.max_candidates = max_candidates
        self._group = group

    @property
    def budget_ms(self) -> float:
        """The group's budget (see the module docstring)."""
        return self._group.budget_ms

    async def fetch(self, ctx: RequestContext) -> list[Candidate]:
        """This source's candidates from the request's shared call.

        Raises:
            TimeoutError: The source ran out of time in the retrieval deployment.
            RemoteSourceError: It failed there.
        """
        reply = await self._group.reply(ctx)
        error = reply.errors.get(self.name)
        if error == "timeout":
            raise TimeoutError(f"remote source {self.name!r} was late")
        if error is not None:
            raise RemoteSourceError(self.name, error)
        return reply.candidates.get(self.name, [])
