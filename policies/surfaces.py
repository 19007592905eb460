"""Surfaces as configuration: which stages a surface runs, with what budgets and parameters.

A :class:`SurfaceConfig` names its stages; :func:`build_pipeline` turns it into a
:class:`core.pipeline.SurfacePipeline` by looking the names up in a :class:`ComponentRegistry`.
The registry holds the Redis- and model-backed components the serving process built (sources,
hydrators, the ranker) next to the pure ones this package provides (filters, the pre-scorer,
the re-ranking policies), so adding a surface, or changing one, is an edit of
``surfaces.yaml``, not code. Names listed in ``optional_stages`` may be missing from the
registry (the ANN source and the ranker before a model is loaded) and are then left out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from core.pipeline import StageBudgets, SurfacePipeline
from core.stages import CandidateSource, FeatureHydrator, Filter, Policy, Scorer
from policies.category_spread_policy import CategorySpreadPolicy
from policies.creator_cap_policy import CreatorCapPolicy
from policies.dedupe_policy import DedupePolicy
from policies.exclusion_filter import ExclusionFilter
from policies.exploration_policy import ExplorationPolicy
from policies.freshness_boost_policy import FreshnessBoostPolicy
from policies.global_block_filter import GlobalBlockFilter
from policies.lightweight_pre_scorer import LightweightPreScorer, PreScoreWeights
from policies.mmr_diversity_policy import MmrDiversityPolicy
from policies.purchased_filter import PurchasedFilter
from policies.reason_policy import ReasonPolicy
from policies.removed_item_filter import RemovedItemFilter
from policies.seed_item_filter import SeedItemFilter
from policies.seen_in_session_filter import SeenInSessionFilter
from policies.sponsored_slot_policy import SponsoredSlotPolicy
from policies.thompson_sampler import ThompsonSampler
from policies.user_block_filter import UserBlockFilter

DEFAULT_SURFACES_PATH: Final = Path(__file__).with_name("surfaces.yaml")
"""The surfaces shipped with the code: ``home``, ``product``, ``video`` and ``similar``."""

StageId = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]
"""A stage name: snake_case, the key of metrics, logs and the registry."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceConfig(_Strict):
    """One candidate source of a surface."""

    name: StageId
    """Registry key of the source; also its stage name."""

    budget_ms: Annotated[float, Field(gt=0)] = 20.0
    """Time the source may take; the candidate stage budget still caps it."""

    max_candidates: Annotated[int, Field(ge=1, le=5000)] = 100
    """Candidates the source returns at most."""

    fail_open: bool = True
    """Skip the source when it fails or is late; when false such a failure fails the request."""


class RankerWeights(_Strict):
    """How the ranker's task heads combine into one score (its per-task probabilities, weighted)."""

    click: Annotated[float, Field(ge=0)] = 1.0
    """Weight of P(click)."""

    like: Annotated[float, Field(ge=0)] = 0.5
    """Weight of P(like)."""

    purchase: Annotated[float, Field(ge=0)] = 0.0
    """Weight of P(purchase)."""

    watch: Annotated[float, Field(ge=0)] = 0.0
    """Weight of the expected watch share."""

    @model_validator(mode="after")
    def _some_weight(self) -> RankerWeights:
        if self.click + self.like + self.purchase + self.watch <= 0:
            raise ValueError("at least one ranker task weight must be positive")
        return self


