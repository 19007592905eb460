from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from core.pipeline import (
    FallbackKind,
    PipelineResult,
    PipelineRunner,
    SkipReason,
    SourceFailedError,
    StageBudgets,
    StageName,
    SurfacePipeline,
)
from core.stages import (
    CandidateSource,
    FeatureHydrator,
    Filter,
    Policy,
    Scorer,
    StageContractError,
    StageDeclined,
)
from core.types import Candidate, FilterResult, RequestContext, monotonic_deadline

# Generous budgets so only the stage under test can be late.
ROOMY = StageBudgets(candidates_ms=2000, features_ms=2000, ranking_ms=2000, rerank_ms=2000, total_ms=10_000)


# --- stages used by the tests -----------------------------------------------------------------


@dataclass
class ListSource:
    name: str
    items: list[tuple[str, float]]
    budget_ms: float = 2000.0
    delay_s: float = 0.0
    error: Exception | None = None
    log: list[str] = field(default_factory=list)

    async def fetch(self, ctx: RequestContext) -> list[Candidate]:
        self.log.append(f"{self.name}:start")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        self.log.append(f"{self.name}:end")
        if self.error is not None:
            raise self.error
        return [Candidate(item_id=item, retrieval_score=score) for item, score in self.items]


@dataclass
class BlockListFilter:
    name: str
    blocked: set[str]
    seen: list[list[str]] = field(default_factory=list)

    def apply(self, ctx: RequestContext, cands: list[Candidate]) -> FilterResult:
        self.seen.append([c.item_id for c in cands])
        return FilterResult.partition(cands, lambda c: c.item_id not in self.blocked)


@dataclass
class LossyFilter:
    name: str = "lossy"

    def apply(self, ctx: RequestContext, cands: list[Candidate]) -> FilterResult:
        return FilterResult(kept=cands[1:], removed=[])


@dataclass
class CtrHydrator:
    name: str = "item_ctr"
    budget_ms: float = 2000.0
    delay_s: float = 0.0
    mode: str = "ok"  # "ok", "drop", "reverse", "raise"

    async def hydrate(self, ctx: RequestContext, cands: list[Candidate]) -> list[Candidate]:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.mode == "raise":
            raise ConnectionError("store down")
        for cand in cands:
            cand.features = cand.features.with_values({"item:ctr_7d": 0.5})
        if self.mode == "drop":
            return cands[:-1]
        if self.mode == "reverse":
            return cands[::-1]
        return cands


@dataclass
class TableScorer:
    """Sets scores from a table; can be slow, raise, reorder or return NaN."""

    scores: dict[str, float]
    name: str = "table"
    budget_ms: float = 2000.0
    delay_s: float = 0.0
    mode: str = "ok"  # "ok", "raise", "reverse", "drop", "nan"
    inputs: list[list[str]] = field(default_factory=list)

    async def score(self, ctx: RequestContext, cands: list[Candidate]) -> list[Candidate]:
        self.inputs.append([c.item_id for c in cands])
        # Scores are written before the delay, as a model that fails midway would leave them.
        for cand in cands:
            cand.score = math.nan if self.mode == "nan" else self.scores[cand.item_id]
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.mode == "raise":
            raise RuntimeError("model crashed")
        if self.mode == "decline":
            raise StageDeclined("breaker open")
        if self.mode == "reverse":
            return cands[::-1]
        if self.mode == "drop":
            return cands[:-1]
        return cands


@dataclass
class ReversePolicy:
    name: str = "reverse"
    seen: list[list[str]] = field(default_factory=list)

    def apply(self, ctx: RequestContext, ranked: list[Candidate]) -> list[Candidate]:
        self.seen.append([c.item_id for c in ranked])
        return ranked[::-1]


@dataclass
class RecordingObserver:
    stages: list[str] = field(default_factory=list)
    sources: list[tuple[str, int, str | None]] = field(default_factory=list)
    removed: list[tuple[str, int]] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)

    def on_stage(self, name: str, ms: float) -> None:
        self.stages.append(name)

    def on_source(self, name: str, ms: float, count: int, error: str | None) -> None:
        self.sources.append((name, count, error))

    def on_removed(self, filter_name: str, n: int) -> None:
        self.removed.append((filter_name, n))

    def on_fallback(self, kind: str) -> None:
        self.fallbacks.append(kind)


# --- helpers ----------------------------------------------------------------------------------


