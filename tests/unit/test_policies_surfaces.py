from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import ValidationError

from core.types import Candidate, RequestContext
from policies.surfaces import (
    DEFAULT_POLICIES,
    ComponentRegistry,
    SourceConfig,
    SurfaceConfig,
    UnknownStageError,
    build_pipeline,
    default_surface_configs,
    load_surface_configs,
)


@dataclass
class StubSource:
    name: str
    budget_ms: float
    max_candidates: int

    async def fetch(self, ctx: RequestContext) -> list[Candidate]:
        return []


@dataclass
class StubHydrator:
    name: str
    budget_ms: float = 10.0

    async def hydrate(self, ctx: RequestContext, cands: list[Candidate]) -> list[Candidate]:
        return cands


SOURCE_NAMES = (
    "two_tower_ann",
    "collaborative",
    "item_to_item",
    "recently_viewed_related",
    "content",
    "social",
    "trending",
    "popular",
    "sponsored",
    "similar_items",
)


def registry(*, without: tuple[str, ...] = ()) -> ComponentRegistry:
    def factory(spec: SourceConfig) -> StubSource:
        return StubSource(spec.name, spec.budget_ms, spec.max_candidates)

    return ComponentRegistry.with_defaults(
        sources={name: factory for name in SOURCE_NAMES if name not in without},
        hydrators={
            "serving_state": StubHydrator("serving_state"),
            "item_features": StubHydrator("item_features"),
        },
    )


def test_default_surfaces_exist_and_build() -> None:
    configs = default_surface_configs()
    assert set(configs) >= {"home", "product", "video", "similar"}
    for name, config in configs.items():
        pipeline = build_pipeline(config, registry())
        assert pipeline.surface == name
        assert pipeline.filter_hydrators[0].name == "serving_state"
        assert [p.name for p in pipeline.policies][-1] == "reason"
        assert pipeline.pre_scorer is not None and pipeline.pre_scorer.name == "lightweight_pre_score"
        # The model-backed stages are optional until a model is loaded.
        assert pipeline.scorer is None
        assert [h.name for h in pipeline.hydrators] == ["item_features"]


def test_home_follows_its_config() -> None:
    config = default_surface_configs()["home"]
    pipeline = build_pipeline(config, registry())
    assert [s.name for s in pipeline.sources] == [s.name for s in config.sources]
    budgets = {s.name: s.budget_ms for s in pipeline.sources}
    assert budgets["trending"] == 15 and budgets["popular"] == 5
    assert [f.name for f in pipeline.filters] == [
        "removed_item",
        "global_block",
        "user_block",
        "exclusion",
        "seen_in_session",
    ]
    assert [p.name for p in pipeline.policies] == list(DEFAULT_POLICIES)
    assert pipeline.fail_open == {s.name for s in pipeline.sources}


def test_optional_stages_are_skipped_and_required_ones_are_not() -> None:
    home = default_surface_configs()["home"]
    pipeline = build_pipeline(home, registry(without=("two_tower_ann",)))
    assert "two_tower_ann" not in [s.name for s in pipeline.sources]
    with pytest.raises(UnknownStageError, match="trending"):
        build_pipeline(home, registry(without=("trending",)))


def test_similar_requires_its_seed_source() -> None:
    similar = default_surface_configs()["similar"]
    assert "similar_items" not in similar.fail_open
    pipeline = build_pipeline(similar, registry())
    assert "similar_items" not in pipeline.fail_open


def test_a_new_surface_is_configuration(tmp_path: Path) -> None:
    path = tmp_path / "surfaces.yaml"
    path.write_text(
        "surfaces:\n"
        "  deals:\n"
        "    sources:\n"
        "      - {name: trending, budget_ms: 12, max_candidates: 30}\n"
        "      - {name: sponsored, budget_ms: 3, max_candidates: 5}\n"
        "    filters: [removed_item, global_block, purchased]\n"
        "    policies: [dedupe, creator_cap, sponsored_slots, reason]\n"
        "    policy_params: {creator_cap_max: 1, creator_cap_window: 3, sponsored_slots: [0]}\n",
        encoding="utf-8",
    )
    configs = load_surface_configs(path)
    pipeline = build_pipeline(configs["deals"], registry())
    assert pipeline.surface == "deals"
    assert [f.name for f in pipeline.filters] == ["removed_item", "global_block", "purchased"]
    assert [s.budget_ms for s in pipeline.sources] == [12, 3]


@pytest.mark.parametrize(
    "body",
    [
        "surfaces:\n  x:\n    sources: [{name: trending}]\n    bogus: 1\n",
        "surfaces:\n  x:\n    sources: [{name: trending, budget_ms: 0}]\n",
        "surfaces:\n  x:\n    sources: []\n",
        "surfaces:\n  x:\n    sources: [{name: trending}, {name: trending}]\n",
        "surfaces:\n  x:\n    sources: [{name: Trending}]\n",
        "surfaces:\n  x:\n    sources: [{name: trending}]\n    policy_params: {exploration_share: 1.0}\n",
    ],
)
def test_invalid_surface_configs_are_refused(tmp_path: Path, body: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(ValidationError):
        load_surface_configs(path)


def test_surface_names_must_match_their_keys(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("surfaces:\n  x:\n    name: y\n    sources: [{name: trending}]\n", encoding="utf-8")
    with pytest.raises(ValueError, match="named"):
        load_surface_configs(path)


def test_unknown_filter_or_policy_names_fail_the_build() -> None:
    config = SurfaceConfig(name="x", sources=(SourceConfig(name="trending"),), filters=("no_such_filter",))
    with pytest.raises(UnknownStageError, match="no_such_filter"):
        build_pipeline(config, registry())