class PolicyParams(_Strict):
    """Parameters of the re-ranking policies of a surface."""

    exploration_share: Annotated[float, Field(ge=0, lt=1)] = 0.1
    """Expected share of the list filled by the exploration bandit."""

    exploration_pool_size: Annotated[int, Field(ge=1)] = 50
    """Candidates below the fold the bandit chooses from."""

    exploration_mc_samples: Annotated[int, Field(ge=1, le=10_000)] = 256
    """Monte-Carlo draws per exploration slot for its propensity."""

    exploration_prior_strength: Annotated[float, Field(gt=0)] = 20.0
    """Pseudo-views of the bandit's CTR prior (mean 0.05): how long a new item counts as uncertain."""

    diversity_lambda: Annotated[float, Field(ge=0, le=1)] = 0.7
    """MMR trade-off: 1.0 keeps the ranking, 0.0 maximises diversity."""

    diversity_pool_size: Annotated[int, Field(ge=1)] = 60
    """Candidates MMR re-orders (at least the request's limit)."""

    creator_cap_max: Annotated[int, Field(ge=1)] = 2
    """Items of one creator allowed in any window of ``creator_cap_window`` positions."""

    creator_cap_window: Annotated[int, Field(ge=1)] = 5
    """Window of the creator cap."""

    category_cap_max: Annotated[int, Field(ge=1)] = 3
    """Items of one category allowed in any window of ``category_cap_window`` positions (soft)."""

    category_cap_window: Annotated[int, Field(ge=1)] = 6
    """Window of the category spread."""

    freshness_boost: Annotated[float, Field(ge=0)] = 0.1
    """Score added to a brand-new item, in ranker score units."""

    freshness_half_life_h: Annotated[float, Field(gt=0)] = 12.0
    """Age at which the freshness boost halves."""

    freshness_max_age_h: Annotated[float, Field(ge=0)] = 48.0
    """Items older than this get no freshness boost."""

    sponsored_slots: tuple[Annotated[int, Field(ge=0)], ...] = (2, 9)
    """0-based positions sponsored items may take."""

    sponsored_max: Annotated[int, Field(ge=0)] = 2
    """Sponsored items per list at most."""

    new_item_age_h: Annotated[float, Field(gt=0)] = 72.0
    """Items younger than this are explained as "New for you"."""


DEFAULT_FILTERS: Final = ("removed_item", "global_block", "user_block", "exclusion", "seen_in_session")
DEFAULT_POLICIES: Final = (
    "dedupe",
    "freshness_boost",
    "mmr_diversity",
    "category_spread",
    "creator_cap",
    "exploration",
    "sponsored_slots",
    "reason",
)


class SurfaceConfig(_Strict):
    """One surface: its stages in run order, budgets, failure policy and parameters."""

    name: StageId
    """Surface name (``home``, ``product``, ...), as requests name it."""

    description: str = ""
    """What the surface is for."""

    sources: Annotated[tuple[SourceConfig, ...], Field(min_length=1)]
    """Candidate sources; they run concurrently."""

    filter_hydrators: tuple[StageId, ...] = ("serving_state",)
    """Hydrators that fetch what the filters enforce; they fail closed."""

    filters: tuple[StageId, ...] = DEFAULT_FILTERS
    """Filters in run order, cheap first."""

    hydrators: tuple[StageId, ...] = ("item_features",)
    """Feature hydrators in run order."""

    pre_scorer: StageId | None = "lightweight_pre_score"
    """The cheap scorer that orders everything before the cut to ``ranker_input_size``."""

    pre_score_weights: PreScoreWeights = PreScoreWeights()
    """Weights of the built-in lightweight pre-scorer."""

    scorer: StageId | None = None
    """The ranking model."""

    ranker_weights: RankerWeights = RankerWeights()
    """How the ranker's task heads combine into one score on this surface."""

    ranker_input_size: Annotated[int, Field(ge=1)] = 200
    """Candidates, best first by pre-score, that reach the ranker."""

    policies: tuple[StageId, ...] = DEFAULT_POLICIES
    """Re-ranking policies in run order; ``reason`` belongs last."""

    policy_params: PolicyParams = PolicyParams()
    """Parameters of the policies."""

    budgets: StageBudgets = StageBudgets()
    """Per-stage latency budgets."""

    optional_stages: frozenset[StageId] = frozenset()
    """Stages left out when the registry lacks them, instead of failing the build."""

    @property
    def fail_open(self) -> frozenset[str]:
        """Names of the sources that are skipped when they fail or are late."""
        return frozenset(s.name for s in self.sources if s.fail_open)

    @model_validator(mode="after")
    def _unique_sources(self) -> SurfaceConfig:
        names = [s.name for s in self.sources]
        if len(names) != len(set(names)):
            raise ValueError(f"surface {self.name!r} lists a source twice: {names}")
        return self


