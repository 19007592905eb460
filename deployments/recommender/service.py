"""The recommendation service of the ingress: context, pipeline run, fallbacks, log.

One object per ingress replica. For each request it builds the frozen ``RequestContext`` (the
user's profile and features read once), runs the surface's pipeline with the one
``PipelineRunner``, and answers. When the pipeline fails (a required source failed, the
filter state could not be read, nothing came back), or was not run because every pipeline slot of
the replica stayed busy too long (``deployments.recommender.admission``), it serves, in order:

1. ``cached_list``: the list last served to this user on this surface (replica memory, then the
   Redis copy under a small budget);
2. ``popular``: the replica's in-memory popular list (trending, the release's popularity, the
   newest items), which needs nothing that can be down.

Every served list goes to the recommendation log (the impressions stream) after the answer is
computed, in the background; a failed append is counted, never raised.

The pipeline's stages run here, in the ingress, except the model-backed ones: the candidate sources
of the ``retrieval`` deployment (one hop per request for all of them) and the ``ranker``
(one hop, batched there). Redis-backed sources, the filters, feature hydration, the pre-score and
the re-ranking policies are cheaper than the hop to another deployment would be; README.md
("Serving graph") has the measurements.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from core.deadlines import within
from core.pipeline import (
    FilterStateError,
    PipelineResult,
    PipelineRunner,
    SkipReason,
    SourceFailedError,
    SurfacePipeline,
)
from core.schema import ExperimentArm, RecommendationLogEntry, ServedItem, utcnow
from core.stages import CandidateSource, FeatureHydrator, Scorer
from core.types import Candidate, RequestContext
from deployments.recommender.admission import PipelineSlots
from deployments.recommender.arms import ArmSurface, arm_surface
from deployments.recommender.explain import Trace, candidate_view, traced_pipeline
from deployments.recommender.heap import HeapFreezer
from deployments.recommender.metrics import ServingMetrics
from deployments.recommender.options import ServingOptions
from deployments.recommender.remote_ranker import RankerClient, RemoteRankerScorer
from deployments.recommender.remote_sources import RemoteRetrievalGroup
from deployments.recommender.scopes import RequestScopes
from deployments.wire import NO_MODEL, RankReply, RankRequest, RetrievalReply, RetrievalRequest
from features.catalog_cache import CatalogCache
from features.experiment_store import aload_experiments
from features.hydration import ItemFeatureHydrator
from features.last_served import LastServedLists, ServedEntry, ServedList
from features.online_store import OnlineFeatureStore
from features.popular_items import PopularItems
from features.recommendation_log import RecommendationLog
from features.redis_store import RedisStore
from features.request_context import RequestContextBuilder
from features.request_state import RequestStateLoader
from features.serving_state_hydrator import ServingStateHydrator
from features.user_context import positive_history
from policies.circuit_breaker import CircuitBreaker
from policies.experiments import ArmOverrides, Assignment, ExperimentSet, assign, merge_overrides
from policies.surfaces import (
    ComponentRegistry,
    SourceConfig,
    SurfaceConfig,
    build_pipeline,
    default_surface_configs,
    load_surface_configs,
)
from retrieval.sources.content_index import ContentIndex, acatalog_version
from retrieval.sources.content_source import ContentSource
from retrieval.sources.popular_fallback_source import PopularFallbackSource
from retrieval.sources.social_source import SocialSource
from retrieval.sources.sponsored_source import SponsoredSource
from retrieval.sources.trending_source import TrendingSource

logger = logging.getLogger(__name__)

CACHED_LIST: Final = "cached_list"
"""Fallback: the pipeline failed and the user's last list on the surface was served."""
POPULAR: Final = "popular"
"""Fallback: the pipeline failed, no last list was at hand, the popular list was served."""
USER_FEATURES_UNAVAILABLE: Final = "user_features_unavailable"
"""The user's profile and features could not be read; the list was made without them."""

