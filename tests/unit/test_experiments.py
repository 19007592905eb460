"""Experiment config and assignment: sticky, accurate, orthogonal across layers, exclusive within one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError
from scipy import stats as sps

from policies.experiments import (
    BUCKETS,
    Arm,
    ArmOverrides,
    Assignment,
    ExperimentConfig,
    ExperimentRegistry,
    ExperimentSet,
    ExperimentStatus,
    Layer,
    assign,
    bucket,
    merge_overrides,
)

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
USERS = [f"u{k}" for k in range(100_000)]


def _experiment(
    experiment_id: str,
    layer: str = "ranking",
    shares: tuple[float, ...] = (0.5, 0.5),
    status: ExperimentStatus = ExperimentStatus.RUNNING,
    **overrides: Any,
) -> ExperimentConfig:
    names = ["control", "treatment", "treatment_b", "treatment_c"]
    return ExperimentConfig(
        id=experiment_id,
        salt=f"{experiment_id}-salt",
        layer=layer,
        status=status,
        arms=tuple(Arm(name=names[k], share=share) for k, share in enumerate(shares)),
        **overrides,
    )


Ranges = dict[str, tuple[int, int]]


def _set(*experiments: ExperimentConfig, allocations: Ranges | None = None) -> ExperimentSet:
    """Layers ``ranking`` and ``ui``; every experiment holds all of its layer unless told otherwise."""
    allocations = allocations or {e.id: (0, BUCKETS) for e in experiments}
    layers = []
    for name in ("ranking", "ui"):
        held = [
            {"experiment_id": e.id, "start_bucket": allocations[e.id][0], "end_bucket": allocations[e.id][1]}
            for e in experiments
            if e.layer == name and e.id in allocations
        ]
        layers.append(Layer.model_validate({"name": name, "salt": f"{name}-layer", "allocations": held}))
    return ExperimentSet(layers=tuple(layers), experiments=experiments)


def _arms(experiments: ExperimentSet, experiment_id: str) -> list[str | None]:
    out: list[str | None] = []
    for user in USERS:
        got = [a.arm for a in assign(user, experiments, now=NOW) if a.experiment_id == experiment_id]
        out.append(got[0] if got else None)
    return out


# -- hashing and stickiness ---------------------------------------------------------------------


def test_bucket_is_a_fixed_function_of_salt_and_user() -> None:
    # Pinned values: a change of hash would move every user of every running experiment.
    assert bucket("ranking-2026", "u1") == 7660
    assert bucket("ranking-2026", "u2") == 4647
    assert bucket("exp-a", "u1") == 257
    assert all(0 <= bucket("s", u) < BUCKETS for u in USERS[:1000])


def test_assignment_is_sticky_across_calls_serialisation_and_unrelated_changes() -> None:
    registry = ExperimentRegistry(_set(_experiment("exp_a")))
    before = [registry.assign(u, now=NOW) for u in USERS[:2000]]
    assert before == [registry.assign(u, now=NOW) for u in USERS[:2000]]

    reloaded = ExperimentRegistry.from_json(registry.to_json())
    assert before == [reloaded.assign(u, now=NOW) for u in USERS[:2000]]

    # Another layer's experiment does not move anyone in exp_a.
    registry.register(_experiment("exp_ui", layer="ui"), buckets=(0, BUCKETS))
    after = [[a for a in registry.assign(u, now=NOW) if a.experiment_id == "exp_a"] for u in USERS[:2000]]
    assert after == before


def test_shrinking_an_allocation_keeps_the_arm_of_users_who_stay() -> None:
    registry = ExperimentRegistry(_set(_experiment("exp_a")))
    full = {u: registry.assign(u, now=NOW)[0].arm for u in USERS[:5000]}
    registry.allocate("exp_a", 0, 3000)
    kept = {u: a[0].arm for u in USERS[:5000] if (a := registry.assign(u, now=NOW))}
    assert 0.25 < len(kept) / len(full) < 0.35
    assert all(full[u] == arm for u, arm in kept.items())


# -- split accuracy -----------------------------------------------------------------------------


def test_split_matches_configured_shares_on_100k_users() -> None:
    shares = (0.5, 0.3, 0.2)
    arms = _arms(_set(_experiment("exp_split", shares=shares)), "exp_split")
    names = ["control", "treatment", "treatment_b"]
    counts = np.array([arms.count(n) for n in names])
    assert counts.sum() == len(USERS)
    result = sps.chisquare(counts, f_exp=np.array(shares) * len(USERS))
    assert result.pvalue > 0.001, (counts, result)
    assert np.allclose(counts / len(USERS), shares, atol=0.01)


def test_experiment_traffic_share_follows_its_bucket_range() -> None:
    arms = _arms(_set(_experiment("exp_part"), allocations={"exp_part": (0, 2500)}), "exp_part")
    assigned = sum(a is not None for a in arms)
    assert abs(assigned / len(USERS) - 0.25) < 0.01


# -- layers -------------------------------------------------------------------------------------


def test_layers_are_orthogonal() -> None:
    experiments = _set(_experiment("exp_rank"), _experiment("exp_ui", layer="ui"))
    rank = np.array([a == "treatment" for a in _arms(experiments, "exp_rank")])
    ui = np.array([a == "treatment" for a in _arms(experiments, "exp_ui")])
    table = np.array([[np.sum(rank & ui), np.sum(rank & ~ui)], [np.sum(~rank & ui), np.sum(~rank & ~ui)]])
    independence = sps.chi2_contingency(table, correction=False)
    assert independence.pvalue > 0.001, table
    # Within each arm of one layer, the other layer still splits half and half.
    assert abs(ui[rank].mean() - 0.5) < 0.01
    assert abs(ui[~rank].mean() - 0.5) < 0.01


def test_experiments_in_one_layer_are_mutually_exclusive() -> None:
    experiments = _set(
        _experiment("exp_a"),
        _experiment("exp_b"),
        allocations={"exp_a": (0, 5000), "exp_b": (5000, BUCKETS)},
    )
    in_a = np.array([a is not None for a in _arms(experiments, "exp_a")])
    in_b = np.array([a is not None for a in _arms(experiments, "exp_b")])
    assert not (in_a & in_b).any()
    assert (in_a | in_b).all()
    assert abs(in_a.mean() - 0.5) < 0.01


def test_a_user_gets_at_most_one_assignment_per_layer_in_layer_order() -> None:
    experiments = _set(_experiment("exp_rank"), _experiment("exp_ui", layer="ui"))
    for user in USERS[:500]:
        got = assign(user, experiments, now=NOW)
        assert [a.layer for a in got] == ["ranking", "ui"]


# -- status and schedule ------------------------------------------------------------------------


def test_stopped_experiments_assign_nobody() -> None:
    experiments = _set(_experiment("exp_off", status=ExperimentStatus.STOPPED))
    assert all(not assign(u, experiments, now=NOW) for u in USERS[:5000])


def test_schedule_bounds_assignment() -> None:
    experiments = _set(_experiment("exp_timed", start=NOW, end=NOW + timedelta(days=7)))
    assert assign("u1", experiments, now=NOW)
    assert not assign("u1", experiments, now=NOW - timedelta(seconds=1))
    assert not assign("u1", experiments, now=NOW + timedelta(days=7))


def test_registry_start_and_stop() -> None:
    registry = ExperimentRegistry(_set())
    registry.register(_experiment("exp_new", status=ExperimentStatus.STOPPED), buckets=(0, BUCKETS))
    assert not registry.assign("u1", now=NOW)
    started = registry.start("exp_new", now=NOW)
    assert started.status is ExperimentStatus.RUNNING and started.start == NOW
    assert registry.assign("u1", now=NOW + timedelta(hours=1))
    stopped = registry.stop("exp_new", now=NOW + timedelta(days=1))
    assert stopped.status is ExperimentStatus.STOPPED and stopped.end == NOW + timedelta(days=1)
    assert not registry.assign("u1", now=NOW + timedelta(hours=1))
    # A restart brings back the same users in the same arms.
    registry.start("exp_new", now=NOW + timedelta(days=2))
    fresh = ExperimentRegistry(_set(_experiment("exp_new")))
    assert registry.assign("u1", now=NOW + timedelta(days=3))[0].arm == fresh.assign("u1", now=NOW)[0].arm


def test_registry_versions_and_round_trips(tmp_path: Any) -> None:
    registry = ExperimentRegistry()
    registry.add_layer(Layer(name="ranking", salt="ranking-layer"))
    registry.register(_experiment("exp_a"), buckets=(0, 4000))
    assert registry.snapshot.version == 2
    path = registry.save(tmp_path / "experiments" / "registry.json")
    loaded = ExperimentRegistry.load(path)
    assert loaded.snapshot == registry.snapshot
    assert loaded.snapshot.allocation("exp_a") is not None
    registry.release("exp_a")
    assert registry.snapshot.allocation("exp_a") is None
    assert registry.snapshot.version == 3


def test_a_failed_change_leaves_the_registry_as_it_was() -> None:
    registry = ExperimentRegistry(_set(_experiment("exp_a"), allocations={"exp_a": (0, 5000)}))
    before = registry.snapshot
    with pytest.raises(ValidationError):
        registry.register(_experiment("exp_b"), buckets=(4000, 6000))
    assert registry.snapshot is before


# -- overrides ----------------------------------------------------------------------------------


def test_overrides_reach_the_assignment_and_flatten_to_request_params() -> None:
    overrides = ArmOverrides(
        bundle_version="ranker-v7",
        exploration_share=0.1,
        diversity_strength=0.3,
        sources=("two_tower_ann", "trending"),
        ranker_weights={"click": 1.0, "like": 0.5},
    )
    config = ExperimentConfig(
        id="exp_over",
        salt="exp-over",
        layer="ranking",
        status=ExperimentStatus.RUNNING,
        arms=(Arm(name="control", share=0.5), Arm(name="treatment", share=0.5, overrides=overrides)),
    )
    experiments = _set(config)
    treated = next(a for u in USERS[:100] for a in assign(u, experiments, now=NOW) if a.arm == "treatment")
    assert treated.overrides == overrides
    assert overrides.as_params() == {
        "bundle_version": "ranker-v7",
        "exploration_share": 0.1,
        "diversity_strength": 0.3,
        "sources": "two_tower_ann,trending",
        "ranker_weight.click": 1.0,
        "ranker_weight.like": 0.5,
    }


def test_merge_overrides_combines_layers_and_refuses_conflicts() -> None:
    a = Assignment(experiment_id="a", layer="ranking", arm="t", overrides=ArmOverrides(bundle_version="v2"))
    b = Assignment(experiment_id="b", layer="ui", arm="t", overrides=ArmOverrides(diversity_strength=0.2))
    assert merge_overrides([a, b]) == ArmOverrides(bundle_version="v2", diversity_strength=0.2)
    with pytest.raises(ValueError, match="bundle_version"):
        merge_overrides([a, a])


# -- validation ---------------------------------------------------------------------------------


def _refused(build: Any) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        build()
    return info.value


def _locs(error: ValidationError) -> list[tuple[Any, ...]]:
    return [tuple(e["loc"]) for e in error.errors()]


def test_shares_must_sum_to_one() -> None:
    error = _refused(lambda: _experiment("exp_bad", shares=(0.5, 0.4)))
    assert ("arms",) in _locs(error)
    assert "sum to 0.9" in str(error)
    # Decimal shares that do not add exactly are within the tolerance.
    _experiment("exp_ok", shares=(0.1, 0.2, 0.7))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"id": "Bad Id"}, "id"),
        ({"salt": "x" * 65}, "salt"),
        ({"status": "paused"}, "status"),
        ({"control": "nobody"}, "control"),
        ({"start": NOW, "end": NOW - timedelta(hours=1)}, "end"),
        ({"arms": [{"name": "a", "share": 1.0}]}, "arms"),
        ({"arms": [{"name": "a", "share": 0.5}, {"name": "a", "share": 0.5}]}, "arms"),
        ({"arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5, "weight": 2}]}, "weight"),
        ({"arms": [{"name": "a", "share": 0.5},
                   {"name": "b", "share": 0.5, "overrides": {"exploration_share": 1.5}}]},
         "exploration_share"),
        ({"arms": [{"name": "a", "share": 0.5},
                   {"name": "b", "share": 0.5, "overrides": {"sources": []}}]}, "sources"),
        ({"colour": "blue"}, "colour"),
    ],
)  # fmt: skip
def test_invalid_experiment_configs_are_refused_naming_the_field(changes: dict[str, Any], field: str) -> None:
    body: dict[str, Any] = {
        "id": "exp_v",
        "salt": "exp-v",
        "layer": "ranking",
        "arms": [{"name": "control", "share": 0.5}, {"name": "treatment", "share": 0.5}],
    } | changes
    error = _refused(lambda: ExperimentConfig.model_validate(body))
    assert any(field in loc for loc in _locs(error)), error


def test_invalid_layers_and_sets_are_refused_naming_the_field() -> None:
    overlap = _refused(
        lambda: Layer.model_validate(
            {
                "name": "ranking",
                "salt": "r",
                "allocations": [
                    {"experiment_id": "a", "start_bucket": 0, "end_bucket": 6000},
                    {"experiment_id": "b", "start_bucket": 5000, "end_bucket": 10000},
                ],
            }
        )
    )
    assert ("allocations",) in _locs(overlap) and "overlap" in str(overlap)
    backwards = _refused(
        lambda: Layer.model_validate(
            {
                "name": "r",
                "salt": "r",
                "allocations": [{"experiment_id": "a", "start_bucket": 9, "end_bucket": 5}],
            }
        )
    )
    assert "end_bucket" in str(backwards)

    unknown_layer = _refused(lambda: ExperimentSet(experiments=(_experiment("exp_a", layer="nowhere"),)))
    assert "layer" in str(unknown_layer)
    same_salt = _refused(
        lambda: ExperimentSet(
            layers=(Layer(name="ranking", salt="s1"), Layer(name="ui", salt="s1")),
        )
    )
    assert "salt" in str(same_salt)
    stray = _refused(
        lambda: ExperimentSet(
            layers=(Layer.model_validate({"name": "ranking", "salt": "r", "allocations": [
                {"experiment_id": "ghost", "start_bucket": 0, "end_bucket": 10}]}),),
        )
    )  # fmt: skip
    assert "allocations" in str(stray) and "ghost" in str(stray)


def test_two_layers_may_not_override_the_same_parameter() -> None:
    bundle = ArmOverrides(bundle_version="v9")
    a = _experiment("exp_a").model_copy(
        update={"arms": (Arm(name="control", share=0.5), Arm(name="treatment", share=0.5, overrides=bundle))}
    )
    b = _experiment("exp_b", layer="ui").model_copy(update={"arms": a.arms})
    error = _refused(lambda: _set(a, b))
    assert "bundle_version" in str(error) and "overrides" in str(error)
    # A stopped experiment owns nothing.
    _set(a, b.model_copy(update={"status": ExperimentStatus.STOPPED}))