SourceFactory = Callable[[SourceConfig], CandidateSource]
"""Builds a source with a surface's budget and candidate count."""

ScorerFactory = Callable[[SurfaceConfig], Scorer]
"""Builds a scorer for a surface (the ranker reads ``ranker_weights``)."""

PolicyFactory = Callable[[SurfaceConfig], Policy]
"""Builds a policy from a surface's ``policy_params``."""


def _creator_cap(config: SurfaceConfig) -> tuple[int, int]:
    return config.policy_params.creator_cap_max, config.policy_params.creator_cap_window


def default_filters() -> dict[str, Filter]:
    """The built-in filters by name."""
    filters: list[Filter] = [
        SeedItemFilter(),
        RemovedItemFilter(),
        GlobalBlockFilter(),
        UserBlockFilter(),
        ExclusionFilter(),
        PurchasedFilter(),
        SeenInSessionFilter(),
    ]
    return {f.name: f for f in filters}


def default_scorers() -> dict[str, ScorerFactory]:
    """The built-in scorers by name: the lightweight pre-scorer."""
    return {"lightweight_pre_score": lambda config: LightweightPreScorer(config.pre_score_weights)}


def default_policies() -> dict[str, PolicyFactory]:
    """The built-in re-ranking policies by name, each built from a surface's parameters."""

    def exploration(config: SurfaceConfig) -> Policy:
        p = config.policy_params
        sampler = ThompsonSampler(
            prior_strength=p.exploration_prior_strength, mc_samples=p.exploration_mc_samples
        )
        return ExplorationPolicy(
            p.exploration_share, p.exploration_pool_size, sampler, creator_cap=_creator_cap(config)
        )

    return {
        "dedupe": lambda config: DedupePolicy(),
        "freshness_boost": lambda config: FreshnessBoostPolicy(
            config.policy_params.freshness_boost,
            config.policy_params.freshness_half_life_h,
            config.policy_params.freshness_max_age_h,
        ),
        "mmr_diversity": lambda config: MmrDiversityPolicy(
            config.policy_params.diversity_lambda, config.policy_params.diversity_pool_size
        ),
        "category_spread": lambda config: CategorySpreadPolicy(
            config.policy_params.category_cap_max, config.policy_params.category_cap_window
        ),
        "creator_cap": lambda config: CreatorCapPolicy(*_creator_cap(config)),
        "exploration": exploration,
        "sponsored_slots": lambda config: SponsoredSlotPolicy(
            config.policy_params.sponsored_slots,
            config.policy_params.sponsored_max,
            creator_cap=_creator_cap(config),
        ),
        "reason": lambda config: ReasonPolicy(new_item_age_h=config.policy_params.new_item_age_h),
    }


@dataclass(frozen=True)
class ComponentRegistry:
    """Every stage a surface may name, by name.

    Build it with :meth:`with_defaults`, passing the components the serving process owns; the
    built-in filters, pre-scorer and policies are added unless overridden.

    Attributes:
        sources: Source factories, called with each surface's :class:`SourceConfig`.
        hydrators: Feature and filter-state hydrators (shared between surfaces).
        filters: Filters (pure, shared).
        scorers: Scorer factories (pre-scorers and rankers), called with the surface config.
        policies: Policy factories, called with the surface config.
    """

    sources: Mapping[str, SourceFactory] = field(default_factory=dict)
    hydrators: Mapping[str, FeatureHydrator] = field(default_factory=dict)
    filters: Mapping[str, Filter] = field(default_factory=default_filters)
    scorers: Mapping[str, ScorerFactory] = field(default_factory=default_scorers)
    policies: Mapping[str, PolicyFactory] = field(default_factory=default_policies)

    @classmethod
    def with_defaults(
        cls,
        *,
        sources: Mapping[str, SourceFactory],
        hydrators: Mapping[str, FeatureHydrator],
        filters: Mapping[str, Filter] | None = None,
        scorers: Mapping[str, ScorerFactory] | None = None,
        policies: Mapping[str, PolicyFactory] | None = None,
    ) -> ComponentRegistry:
        """The built-in components plus (and overridden by) the given ones."""
        return cls(
            sources=dict(sources),
            hydrators=dict(hydrators),
            filters={**default_filters(), **(filters or {})},
            scorers={**default_scorers(), **(scorers or {})},
            policies={**default_policies(), **(policies or {})},
        )