def make_ctx(limit: int = 10, budget_ms: float = 10_000.0) -> RequestContext:
    return RequestContext(
        request_id="r1",
        user_id="u1",
        surface="home",
        limit=limit,
        now=datetime(2024, 1, 1, tzinfo=UTC),
        deadline=monotonic_deadline(budget_ms),
    )


def run(
    pipeline: SurfacePipeline, ctx: RequestContext | None = None, **runner_kwargs: object
) -> PipelineResult:
    runner = PipelineRunner(**runner_kwargs)  # type: ignore[arg-type]
    return asyncio.run(runner.run(pipeline, ctx or make_ctx()))


def ids(cands: list[Candidate]) -> list[str]:
    return [c.item_id for c in cands]


FIVE = [("a", 0.9), ("b", 0.8), ("c", 0.7), ("d", 0.6), ("e", 0.5)]


# --- protocols --------------------------------------------------------------------------------


def test_test_stages_satisfy_the_protocols() -> None:
    assert isinstance(ListSource("s", []), CandidateSource)
    assert isinstance(BlockListFilter("f", set()), Filter)
    assert isinstance(CtrHydrator(), FeatureHydrator)
    assert isinstance(TableScorer({}), Scorer)
    assert isinstance(ReversePolicy(), Policy)


# --- sources ----------------------------------------------------------------------------------


def test_sources_run_concurrently() -> None:
    log: list[str] = []
    pipeline = SurfacePipeline(
        surface="home",
        sources=(
            ListSource("a", [("a1", 1.0)], delay_s=0.05, log=log),
            ListSource("b", [("b1", 0.5)], delay_s=0.05, log=log),
        ),
        budgets=ROOMY,
    )
    started = time.monotonic()
    result = run(pipeline)
    elapsed_s = time.monotonic() - started
    # Both started before either finished: the order proves concurrency without timing.
    assert set(log[:2]) == {"a:start", "b:start"}
    assert set(log[2:]) == {"a:end", "b:end"}
    assert elapsed_s < 0.095  # one after the other would take at least 100 ms
    assert ids(result.candidates) == ["a1", "b1"]
    assert set(result.source_latency_ms) == {"a", "b"}
    assert result.source_counts == {"a": 1, "b": 1}


def test_late_source_is_skipped_as_timeout() -> None:
    pipeline = SurfacePipeline(
        surface="home",
        sources=(
            ListSource("fast", [("f1", 1.0)]),
            ListSource("slow", [("s1", 2.0)], budget_ms=20, delay_s=5),
        ),
        budgets=ROOMY,
        fail_open=frozenset({"slow"}),
    )
    started = time.monotonic()
    result = run(pipeline)
    assert time.monotonic() - started < 2.0  # the 5 s source was cut off
    assert result.skipped_sources == {"slow": SkipReason.TIMEOUT}
    assert result.skipped_sources["slow"] == "timeout"
    assert result.source_counts == {"fast": 1, "slow": 0}
    assert ids(result.candidates) == ["f1"]
    assert result.fallbacks == []


def test_stage_budget_caps_a_source_budget() -> None:
    pipeline = SurfacePipeline(
        surface="home",
        sources=(ListSource("fast", [("f1", 1.0)]), ListSource("slow", [("s1", 2.0)], delay_s=5)),
        budgets=StageBudgets(candidates_ms=20),
        fail_open=frozenset({"slow"}),
    )
    result = run(pipeline)
    assert result.skipped_sources == {"slow": "timeout"}
    assert ids(result.candidates) == ["f1"]


def test_request_deadline_caps_stage_budgets() -> None:
    pipeline = SurfacePipeline(
        surface="home",
        sources=(ListSource("fast", [("f1", 1.0)]), ListSource("slow", [("s1", 2.0)], delay_s=5)),
        budgets=ROOMY,
        fail_open=frozenset({"slow"}),
    )
    result = run(pipeline, make_ctx(budget_ms=30))
    assert result.skipped_sources == {"slow": "timeout"}


def test_raising_fail_open_source_is_skipped_as_error() -> None:
    observer = RecordingObserver()
    pipeline = SurfacePipeline(
        surface="home",
        sources=(ListSource("ok", [("a", 1.0)]), ListSource("broken", [], error=ConnectionError("down"))),
        budgets=ROOMY,
        fail_open=frozenset({"broken"}),
    )
    result = run(pipeline, observer=observer)
    assert result.skipped_sources == {"broken": "error"}
    assert ids(result.candidates) == ["a"]
    assert ("broken", 0, "error") in observer.sources
    assert ("ok", 1, None) in observer.sources


