"""The experiment platform validated against a simulated world whose truth is known.

Logs come from :mod:`training.experiments.simulator_policy`: users assigned by the real
:func:`policies.experiments.assign`, lists served with exact propensities, responses drawn from
the synthetic world's hidden truth. They are written through the real :class:`core.lake.Lake`
and read back by the Ray Data analysis, so the numbers checked here travel the production path:

* an A/B test of a good ranker against a random one finds the good one ahead (p < 0.05), with
  no sample-ratio mismatch, and its CTRs equal the simulation's own counts (the joins lose and
  invent nothing);
* an A/A test finds no difference, and over 50 seeds its false-positive rate stays within the
  binomial band of the 5 % level (run in process: the stage functions Ray maps, applied to the
  whole log as one partition, since 50 Ray runs would take many minutes on two CPUs);
* off-policy estimates of another policy's CTR hold, within their intervals, the CTR that
  policy gets when it actually serves the same requests.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from scipy import stats as sps

from core.lake import Lake
from policies.experiments import (
    BUCKETS,
    Arm,
    ExperimentConfig,
    ExperimentRegistry,
    ExperimentSet,
    Layer,
)
from training import experiment_commands
from training.experiments import analysis as A
from training.experiments.ope import OpeConfig, evaluate_lake
from training.experiments.simulator_policy import (
    SIMULATED_POLICIES,
    ListPolicy,
    ListSimulator,
    SimulatedLog,
)
from training.experiments.stats import compare
from training.synthetic import WorldConfig, WorldTruth, build_truth, items_table

pytestmark = pytest.mark.integration

GOOD = ListPolicy(name="good", score="affinity", score_noise=0.5)
"""Ranks by true affinity plus model noise."""
RANDOM = SIMULATED_POLICIES["random"]
AA_SEED = 3
"""Seed of the fixed A/A test (CTR p = 0.68); the 50-seed test shows non-significant seeds are the rule."""


@pytest.fixture(scope="module")
def truth() -> WorldTruth:
    return build_truth(WorldConfig.preset("tiny", n_users=2_000, n_items=1_000, n_events=0, seed=5))


@pytest.fixture(scope="module")
def ray_data(ray_cluster: None) -> Iterator[None]:
    import ray.data

    context = ray.data.DataContext.get_current()
    before = context.enable_progress_bars
    context.enable_progress_bars = False
    yield
    context.enable_progress_bars = before


def _registry(truth: WorldTruth, *, ab_salt: str = "ab-2026", aa_salt: str = "aa-2026") -> ExperimentRegistry:
    def two_arms(experiment_id: str, layer: str, salt: str) -> ExperimentConfig:
        return ExperimentConfig(
            id=experiment_id,
            salt=salt,
            layer=layer,
            arms=(Arm(name="control", share=0.5), Arm(name="treatment", share=0.5)),
        )

    registry = ExperimentRegistry()
    registry.add_layer(Layer(name="ranking", salt="ranking-layer"))
    registry.add_layer(Layer(name="ui", salt="ui-layer"))
    registry.register(two_arms("ab_ranker", "ranking", ab_salt), buckets=(0, BUCKETS))
    registry.register(two_arms("aa_check", "ui", aa_salt), buckets=(0, BUCKETS))
    for experiment_id in ("ab_ranker", "aa_check"):
        registry.start(experiment_id, now=truth.config.start)
    return registry


def _simulate(
    truth: WorldTruth,
    experiments: ExperimentSet,
    experiment_id: str,
    policies: dict[str, ListPolicy],
    seed: int,
    users: int | None = None,
) -> SimulatedLog:
    simulator = ListSimulator(truth)
    who = None if users is None else np.arange(users)
    requests = simulator.requests(seed, users=who, prefix=f"{experiment_id}-{seed}")
    served = simulator.serve_experiment(requests, experiments, experiment_id, policies, seed + 1)
    outcomes = simulator.respond(served, seed + 2)
    return simulator.log(
        served, outcomes, seed + 3, experiment_id=experiment_id, prefix=f"{experiment_id}-{seed}"
    )


def _lake(home: Path, truth: WorldTruth, log: SimulatedLog) -> Lake:
    lake = Lake(str(home))
    lake.append("items", items_table(truth))
    lake.append("impressions", log.impressions)
    lake.append("events", log.events)
    return lake


def _in_process_totals(truth: WorldTruth, log: SimulatedLog, experiment_id: str) -> dict[str, A.ArmTotals]:
    """The analysis stages on the whole log as one partition (what each Ray task does to its part)."""
    items = items_table(truth)
    stats = A.summarise_items(pa.concat_tables([A.item_input_rows(items), A.popularity_rows(log.events)]))
    exposures = A.exposure_rows(log.impressions, experiment_id=experiment_id)
    with_items = A.attach_items(pa.concat_tables([exposures, A.item_stat_rows(stats)]))
    labelled = A.label_impressions(pa.concat_tables([with_items, A.event_rows(log.events)]))
    sums = A.user_metric_sums(
        labelled, total_events=float(log.events.num_rows), catalogue_items=stats.num_rows
    )
    return A.arm_totals(A.arm_partial_sums(sums))


def test_ab_report_finds_the_better_ranker(truth: WorldTruth, ray_data: None, tmp_path: Path, capsys) -> None:
    registry = _registry(truth)
    log = _simulate(truth, registry.snapshot, "ab_ranker", {"control": RANDOM, "treatment": GOOD}, seed=100)
    home = tmp_path / "home"
    _lake(home, truth, log)
    registry.save(home / experiment_commands.REGISTRY_PATH)

    # Through the command line, exactly as an operator runs it.
    parser = argparse.ArgumentParser(prog="rayrec")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home")
    common.add_argument("--namespace")
    common.add_argument("--quiet", action="store_true")
    experiment_commands.register(parser.add_subparsers(dest="command", required=True), common)
    json_out, png_out = tmp_path / "report.json", tmp_path / "ctr.png"
    args = parser.parse_args(
        ["experiments", "report", "ab_ranker", "--home", str(home), "--json", str(json_out),
         "--png", str(png_out), "--partitions", "2"]
    )  # fmt: skip
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "ctr" in printed and "sample ratio: ok" in printed

    report = json.loads(json_out.read_text())
    arms = {a["arm"]: a for a in report["arms"]}
    ctr = {arm: arms[arm]["metrics"]["ctr"] for arm in ("control", "treatment")}
    vs = ctr["treatment"]["vs_control"]
    assert ctr["treatment"]["estimate"]["value"] > ctr["control"]["estimate"]["value"]
    assert vs["p_value"] < 0.05 and vs["relative"]["ci_low"] > 0
    assert report["srm"]["flagged"] is False
    # Every click of the simulation reached its impression, through both joins.
    truth_ctr = log.arm_ctr()
    for arm in ("control", "treatment"):
        assert ctr[arm]["estimate"]["value"] == pytest.approx(truth_ctr[arm], rel=1e-9)
    assert report["diagnostics"]["events_attributed_by_time_window"] > 0
    assert sum(arms[a]["users"] for a in arms) == len(set(log.impressions.column("user_id").to_pylist()))
    assert png_out.read_bytes()[:4] == b"\x89PNG"
    print(
        f"A/B: CTR control {ctr['control']['estimate']['value']:.4f}, "
        f"treatment {ctr['treatment']['estimate']['value']:.4f}, p {vs['p_value']:.3g}, "
        f"SRM p {report['srm']['p_value']:.3f}"
    )


def test_aa_report_finds_no_difference(truth: WorldTruth, ray_data: None, tmp_path: Path) -> None:
    registry = _registry(truth)
    log = _simulate(truth, registry.snapshot, "aa_check", {"control": GOOD, "treatment": GOOD}, seed=AA_SEED)
    lake = _lake(tmp_path / "home", truth, log)
    report = A.analyse_experiment(lake, registry.get("aa_check"), A.AnalysisConfig(partitions=2))
    vs = report.arm("treatment").metrics["ctr"].vs_control
    assert vs is not None and vs.p_value > 0.05, report.render()
    assert not report.srm.flagged
    print(f"A/A (seed {AA_SEED}): CTR p {vs.p_value:.3f}, SRM p {report.srm.p_value:.3f}")
    assert report.guardrails_pass
    # The Ray path and the in-process stages agree to rounding.
    local = _in_process_totals(truth, log, "aa_check")
    for arm in ("control", "treatment"):
        assert report.arm(arm).metrics["ctr"].estimate.value == pytest.approx(local[arm].moments["ctr"].ratio)
        assert report.arm(arm).users == local[arm].users


def test_aa_false_positive_rate_is_nominal_over_50_seeds(truth: WorldTruth) -> None:
    seeds, alpha = 50, 0.05
    p_values = []
    for seed in range(seeds):
        registry = _registry(truth, aa_salt=f"aa-{seed}")
        log = _simulate(
            truth,
            registry.snapshot,
            "aa_check",
            {"control": GOOD, "treatment": GOOD},
            seed=1_000 + seed,
            users=1_000,
        )
        totals = _in_process_totals(truth, log, "aa_check")
        vs = compare(totals["treatment"].moments["ctr"], totals["control"].moments["ctr"], alpha)
        p_values.append(vs.p_value)
    false_positives = sum(p < alpha for p in p_values)
    # More rejections than this happen with probability under 0.05 % when the level is right (9 of 50).
    high = int(sps.binom.isf(0.0005, seeds, alpha))
    assert false_positives <= high, p_values
    # p-values of a true null are uniform: a gross miscalibration would show here too.
    uniform = sps.kstest(p_values, "uniform").pvalue
    assert uniform > 0.001, p_values
    print(
        f"A/A: {false_positives} of {seeds} seeds significant at {alpha} (allowed up to {high}), "
        f"uniformity KS p {uniform:.2f}"
    )


def test_ope_through_the_lake_holds_the_target_ctr(truth: WorldTruth, ray_data: None, tmp_path: Path) -> None:
    simulator = ListSimulator(truth)
    requests = simulator.requests(7, prefix="ope")
    logging_policy, target_policy = SIMULATED_POLICIES["logging"], SIMULATED_POLICIES["softmax"]
    served = simulator.serve(requests, logging_policy, 8)
    log = simulator.log(served, simulator.respond(served, 9), 10, prefix="ope")
    lake = _lake(tmp_path / "home", truth, log)

    result = evaluate_lake(lake, simulator.target(requests, target_policy), OpeConfig(), partitions=2)
    on_target = simulator.serve(requests, target_policy, 11)
    simulated = float(simulator.respond(on_target, 12).click.mean())
    expected = simulator.expected_ctr(requests, target_policy)
    assert result.slots == log.impressions.num_rows and result.dropped == 0
    assert result.logged.value == pytest.approx(float(log.outcomes.click.mean()), rel=1e-9)
    assert result.ips.contains(simulated) and result.ips.contains(expected), result.render()
    assert result.snips.contains(simulated) and result.snips.contains(expected), result.render()
    # The target is a better ranker than the logging policy, and the estimate says so.
    assert result.snips.ci_low > result.logged.value
    print(f"OPE: {result.render()}\n  simulated target CTR {simulated:.4f}, expected {expected:.4f}")
