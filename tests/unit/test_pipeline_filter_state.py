"""The runner's filter-state hydrators: they run before the filters and fail closed."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from core.pipeline import (
    FilterStateError,
    PipelineRunner,
    SkipReason,
    StageBudgets,
    StageName,
    SurfacePipeline,
)
from core.types import Candidate, FeatureMap, FilterResult, RequestContext
from tests.unit.serving_fixtures import ids, make_ctx

ROOMY = StageBudgets(candidates_ms=2000, features_ms=2000, ranking_ms=2000, rerank_ms=2000, total_ms=10_000)


@dataclass
class ListSource:
    items: list[str]
    name: str = "list"
    budget_ms: float = 1000.0

    async def fetch(self, ctx: RequestContext) -> list[Candidate]:
        return [Candidate(item_id=i, retrieval_score=1.0 - n / 10) for n, i in enumerate(self.items)]


@dataclass
class FlagHydrator:
    flagged: set[str]
    mode: str = "ok"  # "ok", "raise", "slow", "drop"
    name: str = "flags"
    budget_ms: float = 50.0
    calls: list[list[str]] = field(default_factory=list)

    async def hydrate(self, ctx: RequestContext, cands: list[Candidate]) -> list[Candidate]:
        self.calls.append(ids(cands))
        if self.mode == "raise":
            raise ConnectionError("store down")
        if self.mode == "slow":
            await asyncio.sleep(1.0)
        for c in cands:
            c.features = c.features.union(FeatureMap({"serving:removed": c.item_id in self.flagged}))
        return cands[:-1] if self.mode == "drop" else cands


@dataclass
class FlagFilter:
    name: str = "removed_item"

    def apply(self, ctx: RequestContext, cands: list[Candidate]) -> FilterResult:
        return FilterResult.partition(cands, lambda c: not c.features.get_bool("serving:removed", True))


def pipeline(hydrator: FlagHydrator) -> SurfacePipeline:
    return SurfacePipeline(
        surface="home",
        sources=(ListSource(["a", "b", "c"]),),
        filter_hydrators=(hydrator,),
        filters=(FlagFilter(),),
        budgets=ROOMY,
    )


def test_filter_state_is_loaded_before_the_filters() -> None:
    hydrator = FlagHydrator({"b"})
    result = asyncio.run(PipelineRunner().run(pipeline(hydrator), make_ctx()))
    assert hydrator.calls == [["a", "b", "c"]]
    assert ids(result.candidates) == ["a", "c"]
    assert result.removed_by_filter == {"removed_item": 1}
    assert StageName.FILTER_STATE in result.stage_latency_ms


@pytest.mark.parametrize(
    ("mode", "reason"),
    [("raise", SkipReason.ERROR), ("slow", SkipReason.TIMEOUT), ("drop", SkipReason.CONTRACT)],
)
def test_a_failing_filter_state_hydrator_fails_the_request(mode: str, reason: SkipReason) -> None:
    with pytest.raises(FilterStateError) as caught:
        asyncio.run(PipelineRunner().run(pipeline(FlagHydrator(set(), mode=mode)), make_ctx()))
    assert caught.value.stage == "flags" and caught.value.reason is reason


def test_filter_state_and_feature_hydrator_names_must_differ() -> None:
    with pytest.raises(ValueError, match="named"):
        SurfacePipeline(
            surface="home",
            sources=(ListSource(["a"]),),
            filter_hydrators=(FlagHydrator(set()),),
            hydrators=(FlagHydrator(set()),),
        )