ANONYMOUS_USER: Final = "anonymous"
"""User id of requests that name no user (item pages seen logged out)."""

MAX_ARM_PIPELINES: Final = 256
"""Arm pipelines kept per replica; more distinct (surface, overrides) pairs than this start afresh."""

POPULAR_REASON: Final = "Popular right now"
MODEL_SOURCES: Final = (
    "two_tower_ann",
    "collaborative",
    "item_to_item",
    "recently_viewed_related",
    "similar_items",
)
"""Sources served by the retrieval deployment (see :mod:`deployments.retrieval_model`)."""


class ModelGateway(Protocol):
    """The model deployments as the service calls them (``DeploymentHandle`` methods in a replica)."""

    def retrieve(self, request: RetrievalRequest) -> Awaitable[RetrievalReply]:
        """Run a request's model-backed sources."""
        ...

    def rank(self, request: RankRequest) -> Awaitable[RankReply]:
        """Score a request's candidates."""
        ...

    def popular(self, k: int) -> Awaitable[list[tuple[str, float]]]:
        """The serving release's most popular items."""
        ...

    def model_status(self) -> Awaitable[dict[str, Any]]:
        """What each model deployment serves, by deployment."""
        ...


def _late(error: BaseException) -> bool:
    """Whether a pipeline failed only because something was late."""
    if isinstance(error, TimeoutError):
        return True
    return isinstance(error, SourceFailedError | FilterStateError) and error.reason is SkipReason.TIMEOUT


class UnknownSurfaceError(ValueError):
    """The request names a surface this service does not serve."""


class EmptyListError(RuntimeError):
    """The pipeline ran and produced nothing to serve."""


@dataclass(frozen=True, slots=True)
class RecommendationQuery:
    """A validated request.

    Attributes:
        user_id: The user, or None for an anonymous request.
        surface: A configured surface.
        limit: Items wanted.
        item_id: Seed item (required by item-to-item surfaces).
        device: Device class.
        exclude_seen: Filter out what the user consumed in the session.
    """

    user_id: str | None
    surface: str
    limit: int
    item_id: str | None = None
    device: str | None = None
    exclude_seen: bool = True


@dataclass(frozen=True, slots=True)
class RecommendedItem:
    """One served item.

    Attributes:
        item_id: The item.
        score: Its final score.
        reason: Why it is there.
        position: 0-based position.
        sources: The candidate sources that produced it.
        propensity: Probability the serving policy had of showing it at this position.
    """

    item_id: str
    score: float
    reason: str
    position: int
    sources: tuple[str, ...]
    propensity: float


@dataclass(frozen=True, slots=True)
class Recommendation:
    """A served list and how it was made.

    Attributes:
        request_id: Id of the request (the join key of later events).
        user_id: The user it was served to.
        surface: The surface.
        model_version: Bundle version whose models made the list (``none`` without one).
        experiment_id: Experiment the request was assigned in.
        arm: Its arm.
        fallback: The degraded mode that shaped the list, if any.
        items: The list.
        skipped_sources: Sources skipped (late or failed), with the reason.
        total_ms: Time spent in the service.
        assignments: Every experiment the request was assigned in, one per layer, in layer order;
            ``experiment_id`` and ``arm`` are the first of them.
    """

    request_id: str
    user_id: str
    surface: str
    model_version: str
    experiment_id: str | None
    arm: str | None
    fallback: str | None
    items: list[RecommendedItem]
    skipped_sources: dict[str, str] = field(default_factory=dict)
    total_ms: float = 0.0
    assignments: tuple[Assignment, ...] = ()


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A request ready to run: its context, its experiment arms and the pipeline they select.

    Attributes:
        ctx: The request's context (experiment, arm and override parameters included).
        pipeline: The surface's pipeline, or its arm's variant.
        assignments: The user's experiment assignments.
        overrides: Their merged overrides.
        arm: How the overrides changed the surface; None when no override applies.
        user_read_ok: Whether the user's profile and features could be read.
    """

    ctx: RequestContext
    pipeline: SurfacePipeline
    assignments: tuple[Assignment, ...]
    overrides: ArmOverrides
    arm: ArmSurface | None
    user_read_ok: bool


def _items_of(cands: list[Candidate]) -> list[RecommendedItem]:
    return [
        RecommendedItem(
            item_id=c.item_id,
            score=float(c.score if c.score else c.retrieval_score),
            reason=c.reason or "Recommended for you",
            position=n,
            sources=tuple(c.sources),
            propensity=min(1.0, max(0.0, c.propensity)),
        )
        for n, c in enumerate(cands)
    ]


class _SurfaceHydrator:
    """A shared hydrator (one catalog cache and record memo per replica) under a surface's budget."""

    def __init__(self, inner: FeatureHydrator, budget_ms: float) -> None:
        self.name = inner.name
        self.budget_ms = budget_ms
        self._inner = inner

    async def hydrate(self, ctx: RequestContext, cands: list[Candidate]) -> list[Candidate]:
        """The inner hydrator's output (same length and order)."""
        return await self._inner.hydrate(ctx, cands)