class UnknownStageError(ValueError):
    """A surface names a stage the registry does not have (and that is not optional)."""


def _pick(kind: str, name: str, known: Mapping[str, Any], config: SurfaceConfig) -> Any:
    if name in known:
        return known[name]
    if name in config.optional_stages:
        return None
    raise UnknownStageError(
        f"surface {config.name!r} names {kind} {name!r}, which the registry lacks; known: {sorted(known)}"
    )


def build_pipeline(config: SurfaceConfig, registry: ComponentRegistry) -> SurfacePipeline:
    """The pipeline of a surface.

    Args:
        config: The surface.
        registry: The components to build it from.

    Returns:
        The pipeline value, validated (unique names, positive budgets, fail-open sources exist).

    Raises:
        UnknownStageError: A non-optional stage is missing from the registry.
        ValueError: The resulting pipeline is invalid (no source left, say).
    """
    sources: list[CandidateSource] = []
    for spec in config.sources:
        factory = _pick("source", spec.name, registry.sources, config)
        if factory is not None:
            source = factory(spec)
            if source.name != spec.name:
                raise ValueError(f"the factory of source {spec.name!r} built a source named {source.name!r}")
            sources.append(source)
    present = {s.name for s in sources}

    def picked(kind: str, names: tuple[str, ...], known: Mapping[str, Any]) -> tuple[Any, ...]:
        return tuple(x for x in (_pick(kind, n, known, config) for n in names) if x is not None)

    def scorer(name: str | None) -> Scorer | None:
        factory = None if name is None else _pick("scorer", name, registry.scorers, config)
        return None if factory is None else factory(config)

    return SurfacePipeline(
        surface=config.name,
        sources=tuple(sources),
        filter_hydrators=picked("hydrator", config.filter_hydrators, registry.hydrators),
        filters=picked("filter", config.filters, registry.filters),
        hydrators=picked("hydrator", config.hydrators, registry.hydrators),
        pre_scorer=scorer(config.pre_scorer),
        scorer=scorer(config.scorer),
        policies=tuple(f(config) for f in picked("policy", config.policies, registry.policies)),
        ranker_input_size=config.ranker_input_size,
        budgets=config.budgets,
        fail_open=config.fail_open & present,
    )


def load_surface_configs(path: str | Path = DEFAULT_SURFACES_PATH) -> dict[str, SurfaceConfig]:
    """Read surface configs from YAML: a top-level ``surfaces`` mapping of name to config.

    The ``name`` of each entry defaults to its key and must equal it when given.

    Args:
        path: The YAML file.

    Returns:
        Surface name to its validated config.

    Raises:
        ValueError: The file is not a ``surfaces`` mapping, or a name disagrees with its key.
        pydantic.ValidationError: A config is invalid (unknown keys included).
    """
    document = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(document, dict) or not isinstance(document.get("surfaces"), dict):
        raise ValueError(f"{path}: expected a top-level 'surfaces' mapping")
    extra = set(document) - {"surfaces"}
    if extra:
        raise ValueError(f"{path}: unknown top-level keys {sorted(extra)}")
    out: dict[str, SurfaceConfig] = {}
    for key, body in document["surfaces"].items():
        if not isinstance(body, dict):
            raise ValueError(f"{path}: surface {key!r} is not a mapping")
        if body.get("name", key) != key:
            raise ValueError(f"{path}: surface {key!r} is named {body['name']!r}")
        out[key] = SurfaceConfig.model_validate({**body, "name": key})
    return out


def default_surface_configs() -> dict[str, SurfaceConfig]:
    """The shipped surfaces (``surfaces.yaml`` beside this module)."""
    return load_surface_configs(DEFAULT_SURFACES_PATH)