def test_raising_required_source_fails_the_request() -> None:
    pipeline = SurfacePipeline(
        surface="home",
        sources=(ListSource("ok", [("a", 1.0)]), ListSource("broken", [], error=ConnectionError("down"))),
        budgets=ROOMY,
    )
    with pytest.raises(SourceFailedError) as caught:
        run(pipeline)
    assert caught.value.source == "broken"
    assert caught.value.reason == "error"
    assert isinstance(caught.value.__cause__, ConnectionError)


def test_late_required_source_fails_the_request() -> None:
    pipeline = SurfacePipeline(
        surface="home", sources=(ListSource("slow", [("a", 1.0)], budget_ms=10, delay_s=5),), budgets=ROOMY
    )
    with pytest.raises(SourceFailedError) as caught:
        run(pipeline)
    assert caught.value.reason == "timeout"


def test_merge_keeps_every_source_and_the_best_retrieval_score() -> None:
    pipeline = SurfacePipeline(
        surface="home",
        sources=(
            ListSource("ann", [("x", 0.3), ("y", 0.8)]),
            ListSource("popular", [("x", 0.9), ("z", 0.1)]),
            ListSource("follows", [("x", 0.2), ("x", 0.25)]),  # a source may repeat itself
        ),
        budgets=ROOMY,
    )
    result = run(pipeline)
    by_id = {c.item_id: c for c in result.candidates}
    assert set(by_id) == {"x", "y", "z"}
    assert by_id["x"].sources == ["ann", "popular", "follows"]
    assert by_id["x"].retrieval_score == 0.9
    assert by_id["y"].sources == ["ann"]
    assert ids(result.candidates) == ["x", "y", "z"]  # retrieval order
    assert result.source_counts == {"ann": 2, "popular": 2, "follows": 2}


# --- filters ----------------------------------------------------------------------------------


def test_filters_run_in_order_and_removals_are_counted_per_filter() -> None:
    first = BlockListFilter("removed_items", {"a", "b"})
    second = BlockListFilter("seen_items", {"c", "a"})
    observer = RecordingObserver()
    pipeline = SurfacePipeline(
        surface="home", sources=(ListSource("s", FIVE),), filters=(first, second), budgets=ROOMY
    )
    result = run(pipeline, observer=observer)
    assert result.removed_by_filter == {"removed_items": 2, "seen_items": 1}
    assert observer.removed == [("removed_items", 2), ("seen_items", 1)]
    assert second.seen == [["c", "d", "e"]]  # the second filter sees only what the first kept
    assert ids(result.candidates) == ["d", "e"]


def test_filter_that_loses_candidates_breaks_its_contract() -> None:
    pipeline = SurfacePipeline(surface="home", sources=(ListSource("s", FIVE),), filters=(LossyFilter(),))
    with pytest.raises(StageContractError, match="lossy"):
        run(pipeline)


# --- hydrators --------------------------------------------------------------------------------


def test_hydrator_attaches_features() -> None:
    pipeline = SurfacePipeline(surface="home", sources=(ListSource("s", FIVE),), hydrators=(CtrHydrator(),))
    result = run(pipeline)
    assert all(c.features.get_float("item:ctr_7d", 0.0) == 0.5 for c in result.candidates)
    assert StageName.FEATURES in result.stage_latency_ms


@pytest.mark.parametrize("mode", ["drop", "reverse"])
def test_hydrator_contract_violation_raises(mode: str) -> None:
    pipeline = SurfacePipeline(
        surface="home",
        sources=(ListSource("s", FIVE),),
        hydrators=(CtrHydrator(name="bad_hydrator", mode=mode),),
        budgets=ROOMY,
    )
    with pytest.raises(StageContractError) as caught:
        run(pipeline)
    assert caught.value.stage == "bad_hydrator"


@pytest.mark.parametrize(("mode", "delay_s", "reason"), [("raise", 0.0, "error"), ("ok", 5.0, "timeout")])
def test_failing_hydrator_is_skipped_with_partial_features(mode: str, delay_s: float, reason: str) -> None:
    pipeline = SurfacePipeline(
        surface="home",
        sources=(ListSource("s", FIVE),),
        hydrators=(CtrHydrator(name="flaky", mode=mode, delay_s=delay_s, budget_ms=20),),
        budgets=ROOMY,
    )
    result = run(pipeline)
    assert result.failed_stages == {"flaky": reason}
    assert result.fallbacks == [FallbackKind.FEATURES_PARTIAL]
    assert ids(result.candidates) == ["a", "b", "c", "d", "e"]


