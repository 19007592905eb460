"""A surface's pipeline as a value, and the one runner that executes it.

``SurfacePipeline`` lists the stages of one surface in run order, with budgets and the fail-open
set beside them. ``PipelineRunner`` holds all of the request path's control flow: concurrency,
timeouts, merging, contract checks and fallbacks. It knows nothing of Ray or Redis, so the same
code runs in unit tests and inside a Serve replica.

Run order: sources (concurrently) → merge and dedupe → filter-state hydrators → filters →
hydrators → pre-scorer → cut to ``ranker_input_size`` → scorer → policies → cut to ``ctx.limit``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from operator import attrgetter
from typing import Annotated, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.deadlines import within
from core.stages import (
    CandidateSource,
    FeatureHydrator,
    Filter,
    Policy,
    Scorer,
    StageContractError,
    StageDeclined,
    check_same_items,
)
from core.types import Candidate, RequestContext

logger = logging.getLogger(__name__)

_by_score = attrgetter("score")
_by_retrieval_score = attrgetter("retrieval_score")


class StageName(StrEnum):
    """Keys of ``PipelineResult.stage_latency_ms`` and of ``PipelineObserver.on_stage``."""

    CANDIDATES = "candidates"
    FILTER_STATE = "filter_state"
    FILTERS = "filters"
    FEATURES = "features"
    PRE_SCORE = "pre_score"
    SCORE = "score"
    RERANK = "rerank"


class SkipReason(StrEnum):
    """Why a source, hydrator or scorer's output was not used."""

    TIMEOUT = "timeout"
    ERROR = "error"
    CONTRACT = "contract"
    """The stage returned output that broke its contract (hydrators fail the request instead)."""


class FallbackKind(StrEnum):
    """Degraded modes a request can be served in; counted in metrics and marked in the response."""

    RANKER_PRESCORE = "ranker_prescore"
    """The scorer failed or was late; the pre-score order was served."""
    RANKER_RETRIEVAL = "ranker_retrieval"
    """The scorer failed or was late and no pre-score order existed; retrieval order was served."""
    PRESCORE_RETRIEVAL = "prescore_retrieval"
    """The pre-scorer failed or was late; retrieval order went on to the scorer."""
    FEATURES_PARTIAL = "features_partial"
    """A hydrator failed or was late; ranking ran without its features."""


class SourceFailedError(RuntimeError):
    """Raised by ``PipelineRunner.run`` when a source outside the fail-open set fails or is late.

    Attributes:
        source: Name of the source.
        reason: ``timeout`` or ``error``.
    """

    def __init__(self, source: str, reason: SkipReason) -> None:
        super().__init__(f"required candidate source {source!r} failed: {reason}")
        self.source = source
        self.reason = reason


class FilterStateError(RuntimeError):
    """Raised by ``PipelineRunner.run`` when a filter-state hydrator fails, is late or breaks its contract.

    Filters enforce removals, blocks and exclusions that must hold on every request (seed section
    18); without the state they read, the request fails rather than serve unchecked items.

    Attributes:
        stage: Name of the hydrator.
        reason: ``timeout``, ``error`` or ``contract``.
    """

    def __init__(self, stage: str, reason: SkipReason) -> None:
        super().__init__(f"filter-state hydrator {stage!r} failed: {reason}")
        self.stage = stage
        self.reason = reason


class StageBudgets(BaseModel):
    """Latency budgets of one pipeline, in milliseconds (seed defaults: 30/30/30/10 of 100)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    candidates_ms: Annotated[float, Field(gt=0)] = 30.0
    """All sources together; each source is also capped by its own ``budget_ms``."""

    features_ms: Annotated[float, Field(gt=0)] = 30.0
    """All hydrators together; they run one after another."""

    ranking_ms: Annotated[float, Field(gt=0)] = 30.0
    """Pre-scorer and scorer together."""

    rerank_ms: Annotated[float, Field(gt=0)] = 10.0
    """Policies and response assembly; measured, not preempted (policies are synchronous)."""

    total_ms: Annotated[float, Field(gt=0)] = 100.0
    """The whole run; the runner's deadline is the earlier of this and ``ctx.deadline``."""

    @model_validator(mode="after")
    def _stages_fit_total(self) -> StageBudgets:
        for stage in ("candidates_ms", "features_ms", "ranking_ms", "rerank_ms"):
            if getattr(self, stage) > self.total_ms:
                raise ValueError(f"{stage} ({getattr(self, stage)}) exceeds total_ms ({self.total_ms})")
        return self


