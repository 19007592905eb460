"""What travels over the ``DeploymentHandle`` hops of the read path: plain, picklable values.

``RequestContext`` holds a read-only params proxy and a monotonic deadline that means nothing in
another process, so the hops carry the fields the model deployments need instead, and the far side
rebuilds a context with its own deadline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from core.types import Candidate, FeatureMap, FeatureValue, RequestContext, monotonic_deadline

NO_MODEL: Final = "none"
"""``model_version`` of a reply made without a model bundle."""


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """One model-backed source a surface runs, with its limits.

    Attributes:
        name: Stage id (``two_tower_ann``, ``item_to_item``, ``recently_viewed_related``,
            ``similar_items``).
        max_candidates: Candidates it returns at most.
        budget_ms: Time it may take.
    """

    name: str
    max_candidates: int
    budget_ms: float


@dataclass(frozen=True, slots=True)
class RetrievalRequest:
    """One request's call to the retrieval deployment: every model-backed source of its surface.

    Attributes:
        request_id: The request.
        user_id: The user.
        surface: The surface.
        limit: Items the request returns.
        now: The request's instant.
        item_id: Seed item (``similar``).
        region: Region of the request.
        language: Language of the request.
        personalization: False for a user who opted out.
        user_features: The user's features as read by the ingress.
        sources: The sources to run.
    """

    request_id: str
    user_id: str
    surface: str
    limit: int
    now: datetime
    item_id: str | None
    region: str | None
    language: str | None
    personalization: bool
    user_features: dict[str, FeatureValue]
    sources: tuple[SourceSpec, ...]

    @classmethod
    def of(cls, ctx: RequestContext, sources: tuple[SourceSpec, ...]) -> RetrievalRequest:
        """The request for ``ctx`` and the given sources."""
        return cls(
            request_id=ctx.request_id,
            user_id=ctx.user_id,
            surface=ctx.surface,
            limit=ctx.limit,
            now=ctx.now,
            item_id=ctx.item_id,
            region=ctx.region,
            language=ctx.language,
            personalization=ctx.personalization,
            user_features=dict(ctx.user_features),
            sources=sources,
        )

    def context(self) -> RequestContext:
        """A context for the sources on the far side, due within the slowest source's budget."""
        budget = max((s.budget_ms for s in self.sources), default=1.0)
        return RequestContext(
            request_id=self.request_id,
            user_id=self.user_id,
            surface=self.surface,
            limit=self.limit,
            now=self.now,
            deadline=monotonic_deadline(budget),
            item_id=self.item_id,
            region=self.region,
            language=self.language,
            personalization=self.personalization,
            user_features=FeatureMap(self.user_features),
        )


_Columns = tuple[
    list[str], list[list[str]], list[float], list[float], list[int], list[str | None], list[float]
]


def _to_columns(
    candidates: dict[str, list[Candidate]],
) -> tuple[dict[str, _Columns], list[dict[str, FeatureValue]]]:
    """Candidates per source as lists of plain values, feature maps shared by index."""
    maps: list[dict[str, FeatureValue]] = []
    # Keyed by identity: sources share one map among many candidates (a seed item's features).
    index_of: dict[int, int] = {}
    out: dict[str, _Columns] = {}
    for name, cands in candidates.items():
        ids: list[str] = []
        sources: list[list[str]] = []
        retrieval: list[float] = []
        scores: list[float] = []
        features: list[int] = []
        reasons: list[str | None] = []
        propensities: list[float] = []
        for cand in cands:
            ids.append(cand.item_id)
            sources.append(cand.sources)
            retrieval.append(cand.retrieval_score)
            scores.append(cand.score)
            key = id(cand.features)
            index = index_of.get(key)
            if index is None:
                index = index_of[key] = len(maps)
                maps.append(dict(cand.features))
            features.append(index)
            reasons.append(cand.reason)
            propensities.append(cand.propensity)
        out[name] = (ids, sources, retrieval, scores, features, reasons, propensities)
    return out, maps


def _from_columns(
    columns: dict[str, _Columns], maps: list[dict[str, FeatureValue]]
) -> dict[str, list[Candidate]]:
    feature_maps = [FeatureMap(m) for m in maps]
    return {
        name: [
            Candidate(item_id, list(sources), retrieval, score, feature_maps[f], reason, propensity)
            for item_id, sources, retrieval, score, f, reason, propensity in zip(*cols, strict=True)
        ]
        for name, cols in columns.items()
    }


@dataclass(frozen=True, slots=True)
class RetrievalReply:
    """What the retrieval deployment found.

    Pickled as columns of plain values: Ray's pickler calls back into Python for every object that
    is not a plain value, and hundreds of candidates per reply made that most of the hop's CPU on
    both sides.

    Attributes:
        model_version: Bundle version that answered (:data:`NO_MODEL` without one).
        candidates: Candidates per source that ran.
        errors: Sources that failed or were late, with the reason.
        elapsed_ms: Time spent in the deployment.
    """

    model_version: str
    candidates: dict[str, list[Candidate]]
    errors: dict[str, str] = field(default_factory=dict)
    elapsed_ms: float = 0.0

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        columns, maps = _to_columns(self.candidates)
        return _reply_from_wire, (self.model_version, columns, maps, self.errors, self.elapsed_ms)


def _reply_from_wire(
    model_version: str,
    columns: dict[str, _Columns],
    maps: list[dict[str, FeatureValue]],
    errors: dict[str, str],
    elapsed_ms: float,
) -> RetrievalReply:
    return RetrievalReply(model_version, _from_columns(columns, maps), errors, elapsed_ms)


@dataclass(frozen=True, slots=True)
class RankRequest:
    """One request's candidates for the ranker.

    Attributes:
        user_id: The user (hashed into the user tower's id buckets).
        history: Recent positive item ids, most recent first.
        profile: ``age_group``, ``region``, ``language``.
        surface: The surface (its embedding and its head weights).
        device: Device class, when known.
        hour: UTC hour of the request.
        item_ids: Candidates, in the order scores are wanted.
        head_weights: Weights of the click, like, purchase and watch-time heads.
        embed_top_n: How many of the best-scored candidates get their item embedding back.
        interests: Onboarding interests (categories); empty for a user who opted out.
    """

    user_id: str
    history: tuple[str, ...]
    profile: dict[str, str | None]
    surface: str
    device: str | None
    hour: int
    item_ids: tuple[str, ...]
    head_weights: tuple[float, float, float, float]
    embed_top_n: int = 0
    interests: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RankReply:
    """The ranker's answer.

    Attributes:
        model_version: Bundle version that scored (:data:`NO_MODEL` without a ranker).
        scores: One score per requested item, or None without a ranker.
        unknown: Items the release's catalog does not hold (scored neutrally).
        embeddings: Item embeddings of the ``embed_top_n`` best-scored known items.
        elapsed_ms: Time spent in the deployment, batching wait included.
        batch_size: Requests scored together with this one.
    """

    model_version: str
    scores: list[float] | None
    unknown: int = 0
    embeddings: dict[str, tuple[float, ...]] = field(default_factory=dict)
    elapsed_ms: float = 0.0
    batch_size: int = 1
