"""The explanation of one request: every stage's output, every removal and why each item is there.

:func:`traced_pipeline` wraps each stage of a pipeline in a recorder and returns a copy of the
pipeline made of the wrappers; the one :class:`~core.pipeline.PipelineRunner` runs it like any
other, so the explanation shows the real control flow (budgets, skips, fallbacks). Only the debug
route builds traced pipelines: the normal request path runs the plain one and pays nothing.

Stage entries, in run order: each source's output, the merged and deduplicated set, each
filter-state hydrator, each filter (the ids it removed), each feature hydrator, the pre-scorer, the
scorer and each policy. A stage that failed or was late has no entry (its skip is reported
beside the stages).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from core.pipeline import SurfacePipeline
from core.stages import CandidateSource, FeatureHydrator, Filter, Policy, Scorer
from core.types import Candidate, FilterResult, RequestContext

FEATURES_FROM = "features"
"""Stage kind from which on candidates carry their scalar features in the explanation."""


def _scalar(value: Any) -> bool:
    return isinstance(value, bool | int | str) or (isinstance(value, float) and math.isfinite(value))


def candidate_view(cand: Candidate, *, with_features: bool) -> dict[str, Any]:
    """A candidate as shown in the explanation (a copy: later stages change candidates in place).

    Args:
        cand: The candidate.
        with_features: Include its scalar features (vectors are left out: long and unreadable).

    Returns:
        Its id, sources, scores, propensity and reason, and its features when asked.
    """
    view: dict[str, Any] = {
        "itemId": cand.item_id,
        "sources": list(cand.sources),
        "retrievalScore": cand.retrieval_score,
        "score": cand.score,
        "propensity": cand.propensity,
        "reason": cand.reason,
    }
    if with_features:
        view["features"] = {ref: value for ref, value in cand.features.items() if _scalar(value)}
    return view


@dataclass
class Trace:
    """What the traced stages saw, in the order they ran.

    Attributes:
        stages: One entry per stage that produced output.
        removed: Item ids removed per filter.
        merged: Whether the merged set was recorded (it is the input of the first stage after
            the sources).
        hydrated: Whether feature hydration has run, after which candidates carry features.
    """

    stages: list[dict[str, Any]] = field(default_factory=list)
    removed: dict[str, list[str]] = field(default_factory=dict)
    merged: bool = False
    hydrated: bool = False

    def record(self, kind: str, name: str, cands: list[Candidate], **extra: Any) -> None:
        """Add a stage entry holding its output."""
        with_features = self.hydrated or kind == FEATURES_FROM
        self.stages.append(
            {
                "stage": kind,
                "name": name,
                "count": len(cands),
                "candidates": [candidate_view(c, with_features=with_features) for c in cands],
                **extra,
            }
        )

    def merge_seen(self, cands: list[Candidate]) -> None:
        """Record the merged set, once, from the input of the first stage after the sources."""
        if not self.merged:
            self.merged = True
            self.record("merge", "merge", cands)


class _Source:
    def __init__(self, inner: CandidateSource, trace: Trace) -> None:
        self.name = inner.name
        self._inner = inner
        self._trace = trace

    @property
    def budget_ms(self) -> float:
        return self._inner.budget_ms

    async def fetch(self, ctx: RequestContext) -> list[Candidate]:
        cands = await self._inner.fetch(ctx)
        # Sources run concurrently; their entries are in the order they finished.
        self._trace.record("source", self.name, cands)
        return cands


class _Hydrator:
    def __init__(self, inner: FeatureHydrator, trace: Trace, kind: str) -> None:
        self.name = inner.name
        self._inner = inner
        self._trace = trace
        self._kind = kind

    @property
    def budget_ms(self) -> float:
        return self._inner.budget_ms

    async def hydrate(self, ctx: RequestContext, cands: list[Candidate]) -> list[Candidate]:
        self._trace.merge_seen(cands)
        out = await self._inner.hydrate(ctx, cands)
        if self._kind == FEATURES_FROM:
            self._trace.hydrated = True
        self._trace.record(self._kind, self.name, out)
        return out


class _Filter:
    def __init__(self, inner: Filter, trace: Trace) -> None:
        self.name = inner.name
        self._inner = inner
        self._trace = trace

    def apply(self, ctx: RequestContext, cands: list[Candidate]) -> FilterResult:
        self._trace.merge_seen(cands)
        result = self._inner.apply(ctx, cands)
        removed = [c.item_id for c in result.removed]
        self._trace.removed[self.name] = removed
        self._trace.stages.append(
            {"stage": "filter", "name": self.name, "count": len(result.kept), "removed": removed}
        )
        return result


class _Scorer:
    def __init__(self, inner: Scorer, trace: Trace, kind: str) -> None:
        self.name = inner.name
        self._inner = inner
        self._trace = trace
        self._kind = kind

    @property
    def budget_ms(self) -> float:
        return self._inner.budget_ms

    async def score(self, ctx: RequestContext, cands: list[Candidate]) -> list[Candidate]:
        self._trace.merge_seen(cands)
        out = await self._inner.score(ctx, cands)
        self._trace.record(self._kind, self.name, out)
        return out


class _Policy:
    def __init__(self, inner: Policy, trace: Trace) -> None:
        self.name = inner.name
        self._inner = inner
        self._trace = trace

    def apply(self, ctx: RequestContext, ranked: list[Candidate]) -> list[Candidate]:
        self._trace.merge_seen(ranked)
        out = self._inner.apply(ctx, ranked)
        self._trace.record("policy", self.name, out)
        return out


def traced_pipeline(pipeline: SurfacePipeline, trace: Trace) -> SurfacePipeline:
    """A copy of ``pipeline`` whose stages record into ``trace`` and otherwise behave the same.

    Args:
        pipeline: The pipeline the request would run.
        trace: Where the stages record.

    Returns:
        The traced copy (same budgets, fail-open set and order).
    """
    pre, scorer = pipeline.pre_scorer, pipeline.scorer
    # model_copy skips validation: the stages were validated in the original and keep their names.
    return pipeline.model_copy(
        update={
            "sources": tuple(_Source(s, trace) for s in pipeline.sources),
            "filter_hydrators": tuple(_Hydrator(h, trace, "filter_state") for h in pipeline.filter_hydrators),
            "filters": tuple(_Filter(f, trace) for f in pipeline.filters),
            "hydrators": tuple(_Hydrator(h, trace, FEATURES_FROM) for h in pipeline.hydrators),
            "pre_scorer": None if pre is None else _Scorer(pre, trace, "pre_score"),
            "scorer": None if scorer is None else _Scorer(scorer, trace, "score"),
            "policies": tuple(_Policy(p, trace) for p in pipeline.policies),
        }
    )
