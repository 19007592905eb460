"""The scorer adapter for the ``ranker`` deployment, behind a circuit breaker.

Every call is reported to the breaker: a failure, or a call the runner cancelled because the
ranking budget ran out, counts against the ranker; a breaker that is open refuses the call at
once, and the runner serves the pre-score order (``ranker_prescore``) without waiting out the
budget. When the ranker answers that it has no model (no bundle registered yet), the adapter
stops asking for a few seconds and passes the pre-score order through: that is the normal mode
of a graph without a model, not a fallback.

The ranker's reply also carries the item embeddings of the best-scored candidates; they are put
on the candidates (``item:embedding``), so the diversity policy measures similarity with the
model's embeddings without another hop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from core.stages import StageDeclined
from core.types import Candidate, RequestContext
from deployments.recommender.scopes import RequestScopes
from deployments.wire import NO_MODEL, RankReply, RankRequest
from features.candidate_refs import ITEM_EMBEDDING
from features.user_context import model_profile, positive_history, profile_interests
from policies.circuit_breaker import CircuitBreaker
from policies.surfaces import RankerWeights

RankCall = Callable[[RankRequest], Awaitable[RankReply]]
"""Sends a request to the ranker deployment."""


class CircuitOpenError(StageDeclined):
    """The breaker in front of the ranker is open; the call was not made."""


class RankerClient:
    """What every surface's ranker adapter of a replica shares: the call, the breaker, the model state.

    Args:
        call: Sends a request to the ranker deployment.
        breaker: The breaker in front of it.
        scopes: Where the model version of a request is reported.
        no_model_recheck_s: How long to pass the pre-score order through after the ranker said it
            has no model, before asking again.
        clock: Monotonic clock (injectable for tests).
    """

    def __init__(
        self,
        call: RankCall,
        breaker: CircuitBreaker,
        scopes: RequestScopes,
        *,
        no_model_recheck_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.call = call
        self.breaker = breaker
        self.scopes = scopes
        self.no_model_recheck_s = no_model_recheck_s
        self._clock = clock
        self._no_model_until = float("-inf")
        self.last_version: str | None = None

    def has_no_model(self) -> bool:
        """Whether the ranker said recently that it has no model."""
        return self._clock() < self._no_model_until

    def note_no_model(self) -> None:
        """The ranker has no model: stop asking for a while."""
        self._no_model_until = self._clock() + self.no_model_recheck_s
        self.last_version = NO_MODEL


class RemoteRankerScorer:
    """The multi-task ranker of one surface (a ``Scorer``).

    Args:
        client: The replica's ranker client.
        weights: The surface's head weights.
        budget_ms: Time a call may take.
        embed_top_n: Best-scored candidates whose item embeddings come back (the diversity pool).
        name: Stage id.
    """

    def __init__(
        self,
        client: RankerClient,
        weights: RankerWeights,
        *,
        budget_ms: float,
        embed_top_n: int,
        name: str = "multi_task_ranker",
    ) -> None:
        self.name = name
        self.budget_ms = budget_ms
        self.embed_top_n = embed_top_n
        self._client = client
        self._weights = (weights.click, weights.like, weights.purchase, weights.watch)

    def _request(self, ctx: RequestContext, cands: list[Candidate]) -> RankRequest:
        return RankRequest(
            user_id=ctx.user_id,
            history=tuple(positive_history(ctx)),
            profile=model_profile(ctx),
            surface=ctx.surface,
            device=ctx.device,
            hour=ctx.now.hour,
            item_ids=tuple(c.item_id for c in cands),
            head_weights=self._weights,
            embed_top_n=self.embed_top_n,
            interests=profile_interests(ctx) if ctx.personalization else (),
        )

    async def score(self, ctx: RequestContext, cands: list[Candidate]) -> list[Candidate]:
        """Score the candidates with the ranker; same length and order as given.

        Raises:
            CircuitOpenError: The breaker refused the call.
            Exception: Whatever the call raised (counted by the breaker).
        """
        client = self._client
        if client.has_no_model():
            return cands
        if not client.breaker.allow():
            raise CircuitOpenError("the ranker's circuit breaker is open")
        started = time.perf_counter()
        try:
            reply = await client.call(self._request(ctx, cands))
        except asyncio.CancelledError:
            # The runner gave up at the end of the ranking budget: a timeout, for the breaker.
            client.breaker.record_failure()
            raise
        except Exception:
            client.breaker.record_failure()
            raise
        client.breaker.record_success()
        scope = client.scopes.get(ctx.request_id)
        if scope is not None:
            scope.hop_ms["ranker"] = (time.perf_counter() - started) * 1000.0 - reply.elapsed_ms
        if reply.scores is None:
            client.note_no_model()
            return cands
        if len(reply.scores) != len(cands):
            raise RuntimeError(f"the ranker returned {len(reply.scores)} scores for {len(cands)} candidates")
        client.last_version = reply.model_version
        if scope is not None:
            scope.ranker_version = reply.model_version
        for cand, value in zip(cands, reply.scores, strict=True):
            cand.score = value
            vector = reply.embeddings.get(cand.item_id)
            if vector is not None:
                cand.features = cand.features.with_values({ITEM_EMBEDDING: vector})
        return cands