def _check_unique(kind: str, names: Iterable[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"two {kind} are named {name!r}; names key metrics and must be unique")
        seen.add(name)


class SurfacePipeline(BaseModel):
    """The stages of one surface in run order, with budgets and failure policy.

    A value: build it once per surface (at startup or on reconfigure) and share it between
    requests. Stage objects are checked against their protocols when the pipeline is built.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    surface: Annotated[str, Field(min_length=1)]
    """Surface this pipeline serves (``home``, ``similar``, ...)."""

    sources: Annotated[tuple[CandidateSource, ...], Field(min_length=1)]
    """Candidate sources; all run concurrently. Their order breaks ties in the retrieval order."""

    filter_hydrators: tuple[FeatureHydrator, ...] = ()
    """Hydrators that run after the merge and before the filters, attaching what the filters read
    (removed, blocked and excluded flags). They fail closed: one that raises, is late or
    changes its input's length or order fails the request with ``FilterStateError``.
    Each is capped by its ``budget_ms`` and the run's deadline."""

    filters: tuple[Filter, ...] = ()
    """Filters in run order; put cheap ones first."""

    hydrators: tuple[FeatureHydrator, ...] = ()
    """Feature hydrators in run order, under the feature budget."""

    pre_scorer: Scorer | None = None
    """Cheap scorer that orders the whole filtered set before the cut to ``ranker_input_size``."""

    scorer: Scorer | None = None
    """The ranking model; its order is served unless it fails, then the pre-score order is."""

    policies: tuple[Policy, ...] = ()
    """Re-ranking policies in run order."""

    ranker_input_size: Annotated[int, Field(ge=1)] = 200
    """How many candidates, best first by pre-score (or retrieval score), reach the scorer."""

    budgets: StageBudgets = StageBudgets()
    """Per-stage latency budgets."""

    fail_open: frozenset[str] = frozenset()
    """Sources that are skipped when they fail or are late; any other source fails the request."""

    @model_validator(mode="after")
    def _check_stages(self) -> SurfacePipeline:
        _check_unique("sources", (s.name for s in self.sources))
        _check_unique("filters", (f.name for f in self.filters))
        _check_unique("hydrators", (h.name for h in (*self.filter_hydrators, *self.hydrators)))
        _check_unique("policies", (p.name for p in self.policies))
        unknown = self.fail_open - {s.name for s in self.sources}
        if unknown:
            raise ValueError(f"fail_open names sources not in this pipeline: {sorted(unknown)}")
        timed: list[CandidateSource | FeatureHydrator | Scorer] = [
            *self.sources,
            *self.filter_hydrators,
            *self.hydrators,
        ]
        timed += [s for s in (self.pre_scorer, self.scorer) if s is not None]
        for stage in timed:
            if not stage.budget_ms > 0:
                raise ValueError(f"stage {stage.name!r} has budget_ms {stage.budget_ms}; it must be positive")
        return self


class PipelineObserver(Protocol):
    """Receives what happens during a run, for metrics. Calls are synchronous; keep them cheap."""

    def on_stage(self, name: str, ms: float) -> None:
        """A stage finished after ``ms`` milliseconds; ``name`` is a ``StageName``."""
        ...

    def on_source(self, name: str, ms: float, count: int, error: str | None) -> None:
        """A source finished with ``count`` candidates, or was skipped (``error`` is the reason)."""
        ...

    def on_removed(self, filter_name: str, n: int) -> None:
        """A filter removed ``n`` candidates."""
        ...

    def on_fallback(self, kind: str) -> None:
        """The request fell back to a degraded mode; ``kind`` is a ``FallbackKind``."""
        ...


class NoopPipelineObserver:
    """The default observer: records nothing."""

    def on_stage(self, name: str, ms: float) -> None:
        """Ignore a stage latency."""

    def on_source(self, name: str, ms: float, count: int, error: str | None) -> None:
        """Ignore a source outcome."""

    def on_removed(self, filter_name: str, n: int) -> None:
        """Ignore a removal count."""

    def on_fallback(self, kind: str) -> None:
        """Ignore a fallback."""


@dataclass(frozen=True, slots=True)
class PipelineResult:
    """The outcome of one run: the served list and what it took to make it.

    Attributes:
        candidates: The final list, best first, at most ``ctx.limit`` long.
        stage_latency_ms: Milliseconds per ``StageName`` that ran.
        source_latency_ms: Milliseconds per source, skipped ones included.
        source_counts: Candidates each source returned (before dedupe); 0 for skipped ones.
        skipped_sources: Fail-open sources that were skipped, with ``timeout`` or ``error``.
        removed_by_filter: Candidates removed per filter name.
        fallbacks: Degraded modes used, in the order they happened (``FallbackKind`` values).
        failed_stages: Hydrators and scorers whose output was not used, with the reason.
        contract_violations: Messages of stage contract violations that were tolerated.
        total_ms: Milliseconds the whole run took.
    """

    candidates: list[Candidate]
    stage_latency_ms: dict[str, float]
    source_latency_ms: dict[str, float]
    source_counts: dict[str, int]
    skipped_sources: dict[str, SkipReason]
    removed_by_filter: dict[str, int]
    fallbacks: list[str]
    failed_stages: dict[str, SkipReason]
    contract_violations: list[str]
    total_ms: float

    @property
    def fallback(self) -> str | None:
        """The first fallback used, for the response's ``fallback`` field; None when none was."""
        return self.fallbacks[0] if self.fallbacks else None


def _elapsed_ms(started: float) -> float:
    return (time.monotonic() - started) * 1000.0


def _timeout_s(stage_end: float, budget_ms: float) -> float:
    return max(0.0, min(stage_end - time.monotonic(), budget_ms / 1000.0))


class _RunRecorder:
    """Collects one run's measurements and forwards each to the observer as it happens."""

    def __init__(self, observer: PipelineObserver) -> None:
        self.observer = observer
        self.stage_latency_ms: dict[str, float] = {}
        self.source_latency_ms: dict[str, float] = {}
        self.source_counts: dict[str, int] = {}
        self.skipped_sources: dict[str, SkipReason] = {}
        self.removed_by_filter: dict[str, int] = {}
        self.fallbacks: list[str] = []
        self.failed_stages: dict[str, SkipReason] = {}
        self.contract_violations: list[str] = []

    def stage(self, name: StageName, ms: float) -> None:
        self.stage_latency_ms[name] = ms
        self.observer.on_stage(name, ms)

    def source(self, name: str, ms: float, count: int, skipped: SkipReason | None) -> None:
        self.source_latency_ms[name] = ms
        self.source_counts[name] = count
        if skipped is not None:
            self.skipped_sources[name] = skipped
        self.observer.on_source(name, ms, count, skipped)

    def removed(self, filter_name: str, n: int) -> None:
        self.removed_by_filter[filter_name] = n
        self.observer.on_removed(filter_name, n)

    def fallback(self, kind: FallbackKind) -> None:
        # One degraded mode counts once per request, however many stages caused it.
        if kind not in self.fallbacks:
            self.fallbacks.append(kind)
            self.observer.on_fallback(kind)

    def failed(self, stage: str, reason: SkipReason, error: BaseException) -> None:
        self.failed_stages[stage] = reason
        if isinstance(error, StageContractError):
            self.contract_violations.append(str(error))

    def result(self, candidates: list[Candidate], total_ms: float) -> PipelineResult:
        return PipelineResult(
            candidates=candidates,
            stage_latency_ms=self.stage_latency_ms,
            source_latency_ms=self.source_latency_ms,
            source_counts=self.source_counts,
            skipped_sources=self.skipped_sources,
            removed_by_filter=self.removed_by_filter,
            fallbacks=self.fallbacks,
            failed_stages=self.failed_stages,
            contract_violations=self.contract_violations,
            total_ms=total_ms,
        )


@dataclass(slots=True)
class _SourceOutcome:
    ms: float
    cands: list[Candidate]
    skipped: SkipReason | None
    error: BaseException | None


def _skip_reason(error: BaseException) -> SkipReason:
    if isinstance(error, StageContractError):
        return SkipReason.CONTRACT
    if isinstance(error, TimeoutError):
        return SkipReason.TIMEOUT
    return SkipReason.ERROR


def _log_failure(stage: str, reason: SkipReason, error: BaseException) -> None:
    # Lateness and declining are routine under load and already counted; errors need their
    # traceback.
    if reason is SkipReason.TIMEOUT:
        logger.debug("stage %s was late and was skipped", stage)
    elif isinstance(error, StageDeclined):
        logger.debug("stage %s declined (%s) and was skipped", stage, error)
    else:
        logger.warning("stage %s failed (%s) and was skipped", stage, reason, exc_info=error)


def _check_finite_scores(stage: str, cands: Sequence[Candidate]) -> None:
    for cand in cands:
        if not math.isfinite(cand.score):
            raise StageContractError(stage, f"scored {cand.item_id!r} {cand.score}; scores must be finite")


def _merge_sources(outputs: Sequence[tuple[str, list[Candidate]]]) -> list[Candidate]:
    """Dedupe by item id, keeping every producing source, in retrieval order."""
    by_item: dict[str, Candidate] = {}
    for source_name, cands in outputs:
        for cand in cands:
            # Sources need not stamp themselves; the runner knows who produced what.
            if source_name not in cand.sources:
                cand.sources.append(source_name)
            first = by_item.get(cand.item_id)
            if first is None:
                by_item[cand.item_id] = cand
            else:
                first.merge(cand)
    # Stable: among equal scores, earlier sources in the pipeline and better positions win.
    return sorted(by_item.values(), key=_by_retrieval_score, reverse=True)


class PipelineRunner:
    """Runs a ``SurfacePipeline`` for one request.

    Stateless apart from its observer, so one runner serves concurrent requests. ``run`` is a
    coroutine: await it from an async Serve deployment, or ``asyncio.run`` it in-process.

    Budgets: each stage ends at the earlier of its own budget and the run's deadline (the earlier
    of ``ctx.deadline`` and start + ``budgets.total_ms``); each source, hydrator and scorer is
    further capped by its ``budget_ms``. Filters and policies are synchronous and only measured.

    Failure policy:
        - A source that raises or is late is skipped if it is in ``fail_open``; otherwise
          ``run`` raises ``SourceFailedError``.
        - A filter-state hydrator that raises, is late or breaks its contract fails the request
          with ``FilterStateError``: filters must never run without the state they enforce.
        - A hydrator that raises or is late is skipped (fallback ``features_partial``); one that
          changes the length or order of its input raises ``StageContractError``.
        - A pre-scorer or scorer that raises, is late, or breaks its contract (length, order,
          finite scores) is ignored and the previous order is served (fallbacks
          ``prescore_retrieval``, ``ranker_prescore`` or ``ranker_retrieval``); contract
          violations are recorded in the result. Scorers work on copies, so a late one cannot
          leave partial scores on the served list.
        - A filter whose kept and removed lists do not add up to its input raises
          ``StageContractError``; filters and policies that raise fail the request.
    """

    def __init__(self, observer: PipelineObserver | None = None) -> None:
        """Create a runner.

        Args:
            observer: Receives stage, source, filter and fallback events; a no-op when omitted.
        """
        self._observer: PipelineObserver = observer if observer is not None else NoopPipelineObserver()

    async def run(
        self, pipeline: SurfacePipeline, ctx: RequestContext, observer: PipelineObserver | None = None
    ) -> PipelineResult:
        """Run ``pipeline`` for ``ctx``.

        Args:
            pipeline: The surface's stages, budgets and fail-open set.
            ctx: The request.
            observer: Overrides the runner's observer for this run (e.g. one bound to labels).

        Returns:
            The served list (at most ``ctx.limit`` items) with latencies, skips, removals and
            fallbacks.

        Raises:
            SourceFailedError: A source outside ``pipeline.fail_open`` failed or was late.
            StageContractError: A filter or hydrator broke its contract.
            FilterStateError: A filter-state hydrator failed, was late or broke its contract.
        """
        rec = _RunRecorder(observer if observer is not None else self._observer)
        started = time.monotonic()
        deadline = min(ctx.deadline, started + pipeline.budgets.total_ms / 1000.0)

        cands = await self._retrieve(pipeline, ctx, deadline, rec)
        cands = await self._load_filter_state(pipeline, ctx, cands, deadline, rec)
        cands = self._filter(pipeline, ctx, cands, rec)
        cands = await self._hydrate(pipeline, ctx, cands, deadline, rec)
        cands = await self._rank(pipeline, ctx, cands, deadline, rec)

        rerank_started = time.monotonic()
        for policy in pipeline.policies:
            cands = policy.apply(ctx, cands)
        rec.stage(StageName.RERANK, _elapsed_ms(rerank_started))

        return rec.result(cands[: ctx.limit], _elapsed_ms(started))

    async def _retrieve(
        self, pipeline: SurfacePipeline, ctx: RequestContext, deadline: float, rec: _RunRecorder
    ) -> list[Candidate]:
        started = time.monotonic()
        stage_end = min(deadline, started + pipeline.budgets.candidates_ms / 1000.0)
        outcomes = await asyncio.gather(*(self._fetch(source, ctx, stage_end) for source in pipeline.sources))

        required_failure: tuple[str, SkipReason, BaseException | None] | None = None
        outputs: list[tuple[str, list[Candidate]]] = []
        for source, outcome in zip(pipeline.sources, outcomes, strict=True):
            if outcome.skipped is None:
                rec.source(source.name, outcome.ms, len(outcome.cands), None)
                outputs.append((source.name, outcome.cands))
                continue
            rec.source(source.name, outcome.ms, 0, outcome.skipped)
            if source.name not in pipeline.fail_open and required_failure is None:
                required_failure = (source.name, outcome.skipped, outcome.error)
        rec.stage(StageName.CANDIDATES, _elapsed_ms(started))
        if required_failure is not None:
            name, reason, error = required_failure
            raise SourceFailedError(name, reason) from error
        return _merge_sources(outputs)

    async def _fetch(self, source: CandidateSource, ctx: RequestContext, stage_end: float) -> _SourceOutcome:
        started = time.monotonic()
        try:
            # A source only reads: when late it is left behind, not waited for (core.deadlines).
            cands = await within(source.fetch(ctx), _timeout_s(stage_end, source.budget_ms))
        except Exception as exc:
            reason = _skip_reason(exc)
            _log_failure(source.name, reason, exc)
            return _SourceOutcome(_elapsed_ms(started), [], reason, exc)
        return _SourceOutcome(_elapsed_ms(started), cands, None, None)

    async def _load_filter_state(
        self,
        pipeline: SurfacePipeline,
        ctx: RequestContext,
        cands: list[Candidate],
        deadline: float,
        rec: _RunRecorder,
    ) -> list[Candidate]:
        if not pipeline.filter_hydrators or not cands:
            return cands
        started = time.monotonic()
        for hydrator in pipeline.filter_hydrators:
            try:
                hydrated = await asyncio.wait_for(
                    hydrator.hydrate(ctx, cands), _timeout_s(deadline, hydrator.budget_ms)
                )
                check_same_items(hydrator.name, cands, hydrated)
            except Exception as exc:
                reason = _skip_reason(exc)
                rec.failed(hydrator.name, reason, exc)
                raise FilterStateError(hydrator.name, reason) from exc
            cands = hydrated
        rec.stage(StageName.FILTER_STATE, _elapsed_ms(started))
        return cands

    def _filter(
        self, pipeline: SurfacePipeline, ctx: RequestContext, cands: list[Candidate], rec: _RunRecorder
    ) -> list[Candidate]:
        started = time.monotonic()
        for candidate_filter in pipeline.filters:
            result = candidate_filter.apply(ctx, cands)
            if len(result.kept) + len(result.removed) != len(cands):
                raise StageContractError(
                    candidate_filter.name,
                    f"kept {len(result.kept)} and removed {len(result.removed)} of {len(cands)} candidates",
                )
            rec.removed(candidate_filter.name, len(result.removed))
            cands = result.kept
        rec.stage(StageName.FILTERS, _elapsed_ms(started))
        return cands

    async def _hydrate(
        self,
        pipeline: SurfacePipeline,
        ctx: RequestContext,
        cands: list[Candidate],
        deadline: float,
        rec: _RunRecorder,
    ) -> list[Candidate]:
        started = time.monotonic()
        stage_end = min(deadline, started + pipeline.budgets.features_ms / 1000.0)
        for hydrator in pipeline.hydrators if cands else ():
            try:
                hydrated = await asyncio.wait_for(
                    hydrator.hydrate(ctx, cands), _timeout_s(stage_end, hydrator.budget_ms)
                )
            except Exception as exc:
                reason = _skip_reason(exc)
                _log_failure(hydrator.name, reason, exc)
                rec.failed(hydrator.name, reason, exc)
                rec.fallback(FallbackKind.FEATURES_PARTIAL)
                continue
            # Outside the try: a hydrator that loses or reorders items is a bug, not an outage.
            check_same_items(hydrator.name, cands, hydrated)
            cands = hydrated
        rec.stage(StageName.FEATURES, _elapsed_ms(started))
        return cands

    async def _rank(
        self,
        pipeline: SurfacePipeline,
        ctx: RequestContext,
        cands: list[Candidate],
        deadline: float,
        rec: _RunRecorder,
    ) -> list[Candidate]:
        stage_end = min(deadline, time.monotonic() + pipeline.budgets.ranking_ms / 1000.0)
        prescored = False
        if pipeline.pre_scorer is not None and cands:
            started = time.monotonic()
            scored = await self._score(pipeline.pre_scorer, ctx, cands, stage_end, rec)
            rec.stage(StageName.PRE_SCORE, _elapsed_ms(started))
            if scored is None:
                rec.fallback(FallbackKind.PRESCORE_RETRIEVAL)
            else:
                cands = sorted(scored, key=_by_score, reverse=True)
                prescored = True
        cands = cands[: pipeline.ranker_input_size]

        if pipeline.scorer is not None and cands:
            started = time.monotonic()
            scored = await self._score(pipeline.scorer, ctx, cands, stage_end, rec)
            rec.stage(StageName.SCORE, _elapsed_ms(started))
            if scored is None:
                rec.fallback(FallbackKind.RANKER_PRESCORE if prescored else FallbackKind.RANKER_RETRIEVAL)
            else:
                cands = sorted(scored, key=_by_score, reverse=True)
        return cands

    async def _score(
        self,
        scorer: Scorer,
        ctx: RequestContext,
        cands: list[Candidate],
        stage_end: float,
        rec: _RunRecorder,
    ) -> list[Candidate] | None:
        """The scorer's output, or None when it failed, was late or broke its contract."""
        given = [cand.copy() for cand in cands]
        try:
            scored = await asyncio.wait_for(scorer.score(ctx, given), _timeout_s(stage_end, scorer.budget_ms))
            check_same_items(scorer.name, cands, scored)
            _check_finite_scores(scorer.name, scored)
        except Exception as exc:
            reason = _skip_reason(exc)
            _log_failure(scorer.name, reason, exc)
            rec.failed(scorer.name, reason, exc)
            return None
        return scored
