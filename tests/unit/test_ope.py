"""Off-policy evaluation and the list simulator's propensities, in process (no Ray)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from training.experiments.ope import OpeConfig, TargetPolicy, evaluate_slots
from training.experiments.simulator_policy import (
    SIMULATED_POLICIES,
    ListPolicy,
    ListSimulator,
    SimulatedLog,
    SimulationConfig,
    plackett_luce_marginals,
)
from training.synthetic import WorldConfig, WorldTruth, build_truth


@pytest.fixture(scope="module")
def truth() -> WorldTruth:
    return build_truth(WorldConfig.preset("tiny", n_users=600, n_items=400, n_events=0, seed=11))


def _slots(log: SimulatedLog) -> pa.Table:
    return log.impressions.append_column("clicked", pa.array(log.outcomes.click.ravel()))


def _logged(truth: WorldTruth, policy: ListPolicy, seed: int = 0) -> tuple[ListSimulator, SimulatedLog]:
    simulator = ListSimulator(truth)
    requests = simulator.requests(seed)
    served = simulator.serve(requests, policy, seed + 1)
    return simulator, simulator.log(served, simulator.respond(served, seed + 2), seed + 3)


# -- propensities -------------------------------------------------------------------------------


def test_plackett_luce_marginals_match_sampling() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, (3, 6))
    k = 4
    exact = plackett_luce_marginals(logits, k)
    draws = 100_000
    counts = np.zeros_like(exact)
    for r in range(3):
        keys = logits[r] + rng.gumbel(size=(draws, 6))
        order = np.argsort(-keys, axis=1)[:, :k]
        for pos in range(k):
            counts[r, :, pos] = np.bincount(order[:, pos], minlength=6) / draws
    assert np.abs(counts - exact).max() < 0.01
    assert np.allclose(exact.sum(axis=1), 1.0)
    assert (exact.sum(axis=2) <= 1 + 1e-12).all()


def test_policy_marginals_are_the_probabilities_of_its_draws(truth: WorldTruth) -> None:
    simulator = ListSimulator(truth, SimulationConfig(list_size=3, candidates=5))
    requests = simulator.requests(0, users=np.zeros(1, dtype=np.int64))
    one = requests.take(np.zeros(20_000, dtype=np.int64))
    for policy in (
        ListPolicy(name="mixed", score_noise=0.5, temperature=0.4, epsilon=0.2),
        ListPolicy(name="greedy_explore", score_noise=0.5, epsilon=0.3),
    ):
        marginals = policy.marginals(truth, requests)[0]
        drawn = policy.sample(truth, one, np.random.default_rng(1))
        freq = np.stack([np.bincount(drawn[:, pos], minlength=5) / len(one) for pos in range(3)], axis=1)
        assert np.abs(freq - marginals).max() < 0.015, policy.name
        assert np.allclose(marginals.sum(axis=0), 1.0)


def test_served_propensities_are_those_of_the_shown_items(truth: WorldTruth) -> None:
    simulator = ListSimulator(truth)
    requests = simulator.requests(3)
    policy = SIMULATED_POLICIES["logging"]
    served = simulator.serve(requests, policy, 4)
    marginals = policy.marginals(truth, requests)
    k = requests.list_size
    expected = marginals[np.arange(len(requests))[:, None], served.columns, np.arange(k)[None, :]]
    assert np.allclose(served.propensity, expected)
    # Exploration keeps every (candidate, position) possible.
    assert served.propensity.min() >= policy.epsilon / simulator.config.candidates - 1e-12
    assert len({tuple(row) for row in served.items[:200].tolist()}) > 1


# -- estimators ---------------------------------------------------------------------------------


def test_evaluating_the_logging_policy_itself_gives_the_logged_ctr(truth: WorldTruth) -> None:
    policy = SIMULATED_POLICIES["logging"]
    simulator, log = _logged(truth, policy)
    result = evaluate_slots(_slots(log), simulator.target(log.served.requests, policy))
    assert result.ips.value == pytest.approx(result.logged.value, rel=1e-6)
    assert result.snips.value == pytest.approx(result.logged.value, rel=1e-6)
    assert result.mean_weight == pytest.approx(1.0, rel=1e-6)
    assert result.effective_sample_size == pytest.approx(result.slots, rel=1e-6)


@pytest.mark.parametrize("target", ["greedy", "softmax", "random"])
def test_ips_and_snips_intervals_hold_the_target_ctr(truth: WorldTruth, target: str) -> None:
    simulator, log = _logged(truth, SIMULATED_POLICIES["logging"], seed=20)
    requests = log.served.requests
    policy = SIMULATED_POLICIES[target]
    result = evaluate_slots(_slots(log), simulator.target(requests, policy))
    expected = simulator.expected_ctr(requests, policy)
    assert result.ips.contains(expected), (result.render(), expected)
    assert result.snips.contains(expected), (result.render(), expected)
    assert result.mean_weight == pytest.approx(1.0, abs=0.05)


def test_clipping_caps_weights_and_is_reported(truth: WorldTruth) -> None:
    simulator, log = _logged(truth, SIMULATED_POLICIES["logging"], seed=30)
    target = simulator.target(log.served.requests, SIMULATED_POLICIES["greedy"])
    free = evaluate_slots(_slots(log), target)
    clipped = evaluate_slots(_slots(log), target, OpeConfig(max_weight=5.0))
    assert free.max_weight > 5.0 and free.clipped == 0
    assert clipped.max_weight <= 5.0 and clipped.clipped > 0
    assert clipped.ips.value < free.ips.value
    assert clipped.effective_sample_size > free.effective_sample_size


def test_rows_without_propensity_are_left_out_and_counted(truth: WorldTruth) -> None:
    simulator, log = _logged(truth, SIMULATED_POLICIES["logging"], seed=40)
    slots = _slots(log)
    gone = pc.if_else(
        pc.less(pc.cast(slots.column("position"), pa.int64()), 1), None, slots.column("propensity")
    )
    slots = slots.set_column(slots.column_names.index("propensity"), "propensity", gone)
    result = evaluate_slots(slots, simulator.target(log.served.requests, SIMULATED_POLICIES["greedy"]))
    k = log.served.requests.list_size
    assert result.dropped == slots.num_rows // k
    assert result.slots == slots.num_rows - result.dropped


def test_bootstrap_and_delta_intervals_agree(truth: WorldTruth) -> None:
    simulator, log = _logged(truth, SIMULATED_POLICIES["logging"], seed=50)
    target = simulator.target(log.served.requests, SIMULATED_POLICIES["softmax"])
    delta = evaluate_slots(_slots(log), target)
    boot = evaluate_slots(_slots(log), target, OpeConfig(interval="bootstrap", bootstrap_samples=500, seed=1))
    assert boot.ips.value == delta.ips.value
    width_delta = delta.ips.ci_high - delta.ips.ci_low
    width_boot = boot.ips.ci_high - boot.ips.ci_low
    assert width_boot == pytest.approx(width_delta, rel=0.2)


def test_target_probabilities_are_checked() -> None:
    class Broken:
        name = "broken"

        def probability(self, context: pa.Table) -> np.ndarray:
            return np.full(context.num_rows, 1.5)

    assert isinstance(Broken(), TargetPolicy)
    slots = pa.table(
        {"user_id": ["u1"], "request_id": ["r1"], "item_id": ["i1"], "position": [0], "propensity": [0.5],
         "clicked": [True]}
    )  # fmt: skip
    with pytest.raises(ValueError, match="outside"):
        evaluate_slots(slots, Broken())


def test_simulated_target_gives_zero_outside_its_requests(truth: WorldTruth) -> None:
    simulator = ListSimulator(truth)
    requests = simulator.requests(60)
    target = simulator.target(requests, SIMULATED_POLICIES["random"])
    first = requests.candidates[0]
    outside = next(i for i in range(truth.n_items) if i not in set(first.tolist()))
    context = pa.table(
        {
            "request_id": [
                requests.request_ids[0],
                requests.request_ids[0],
                "unknown",
                requests.request_ids[0],
            ],
            "item_id": [f"i{first[0]}", f"i{outside}", f"i{first[0]}", f"i{first[0]}"],
            "position": [0, 0, 0, requests.list_size],
        }
    )
    p = target.probability(context)
    assert p[0] == pytest.approx(1 / simulator.config.candidates)
    assert p[1:].tolist() == [0.0, 0.0, 0.0]