def _list_key(query: RecommendationQuery, user_id: str) -> str:
    # A seeded surface's last list belongs to its seed item; '|' never occurs in ids.
    return user_id if query.item_id is None else f"{user_id}|{query.item_id}"


class RecommendationService:
    """Serves recommendation requests (see the module docstring).

    Args:
        store: The Redis store of the replica.
        gateway: The model deployments.
        options: The read path's options.
        stream_max_len: Cap of the impressions stream.
        surfaces: Surfaces served; from ``options.surfaces_path``, else the shipped ones.
        metrics: Where to record; a private registry when omitted.
    """

    def __init__(
        self,
        store: RedisStore,
        gateway: ModelGateway,
        options: ServingOptions | None = None,
        *,
        stream_max_len: int = 2_000_000,
        surfaces: Mapping[str, SurfaceConfig] | None = None,
        metrics: ServingMetrics | None = None,
    ) -> None:
        self.options = options or ServingOptions()
        self._store = store
        self._online = OnlineFeatureStore(store)
        self._gateway = gateway
        self.metrics = metrics or ServingMetrics()
        if surfaces is None:
            path = self.options.surfaces_path
            surfaces = load_surface_configs(Path(path)) if path else default_surface_configs()
        self.surfaces: dict[str, SurfaceConfig] = dict(surfaces)
        self._contexts = RequestContextBuilder(store, read_budget_ms=self.options.user_read_ms)
        self._runner = PipelineRunner()
        self.slots = PipelineSlots(self.options.pipeline_concurrency or 0, self.options.pipeline_wait_ms)
        self._scopes = RequestScopes()
        self.breaker = CircuitBreaker(self.options.breaker)
        self._ranker = RankerClient(gateway.rank, self.breaker, self._scopes)
        self._last = LastServedLists(store, max_entries=self.options.last_list_entries)
        self._popular = PopularItems(store, self._online, size=self.options.popular_size)
        self._log = RecommendationLog(store, max_stream_len=stream_max_len)
        self._cache = CatalogCache()
        self._content_index = ContentIndex.from_entries([])
        # Weak: arm pipelines come and go with experiments, and their sources with them.
        self._content_sources: weakref.WeakSet[ContentSource] = weakref.WeakSet()
        self._newest: list[str] = []
        self._state_loader = RequestStateLoader(store, self._cache)
        self._hydrators: dict[str, FeatureHydrator] = {
            "serving_state": ServingStateHydrator(self._state_loader),
            "item_features": ItemFeatureHydrator(
                store, self._cache, record_ttl_s=self.options.item_record_ttl_s
            ),
        }
        self.pipelines: dict[str, SurfacePipeline] = {
            name: build_pipeline(config, self._registry_for(config)) for name, config in self.surfaces.items()
        }
        self.experiments = ExperimentSet()
        self._arm_pipelines: dict[tuple[str, str], tuple[SurfacePipeline, ArmSurface]] = {}
        self._heap = HeapFreezer()
        self._start_lock = asyncio.Lock()
        self._started = False
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- wiring ----------------------------------------------------------------------------

    def _registry_for(self, config: SurfaceConfig) -> ComponentRegistry:
        group = RemoteRetrievalGroup(
            self._gateway.retrieve, self._scopes, hop_allowance_ms=self.options.hop_allowance_ms
        )
        store, online = self._store, self._online

        def limits(spec: SourceConfig) -> dict[str, Any]:
            return {"name": spec.name, "budget_ms": spec.budget_ms, "max_candidates": spec.max_candidates}

        def content(spec: SourceConfig) -> CandidateSource:
            source = ContentSource(self._content_index, store, **limits(spec))
            self._content_sources.add(source)
            return source

        sources: dict[str, Callable[[SourceConfig], CandidateSource]] = {
            name: group.source for name in MODEL_SOURCES
        }
        sources.update(
            {
                "content": content,
                "social": lambda spec: SocialSource(store, **limits(spec)),
                "trending": lambda spec: TrendingSource(online, **limits(spec)),
                "popular": lambda spec: self._popular.attach(PopularFallbackSource(**limits(spec))),
                "sponsored": lambda spec: SponsoredSource(self.options.sponsored, **limits(spec)),
            }
        )

        def ranker(surface: SurfaceConfig) -> Scorer:
            return RemoteRankerScorer(
                self._ranker,
                surface.ranker_weights,
                budget_ms=surface.budgets.ranking_ms,
                embed_top_n=surface.policy_params.diversity_pool_size,
            )

        # The feature read may use the feature stage's budget. The serving-state read fails the
        # request closed when it runs out, and a fallback list is then served instead of the
        # personal one, so it may use whatever is left of the request's total budget.
        budgets = {"serving_state": config.budgets.total_ms}
        hydrators = {
            name: _SurfaceHydrator(hydrator, budgets.get(name, config.budgets.features_ms))
            for name, hydrator in self._hydrators.items()
        }
        return ComponentRegistry.with_defaults(
            sources=sources, hydrators=hydrators, scorers={"multi_task_ranker": ranker}
        )

    # -- background refreshes ----------------------------------------------------------------

    async def start(self) -> None:
        """Load the content index and the popular list once, then keep refreshing them.

        Called by the first request; failures are logged and retried by the refresh loops, so a
        replica starts (and serves its fallbacks) while Redis is down.
        """
        if self._started:
            return
        async with self._start_lock:
            if self._started:
                return
            await self._refresh_catalog()
            await self._refresh_popular()
            await self._refresh_experiments()
            self._spawn(self._every(self.options.catalog_refresh_s, self._refresh_catalog))
            self._spawn(self._every(self.options.popular_refresh_s, self._refresh_popular))
            self._spawn(self._every(self.options.experiments_refresh_s, self._refresh_experiments))
            if self.options.heap_freeze_s > 0:
                self._heap.relax()
                await self._freeze_heap()
                self._spawn(self._every(self.options.heap_freeze_s, self._freeze_heap))
            self._started = True

    async def _every(self, period_s: float, job: Callable[[], Coroutine[Any, Any, None]]) -> None:
        while True:
            await asyncio.sleep(period_s)
            await job()

    async def _refresh_catalog(self) -> None:
        previous = self._content_index
        try:
            version = await acatalog_version(self._store)
            if version is not None and version == previous.version:
                return  # nothing written since the index was built
            index = await asyncio.to_thread(ContentIndex.load, self._store, previous=previous)
        except Exception as exc:  # Redis down: keep the previous index, try again later
            logger.warning("content index not refreshed: %s", exc)
            return
        self._content_index = index
        self._cache.back_with(index.entries)
        for source in self._content_sources:
            source.update_index(index)
        # Sorted by the loading thread: sorting 100k entries here held the event loop for 0.1 s.
        self._newest = list(index.newest[: self.options.popular_size])

    async def _freeze_heap(self) -> None:
        took_ms = self._heap.run()
        logger.debug("heap collected and frozen in %.1f ms (pass %d)", took_ms, self._heap.passes)

    async def _refresh_popular(self) -> None:
        try:
            model_popular = await asyncio.wait_for(self._gateway.popular(self.options.popular_size), 5.0)
        except Exception as exc:  # no retrieval replica yet: trending and recency still count
            logger.warning("model popularity not read: %s", exc)
            model_popular = []
        try:
            await self._popular.refresh(model_popular, self._newest, utcnow())
        except Exception as exc:
            logger.warning("popular list not refreshed: %s", exc)

    async def _refresh_experiments(self) -> None:
        try:
            registry = await aload_experiments(self._store)
        except Exception as exc:  # Redis down or a bad value: keep serving the last good set
            logger.warning("experiment configuration not refreshed: %s", exc)
            return
        self.experiments = registry.snapshot

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        # Held until done: the event loop keeps only weak references to tasks.
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop the refresh loops and any background write still pending (tests, shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- serving -----------------------------------------------------------------------------

    async def recommend(self, query: RecommendationQuery) -> Recommendation:
        """Serve one request; degraded modes are answers, not errors.

        The pipeline runs in one of the replica's slots (``self.slots``); a request that found
        none free within ``ServingOptions.pipeline_wait_ms`` is answered from the fallbacks
        without running it.

        Args:
            query: The validated request.

        Returns:
            The served list.

        Raises:
            UnknownSurfaceError: The surface is not configured.
        """
        started = time.perf_counter()
        admitted = await self.slots.enter()
        try:
            prepared = await self.prepare(query)
        except BaseException:
            if admitted:
                self.slots.leave()
            raise
        ctx = prepared.ctx
        request_id, user_id = ctx.request_id, ctx.user_id
        scope = self._scopes.open(request_id)
        result: PipelineResult | None = None
        try:
            if admitted:
                result = await self._runner.run(prepared.pipeline, ctx, self.metrics.observer(query.surface))
                if not result.candidates:
                    raise EmptyListError(f"surface {query.surface} produced no candidates")
            else:  # shed: answered from the fallbacks below, like a failed pipeline
                self.metrics.shed.labels(query.surface).inc()
        except Exception as exc:  # every failure of the pipeline has the same answer: a fallback
            # Lateness is routine under load and counted with the fallback (as the runner treats
            # a late stage); a warning per late request cost the overloaded replica more CPU,
            # since a replica's log lines go through Serve's stderr capture, which walks the stack.
            logger.log(
                logging.DEBUG if _late(exc) else logging.WARNING,
                "request %s on %s failed (%s: %s); serving a fallback",
                request_id,
                query.surface,
                type(exc).__name__,
                exc,
            )
            result = None
        finally:
            self._scopes.close(request_id)
            if admitted:
                self.slots.leave()

        fallbacks: list[str] = []
        if result is not None:
            items = _items_of(result.candidates)
            version = scope.ranker_version or scope.retrieval_version or NO_MODEL
            fallbacks.extend(result.fallbacks)
            skipped = {name: str(reason) for name, reason in result.skipped_sources.items()}
        else:
            items, kind, version = await self._last_resort(ctx, query)
            self.metrics.fallbacks.labels(query.surface, kind).inc()
            fallbacks.append(kind)
            skipped = {}
        if not prepared.user_read_ok and query.user_id is not None:
            self.metrics.fallbacks.labels(query.surface, USER_FEATURES_UNAVAILABLE).inc()
            fallbacks.append(USER_FEATURES_UNAVAILABLE)

        total_ms = (time.perf_counter() - started) * 1000.0
        answer = Recommendation(
            request_id=request_id,
            user_id=user_id,
            surface=query.surface,
            model_version=version,
            experiment_id=ctx.experiment_id,
            arm=ctx.arm,
            fallback=fallbacks[0] if fallbacks else None,
            items=items,
            skipped_sources=skipped,
            total_ms=total_ms,
            assignments=prepared.assignments,
        )
        self._record(answer, scope.hop_ms, from_pipeline=result is not None)
        self.metrics.served(answer, scope, self._content_index.entries, self._cache)
        self._after_serving(answer, _list_key(query, user_id), from_pipeline=result is not None, at=ctx)
        return answer

    async def prepare(self, query: RecommendationQuery) -> PreparedRequest:
        """Assign the request's experiment arms, build its context and pick its pipeline.

        Args:
            query: The validated request.

        Returns:
            The request ready for the runner.

        Raises:
            UnknownSurfaceError: The surface is not configured.
        """
        config = self.surfaces.get(query.surface)
        if config is None:
            raise UnknownSurfaceError(f"unknown surface {query.surface!r}; served: {sorted(self.surfaces)}")
        await self.start()
        assignments: tuple[Assignment, ...] = ()
        overrides = ArmOverrides()
        # Anonymous requests share one id: hashing it would put every logged-out visitor in one arm.
        if query.user_id is not None and self.experiments.experiments:
            assignments = tuple(assign(query.user_id, self.experiments, now=utcnow()))
            overrides = merge_overrides(assignments)
        first = assignments[0] if assignments else None
        built = await self._contexts.build(
            request_id=uuid.uuid4().hex,
            user_id=query.user_id or ANONYMOUS_USER,
            surface=query.surface,
            limit=query.limit,
            total_budget_ms=config.budgets.total_ms,
            item_id=query.item_id,
            device=query.device,
            exclude_seen=query.exclude_seen,
            read_user=query.user_id is not None,
            params=overrides.as_params(),
            experiment_id=None if first is None else first.experiment_id,
            arm=None if first is None else first.arm,
        )
        pipeline, arm = self._pipeline_for(config, overrides)
        return PreparedRequest(built.ctx, pipeline, assignments, overrides, arm, built.user_read_ok)

    def _pipeline_for(
        self, config: SurfaceConfig, overrides: ArmOverrides
    ) -> tuple[SurfacePipeline, ArmSurface | None]:
        """The surface's pipeline as the arm serves it, built once per (surface, overrides)."""
        default = self.pipelines[config.name]
        if not overrides.overridden():
            return default, None
        key = (config.name, overrides.model_dump_json())
        cached = self._arm_pipelines.get(key)
        if cached is not None:
            return cached
        try:
            variant = arm_surface(config, overrides)
            pipeline = (
                default
                if variant.config is config
                else build_pipeline(variant.config, self._registry_for(variant.config))
            )
        except Exception as exc:  # a bad arm must not fail requests: its users get the default
            logger.warning("arm overrides %s not applied on %s: %s", key[1], config.name, exc)
            variant = ArmSurface(config, {}, {"*": f"{type(exc).__name__}: {exc}"})
            pipeline = default
        if len(self._arm_pipelines) >= MAX_ARM_PIPELINES:
            self._arm_pipelines.clear()
        self._arm_pipelines[key] = (pipeline, variant)
        return pipeline, variant

    async def explain(self, query: RecommendationQuery) -> dict[str, Any]:
        """Run one request through its pipeline and report every stage (the debug route).

        The request is prepared and run exactly as :meth:`recommend` would (same arms, same
        pipeline, same budgets) through a traced copy of the pipeline; nothing is logged,
        remembered or counted, since nothing is served.

        Args:
            query: The validated request.

        Returns:
            The request, its experiment assignments and overrides, the stages in order with their
            candidates, the removals per filter, the skipped sources, the fallbacks and the
            final items (position, score, propensity, reason, sources and scalar features);
            ``error`` names the exception when the pipeline failed (a normal request would then
            have served a fallback list).

        Raises:
            UnknownSurfaceError: The surface is not configured.
        """
        prepared = await self.prepare(query)
        ctx = prepared.ctx
        trace = Trace()
        scope = self._scopes.open(ctx.request_id)
        error: str | None = None
        result: PipelineResult | None = None
        try:
            result = await self._runner.run(traced_pipeline(prepared.pipeline, trace), ctx)
        except Exception as exc:  # reported, not raised: explaining a failure is the point
            error = f"{type(exc).__name__}: {exc}"
        finally:
            self._scopes.close(ctx.request_id)
        arm = prepared.arm
        final = [] if result is None else result.candidates
        skipped = {} if result is None else result.skipped_sources
        failed = {} if result is None else result.failed_stages
        return {
            "requestId": ctx.request_id,
            "userId": ctx.user_id,
            "surface": ctx.surface,
            "limit": ctx.limit,
            "itemId": ctx.item_id,
            "device": ctx.device,
            "personalization": ctx.personalization,
            "modelVersion": scope.ranker_version or scope.retrieval_version or NO_MODEL,
            "experiments": [
                {
                    "experiment": a.experiment_id,
                    "layer": a.layer,
                    "arm": a.arm,
                    "overrides": a.overrides.model_dump(exclude_none=True),
                }
                for a in prepared.assignments
            ],
            "overrides": {
                "params": dict(ctx.params),
                "applied": {} if arm is None else arm.applied,
                "ignored": {} if arm is None else arm.ignored,
            },
            "sources": [s.name for s in prepared.pipeline.sources],
            "stages": trace.stages,
            "removedByFilter": trace.removed,
            "skippedSources": {k: str(v) for k, v in skipped.items()},
            "failedStages": {k: str(v) for k, v in failed.items()},
            "fallbacks": [] if result is None else list(result.fallbacks),
            "stageLatencyMs": {} if result is None else dict(result.stage_latency_ms),
            "error": error,
            "items": [
                {
                    **candidate_view(c, with_features=True),
                    "position": item.position,
                    "reason": item.reason,
                    "score": item.score,
                    "propensity": item.propensity,
                }
                for c, item in zip(final, _items_of(final), strict=True)
            ],
        }

    async def _last_resort(
        self, ctx: RequestContext, query: RecommendationQuery
    ) -> tuple[list[RecommendedItem], str, str]:
        key = _list_key(query, ctx.user_id)
        served = self._last.recall_local(query.surface, key)
        if served is None:
            served = await self._last.recall_remote(query.surface, key, self.options.fallback_read_ms)
        if served is not None and served.entries:
            kept = await self._still_servable(ctx, [e.item_id for e in served.entries])
            entries = [e for e in served.entries if e.item_id in kept][: query.limit]
            if entries:
                items = [
                    RecommendedItem(e.item_id, e.score, e.reason, n, e.sources, 1.0)
                    for n, e in enumerate(entries)
                ]
                return items, CACHED_LIST, served.model_version
        consumed = frozenset(positive_history(ctx))
        if query.item_id is not None:
            consumed |= {query.item_id}
        popular = self._popular.top(2 * query.limit, consumed)
        kept = await self._still_servable(ctx, [i for i, _ in popular])
        items = [
            RecommendedItem(item_id, score, POPULAR_REASON, n, ("popular",), 1.0)
            for n, (item_id, score) in enumerate([p for p in popular if p[0] in kept][: query.limit])
        ]
        return items, POPULAR, NO_MODEL

    async def _still_servable(self, ctx: RequestContext, item_ids: list[str]) -> frozenset[str]:
        """The ids that pass the removal, block and exclusion checks, when Redis answers in time.

        A fallback list was checked when it was made (the last list when it was served, the
        popular list when it was refreshed); when the state can be read now, it is checked again,
        so a removal or a "not interested" holds on fallbacks too. When it cannot, the list is
        served as it was checked last.
        """
        try:
            budget_s = self.options.fallback_read_ms / 1000.0
            state = await within(self._state_loader.load(ctx, item_ids), budget_s)
        except Exception:  # Redis down or late: the fallback must still answer
            return frozenset(item_ids)
        return frozenset(
            i
            for i in item_ids
            if i not in state.removed
            and i not in state.blocked_items
            and i not in state.excluded
            and not state.is_creator_blocked(i)
            and not state.is_creator_blocked_by_user(i)
        )

    def _record(self, answer: Recommendation, hop_ms: Mapping[str, float], *, from_pipeline: bool) -> None:
        m = self.metrics
        m.requests.labels(answer.surface, "pipeline" if from_pipeline else "fallback").inc()
        m.total_ms.labels(answer.surface).observe(answer.total_ms)
        m.sample("total", answer.total_ms)
        m.hops(hop_ms)
        m.breaker(self.breaker.snapshot())

    def _after_serving(
        self, answer: Recommendation, list_key: str, *, from_pipeline: bool, at: RequestContext
    ) -> None:
        if from_pipeline:
            served = ServedList(
                entries=tuple(ServedEntry(i.item_id, i.score, i.reason, i.sources) for i in answer.items),
                model_version=answer.model_version,
                served_at_s=at.now.timestamp(),
            )
            self._last.remember(answer.surface, list_key, served)
        entry = RecommendationLogEntry(
            request_id=answer.request_id,
            user_id=answer.user_id,
            surface=answer.surface,
            items=[
                ServedItem(
                    item_id=i.item_id,
                    position=i.position,
                    score=i.score,
                    sources=list(i.sources),
                    propensity=i.propensity,
                )
                for i in answer.items
            ],
            model_version=answer.model_version,
            experiment_id=answer.experiment_id,
            arm=answer.arm,
            experiments=[ExperimentArm(experiment_id=a.experiment_id, arm=a.arm) for a in answer.assignments],
            fallback=answer.fallback,
            served_at=at.now,
        )
        last = (answer.surface, list_key, served) if from_pipeline else None
        self._spawn(self._write_after(entry, last))

    async def _write_after(
        self, entry: RecommendationLogEntry, last: tuple[str, str, ServedList] | None
    ) -> None:
        """The Redis copy of the last list (when there is one) and the log entry, in one round trip."""
        pipe = self._store.aclient.pipeline(transaction=False)
        if last is not None:
            self._last.queue_save(pipe, *last)
        self._log.queue(pipe, entry)
        commands = 2 if last is not None else 1
        replies: list[Any]
        try:
            replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # neither may fail the request; both outcomes are accounted below
            replies = [exc] * commands
        if last is not None and isinstance(replies[0], BaseException):
            # The in-memory copy still serves this replica.
            logger.debug("last list of %s not saved to Redis: %s", last[1], replies[0])
        written = self._log.settle(entry, replies[-1])
        self.metrics.log_entries.labels("written" if written else "dropped").inc()

    # -- operators ---------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """What the replica serves and how it is doing, for the operator's status route."""
        try:
            models: dict[str, Any] = await asyncio.wait_for(self._gateway.model_status(), 5.0)
        except Exception as exc:
            models = {"error": f"{type(exc).__name__}: {exc}"}
        snapshot = self.breaker.snapshot()
        return {
            "surfaces": sorted(self.surfaces),
            "models": models,
            "rankerBreaker": {
                "state": snapshot.state.value,
                "recentFailures": snapshot.recent_failures,
                "recentCalls": snapshot.recent_calls,
                "openedTotal": snapshot.opened_total,
                "rejectedTotal": snapshot.rejected_total,
                "openForS": snapshot.open_for_s,
            },
            "pipelineSlots": {
                "concurrency": self.slots.concurrency,
                "running": self.slots.running,
                "waiting": self.slots.waiting,
                "refusedTotal": self.slots.refused,
            },
            "recommendationLog": {"written": self._log.written, "dropped": self._log.dropped},
            "lastLists": len(self._last),
            "popularItems": len(self._popular.items),
            "contentItems": len(self._content_index.entries),
            "latencyMs": self.metrics.medians(),
        }
