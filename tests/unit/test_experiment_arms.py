"""An arm's overrides become the surface its requests run, and unservable overrides are refused."""

from __future__ import annotations

import pytest

from deployments.recommender.arms import arm_surface, unservable_overrides
from policies.experiments import (
    BUCKETS,
    Arm,
    ArmOverrides,
    ExperimentConfig,
    ExperimentRegistry,
    Layer,
    assign,
    merge_overrides,
)
from policies.surfaces import SurfaceConfig, default_surface_configs


def _home() -> SurfaceConfig:
    return default_surface_configs()["home"]


def test_assigned_overrides_shape_the_surface() -> None:
    registry = ExperimentRegistry()
    registry.add_layer(Layer(name="rank", salt="rank-salt"))
    treatment = ArmOverrides(
        sources=("trending", "popular"),
        exploration_share=0.3,
        diversity_strength=0.8,
        ranker_weights={"like": 2.0},
    )
    config = ExperimentConfig(
        id="exp",
        salt="exp-salt",
        layer="rank",
        arms=(Arm(name="control", share=0.5), Arm(name="treatment", share=0.5, overrides=treatment)),
    )
    registry.register(config, buckets=(0, BUCKETS))
    registry.start("exp")
    by_arm: dict[str, list[str]] = {}
    for n in range(200):
        (a,) = assign(f"user-{n}", registry.snapshot)
        by_arm.setdefault(a.arm, []).append(f"user-{n}")
    assert set(by_arm) == {"control", "treatment"}

    home = _home()
    control = arm_surface(home, merge_overrides(assign(by_arm["control"][0], registry.snapshot)))
    assert control.config is home and control.applied == {}

    variant = arm_surface(home, merge_overrides(assign(by_arm["treatment"][0], registry.snapshot)))
    assert [s.name for s in variant.config.sources] == [
        s.name for s in home.sources if s.name in {"trending", "popular"}
    ]
    assert variant.config.policy_params.exploration_share == 0.3
    assert variant.config.policy_params.diversity_lambda == pytest.approx(0.2)
    assert variant.config.ranker_weights.like == 2.0
    assert variant.config.ranker_weights.click == home.ranker_weights.click
    assert set(variant.applied) == {"sources", "exploration_share", "diversity_strength", "ranker_weights"}
    assert home.policy_params.exploration_share != 0.3


def test_sources_foreign_to_a_surface_leave_it_whole() -> None:
    home = _home()
    out = arm_surface(home, ArmOverrides(sources=("similar_items",)))
    assert out.config is home and "sources" in out.ignored


def test_unservable_overrides_name_the_field() -> None:
    arms = (
        Arm(name="a", share=0.5),
        Arm(
            name="b",
            share=0.5,
            overrides=ArmOverrides(bundle_version="v9", sources=("nope",), ranker_weights={"dwell": 1.0}),
        ),
    )
    config = ExperimentConfig(id="x", salt="x-salt", layer="l", arms=arms)
    problems = dict(unservable_overrides(config, default_surface_configs()))
    assert set(problems) == {
        ("arms", 1, "overrides", "bundle_version"),
        ("arms", 1, "overrides", "sources"),
        ("arms", 1, "overrides", "ranker_weights"),
    }
    zero = ExperimentConfig(
        id="z",
        salt="z-salt",
        layer="l",
        arms=(
            Arm(name="a", share=0.5),
            Arm(
                name="b",
                share=0.5,
                overrides=ArmOverrides(ranker_weights={"click": 0, "like": 0, "purchase": 0, "watch": 0}),
            ),
        ),
    )
    assert [loc for loc, _ in unservable_overrides(zero, default_surface_configs())] == [
        ("arms", 1, "overrides", "ranker_weights")
    ]


def test_exploration_share_of_one_is_refused() -> None:
    with pytest.raises(ValueError, match="exploration_share"):
        ArmOverrides(exploration_share=1.0)
