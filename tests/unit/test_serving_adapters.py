"""The ingress's remote stage adapters, against in-process fakes of the model deployments."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from core.pipeline import FallbackKind, PipelineRunner, StageBudgets, SurfacePipeline
from core.types import EMPTY_FEATURES, Candidate, FeatureMap, RequestContext, monotonic_deadline
from deployments.recommender.remote_ranker import CircuitOpenError, RankerClient, RemoteRankerScorer
from deployments.recommender.remote_sources import RemoteRetrievalGroup, RemoteSourceError
from deployments.recommender.scopes import RequestScopes
from deployments.wire import NO_MODEL, RankReply, RankRequest, RetrievalReply, RetrievalRequest
from features.candidate_refs import ITEM_EMBEDDING
from policies.circuit_breaker import BreakerState, CircuitBreaker, CircuitBreakerConfig
from policies.surfaces import RankerWeights, SourceConfig

HISTORY = FeatureMap(
    {
        "user_activity:recent_item_ids": ["a", "b", "a"],
        "user_activity:recent_event_types": ["like", "skip", "view"],
        "user_activity:recent_event_ts": [3.0, 2.0, 1.0],
    }
)


def ctx(request_id: str = "r1", **overrides: object) -> RequestContext:
    fields: dict[str, object] = {
        "request_id": request_id,
        "user_id": "u1",
        "surface": "home",
        "limit": 3,
        "now": datetime(2026, 5, 1, 10, tzinfo=UTC),
        "deadline": monotonic_deadline(5000),
        "user_features": HISTORY,
        "device": "mobile",
    }
    fields.update(overrides)
    return RequestContext(**fields)  # type: ignore[arg-type]


class FakeRetrieval:
    def __init__(self, reply: RetrievalReply, delay_s: float = 0.0) -> None:
        self.reply = reply
        self.delay_s = delay_s
        self.requests: list[RetrievalRequest] = []

    async def __call__(self, request: RetrievalRequest) -> RetrievalReply:
        self.requests.append(request)
        await asyncio.sleep(self.delay_s)
        return self.reply


def test_the_model_sources_of_a_surface_share_one_call() -> None:
    reply = RetrievalReply(
        "v1",
        {
            "two_tower_ann": [Candidate("x", retrieval_score=1.0)],
            "item_to_item": [Candidate("y", retrieval_score=0.5)],
        },
        {"recently_viewed_related": "timeout"},
    )
    call = FakeRetrieval(reply, delay_s=0.01)
    scopes = RequestScopes()
    group = RemoteRetrievalGroup(call, scopes, hop_allowance_ms=3.0)
    ann = group.source(SourceConfig(name="two_tower_ann", budget_ms=20, max_candidates=7))
    i2i = group.source(SourceConfig(name="item_to_item", budget_ms=10))
    recent = group.source(SourceConfig(name="recently_viewed_related", budget_ms=10))
    assert ann.budget_ms == i2i.budget_ms == 20, "the group shares its largest budget"

    async def body() -> tuple[object, ...]:
        scope = scopes.open("r1")
        try:
            results = await asyncio.gather(
                ann.fetch(ctx()), i2i.fetch(ctx()), recent.fetch(ctx()), return_exceptions=True
            )
        finally:
            scopes.close("r1")
        return (*results, scope)

    got_ann, got_i2i, got_recent, scope = asyncio.run(body())
    assert len(call.requests) == 1
    sent = call.requests[0]
    assert [(s.name, s.max_candidates, s.budget_ms) for s in sent.sources] == [
        ("two_tower_ann", 7, 17.0),
        ("item_to_item", 100, 7.0),
        ("recently_viewed_related", 100, 7.0),
    ]
    assert sent.user_features == dict(HISTORY) and sent.context().user_features == HISTORY
    assert [c.item_id for c in got_ann] == ["x"] and [c.item_id for c in got_i2i] == ["y"]  # type: ignore[attr-defined]
    assert isinstance(got_recent, TimeoutError)
    assert scope.retrieval_version == "v1"  # type: ignore[attr-defined]
    assert len(scopes) == 0


def test_a_remote_source_error_fails_only_that_source() -> None:
    call = FakeRetrieval(RetrievalReply("v1", {"item_to_item": []}, {"two_tower_ann": "RuntimeError: boom"}))
    group = RemoteRetrievalGroup(call, RequestScopes())
    ann = group.source(SourceConfig(name="two_tower_ann"))
    with pytest.raises(RemoteSourceError):
        asyncio.run(ann.fetch(ctx()))


class FakeRanker:
    def __init__(self, *, fail: bool = False, delay_s: float = 0.0, no_model: bool = False) -> None:
        self.fail = fail
        self.delay_s = delay_s
        self.no_model = no_model
        self.requests: list[RankRequest] = []

    async def __call__(self, request: RankRequest) -> RankReply:
        self.requests.append(request)
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("ranker down")
        if self.no_model:
            return RankReply(NO_MODEL, None)
        scores = [float(len(request.item_ids) - n) for n in range(len(request.item_ids))][::-1]
        return RankReply("v7", scores, embeddings={request.item_ids[-1]: (1.0, 0.0)})


def pipeline(scorer: RemoteRankerScorer) -> SurfacePipeline:
    class Fixed:
        name = "fixed"
        budget_ms = 1000.0

        async def fetch(self, ctx: RequestContext) -> list[Candidate]:
            return [Candidate(i, retrieval_score=s) for i, s in (("p", 0.9), ("q", 0.5), ("r", 0.1))]

    return SurfacePipeline(
        surface="home",
        sources=(Fixed(),),
        scorer=scorer,
        budgets=StageBudgets(ranking_ms=50, total_ms=1000),
    )


def scorer_of(
    call: FakeRanker, breaker: CircuitBreaker | None = None
) -> tuple[RemoteRankerScorer, RankerClient]:
    client = RankerClient(call, breaker or CircuitBreaker(), RequestScopes())
    return RemoteRankerScorer(client, RankerWeights(), budget_ms=50, embed_top_n=2), client


def test_the_ranker_scores_reorders_and_brings_embeddings() -> None:
    call = FakeRanker()
    scorer, client = scorer_of(call)
    result = asyncio.run(PipelineRunner().run(pipeline(scorer), ctx()))
    assert [c.item_id for c in result.candidates] == ["r", "q", "p"]
    assert result.fallbacks == []
    assert result.candidates[0].features.get_vector(ITEM_EMBEDDING, ()) == (1.0, 0.0)
    [request] = call.requests
    assert request.history == ("a",), "positive events only, each once"
    assert request.device == "mobile" and request.hour == 10 and request.embed_top_n == 2
    assert request.head_weights == (1.0, 0.5, 0.0, 0.0)
    assert client.last_version == "v7"


def test_failures_and_timeouts_fall_back_and_open_the_breaker() -> None:
    breaker = CircuitBreaker(CircuitBreakerConfig(failure_threshold=2, cooldown_s=60))
    failing, _ = scorer_of(FakeRanker(fail=True), breaker)
    late, _ = scorer_of(FakeRanker(delay_s=1.0), breaker)
    runner = PipelineRunner()
    first = asyncio.run(runner.run(pipeline(failing), ctx()))
    assert first.fallbacks == [FallbackKind.RANKER_RETRIEVAL]
    assert [c.item_id for c in first.candidates] == ["p", "q", "r"]
    second = asyncio.run(runner.run(pipeline(late), ctx()))
    assert second.fallbacks == [FallbackKind.RANKER_RETRIEVAL]
    assert breaker.snapshot().state is BreakerState.OPEN
    refused = FakeRanker()
    third_scorer, _ = scorer_of(refused, breaker)
    with pytest.raises(CircuitOpenError):
        asyncio.run(third_scorer.score(ctx(), [Candidate("p")]))
    assert refused.requests == []


def test_without_a_model_the_order_passes_through_and_the_ranker_is_not_asked_again() -> None:
    call = FakeRanker(no_model=True)
    scorer, client = scorer_of(call)
    runner = PipelineRunner()
    for _ in range(3):
        result = asyncio.run(runner.run(pipeline(scorer), ctx()))
        assert result.fallbacks == [] and [c.item_id for c in result.candidates] == ["p", "q", "r"]
    assert len(call.requests) == 1
    assert client.last_version == NO_MODEL


def test_the_seed_item_is_filtered_out_of_its_own_similar_list() -> None:
    from policies.seed_item_filter import SeedItemFilter

    cands = [Candidate("a"), Candidate("seed"), Candidate("b")]
    result = SeedItemFilter().apply(ctx(item_id="seed"), cands)
    assert [c.item_id for c in result.kept] == ["a", "b"] and [c.item_id for c in result.removed] == ["seed"]
    assert len(SeedItemFilter().apply(ctx(), cands).kept) == 3


def test_retrieval_reply_pickles_as_columns_and_comes_back_equal() -> None:
    import pickle

    import ray.cloudpickle as cloudpickle

    seed = FeatureMap({"retrieval:seed_similarity": 0.5})
    reply = RetrievalReply(
        "v1",
        {
            "item_to_item": [
                Candidate(
                    f"i{k}", ["item_to_item"], 0.1 * k, 0.2, seed if k % 2 else EMPTY_FEATURES, "r", 0.9
                )
                for k in range(50)
            ],
            "two_tower_ann": [],
        },
        {"collaborative": "timeout"},
        4.5,
    )
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):
        back = loads(dumps(reply))
        assert back == reply
        shared = back.candidates["item_to_item"]
        # A map shared on this side is shared on the far side too (sent once).
        assert shared[1].features is shared[3].features
        assert shared[1].sources is not reply.candidates["item_to_item"][1].sources