# --- ranking ----------------------------------------------------------------------------------

PRE_SCORES = {"a": 0.1, "b": 0.5, "c": 0.3, "d": 0.9, "e": 0.2}
MODEL_SCORES = {"a": 5.0, "b": 1.0, "c": 4.0, "d": 2.0, "e": 3.0}
PRE_ORDER = ["d", "b", "c", "e", "a"]
MODEL_ORDER = ["a", "c", "e", "d", "b"]


def ranking_pipeline(scorer: TableScorer, ranker_input_size: int = 200) -> SurfacePipeline:
    return SurfacePipeline(
        surface="home",
        sources=(ListSource("s", FIVE),),
        pre_scorer=TableScorer(PRE_SCORES, name="pre"),
        scorer=scorer,
        ranker_input_size=ranker_input_size,
        budgets=ROOMY,
    )


def test_scorer_order_is_served() -> None:
    result = run(ranking_pipeline(TableScorer(MODEL_SCORES, name="model")))
    assert ids(result.candidates) == MODEL_ORDER
    assert [c.score for c in result.candidates] == [5.0, 4.0, 3.0, 2.0, 1.0]
    assert result.fallbacks == []
    assert result.fallback is None
    assert {StageName.PRE_SCORE, StageName.SCORE} <= set(result.stage_latency_ms)


def test_pre_score_then_cut_to_ranker_input_size() -> None:
    scorer = TableScorer(MODEL_SCORES, name="model")
    result = run(ranking_pipeline(scorer, ranker_input_size=3))
    assert scorer.inputs == [PRE_ORDER[:3]]
    assert ids(result.candidates) == ["c", "d", "b"]


def test_slow_scorer_falls_back_to_pre_score_order() -> None:
    observer = RecordingObserver()
    scorer = TableScorer(MODEL_SCORES, name="model", budget_ms=20, delay_s=5)
    started = time.monotonic()
    result = run(ranking_pipeline(scorer), observer=observer)
    assert time.monotonic() - started < 2.0
    assert result.fallbacks == ["ranker_prescore"]
    assert result.fallback == FallbackKind.RANKER_PRESCORE
    assert observer.fallbacks == ["ranker_prescore"]
    assert result.failed_stages == {"model": "timeout"}
    assert ids(result.candidates) == PRE_ORDER
    # The late scorer wrote scores before stalling; they must not leak into the served list.
    assert [c.score for c in result.candidates] == [PRE_SCORES[i] for i in PRE_ORDER]


def test_raising_scorer_falls_back_to_pre_score_order() -> None:
    result = run(ranking_pipeline(TableScorer(MODEL_SCORES, name="model", mode="raise")))
    assert result.fallbacks == ["ranker_prescore"]
    assert result.failed_stages == {"model": "error"}
    assert ids(result.candidates) == PRE_ORDER


def test_declining_scorer_falls_back_without_a_traceback(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="core.pipeline"):
        result = run(ranking_pipeline(TableScorer(MODEL_SCORES, name="model", mode="decline")))
        run(ranking_pipeline(TableScorer(MODEL_SCORES, name="model", mode="raise")))
    assert result.fallbacks == ["ranker_prescore"]
    assert result.failed_stages == {"model": "error"}
    assert ids(result.candidates) == PRE_ORDER
    declined, crashed = [r for r in caplog.records if "model" in r.getMessage()]
    assert (declined.levelno, declined.exc_info) == (logging.DEBUG, None)
    assert crashed.levelno == logging.WARNING and crashed.exc_info is not None


@pytest.mark.parametrize("mode", ["reverse", "drop", "nan"])
def test_scorer_contract_violation_is_recorded_and_falls_back(mode: str) -> None:
    result = run(ranking_pipeline(TableScorer(MODEL_SCORES, name="model", mode=mode)))
    assert result.fallbacks == ["ranker_prescore"]
    assert result.failed_stages == {"model": SkipReason.CONTRACT}
    assert len(result.contract_violations) == 1
    assert "model" in result.contract_violations[0]
    assert ids(result.candidates) == PRE_ORDER


def test_failing_scorer_without_pre_scorer_serves_retrieval_order() -> None:
    pipeline = SurfacePipeline(
        surface="home",
        sources=(ListSource("s", [("b", 0.2), ("a", 0.9), ("c", 0.5)]),),
        scorer=TableScorer(MODEL_SCORES, name="model", mode="raise"),
        budgets=ROOMY,
    )
    result = run(pipeline)
    assert result.fallbacks == [FallbackKind.RANKER_RETRIEVAL]
    assert ids(result.candidates) == ["a", "c", "b"]


def test_failing_pre_scorer_falls_back_to_retrieval_order_for_the_scorer() -> None:
    scorer = TableScorer(MODEL_SCORES, name="model")
    pipeline = SurfacePipeline(
        surface="home",
        sources=(ListSource("s", FIVE),),
        pre_scorer=TableScorer(PRE_SCORES, name="pre", mode="raise"),
        scorer=scorer,
        ranker_input_size=2,
        budgets=ROOMY,
    )
    result = run(pipeline)
    assert result.fallbacks == [FallbackKind.PRESCORE_RETRIEVAL]
    assert scorer.inputs == [["a", "b"]]
    assert ids(result.candidates) == ["a", "b"]


# --- policies, limit, observer ----------------------------------------------------------------


def test_policies_see_the_ranked_list_before_truncation_to_limit() -> None:
    policy = ReversePolicy()
    pipeline = SurfacePipeline(
        surface="home", sources=(ListSource("s", FIVE),), policies=(policy,), budgets=ROOMY
    )
    result = run(pipeline, make_ctx(limit=2))
    assert policy.seen == [["a", "b", "c", "d", "e"]]
    assert ids(result.candidates) == ["e", "d"]


def test_limit_truncates_the_final_list() -> None:
    result = run(ranking_pipeline(TableScorer(MODEL_SCORES, name="model")), make_ctx(limit=2))
    assert ids(result.candidates) == MODEL_ORDER[:2]


def test_observer_sees_every_stage() -> None:
    observer = RecordingObserver()
    pipeline = SurfacePipeline(
        surface="home",
        sources=(ListSource("s", FIVE),),
        filters=(BlockListFilter("f", set()),),
        hydrators=(CtrHydrator(),),
        pre_scorer=TableScorer(PRE_SCORES, name="pre"),
        scorer=TableScorer(MODEL_SCORES, name="model"),
        policies=(ReversePolicy(),),
        budgets=ROOMY,
    )
    result = run(pipeline, observer=observer)
    assert observer.stages == ["candidates", "filters", "features", "pre_score", "score", "rerank"]
    assert list(result.stage_latency_ms) == observer.stages
    assert all(ms >= 0 for ms in result.stage_latency_ms.values())
    assert result.total_ms >= 0


def test_no_sources_left_gives_an_empty_list_without_calling_scorers() -> None:
    scorer = TableScorer(MODEL_SCORES, name="model")
    pipeline = SurfacePipeline(
        surface="home",
        sources=(ListSource("s", [("a", 1.0)]),),
        filters=(BlockListFilter("all", {"a"}),),
        scorer=scorer,
        budgets=ROOMY,
    )
    result = run(pipeline)
    assert result.candidates == []
    assert scorer.inputs == []
    assert result.fallbacks == []


# --- pipeline validation ----------------------------------------------------------------------


def test_pipeline_defaults_follow_the_seed_budget() -> None:
    pipeline = SurfacePipeline(surface="home", sources=(ListSource("s", []),))
    assert pipeline.budgets == StageBudgets(
        candidates_ms=30, features_ms=30, ranking_ms=30, rerank_ms=10, total_ms=100
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fail_open": frozenset({"nope"})},
        {"sources": (ListSource("s", []), ListSource("s", []))},
        {"sources": ()},
        {"sources": (ListSource("s", [], budget_ms=0),)},
        {"filters": (object(),)},
        {"ranker_input_size": 0},
        {"budgets": {"candidates_ms": 200}},
        {"surprise": 1},
    ],
)
def test_pipeline_rejects_invalid_definitions(kwargs: dict[str, object]) -> None:
    values: dict[str, object] = {"surface": "home", "sources": (ListSource("s", []),)}
    values.update(kwargs)
    with pytest.raises(ValidationError):
        SurfacePipeline(**values)  # type: ignore[arg-type]


def test_pipeline_is_frozen() -> None:
    pipeline = SurfacePipeline(surface="home", sources=[ListSource("s", [])])  # type: ignore[arg-type]
    assert isinstance(pipeline.sources, tuple)
    with pytest.raises(ValidationError):
        pipeline.ranker_input_size = 5  # type: ignore[misc]
